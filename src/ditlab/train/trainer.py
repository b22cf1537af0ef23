"""The training loop: one Trainer for a 10-minute CPU MNIST run and a multi-node DiT-XL/2 run.

Per step (the official DiT train.py, plus what short and long runs need):
  global batch B -> W ranks x A accumulation micro-batches, each seeded by (seed, step, m)
  loss = objective.loss(model, x, y)  under bf16 autocast on CUDA
  AdamW with linear LR warm-up, optional grad-norm clipping, EMA update (with decay warm-up)
  loss averaged over ranks -> non-finite check -> progress bar, CSV, TensorBoard
  every ckpt_every steps an atomic checkpoint; every sample_every steps an EMA sample grid.

The data order and all randomness are functions of (seed, step) (`order.py`), so a resumed run
continues bit-identically: the checkpoint stores the step, the optimizer, the EMA, the
objective's state and the RNG states.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ditlab.codecs import load_codec
from ditlab.config import Config, load_run_config, save_config, validate
from ditlab.data import build_dataset
from ditlab.errors import DitlabError
from ditlab.io import save_grid
from ditlab.models import build_model
from ditlab.objectives import build_objective
from ditlab.objectives.guidance import check_guidance
from ditlab.runs import Run, latest_checkpoint, load_state, prepare_run_dir, read_weights, step_dir_name
from ditlab.sampling import generate
from ditlab.train import checkpoint as ckpt
from ditlab.train import distributed as D
from ditlab.train.batch import check_data, prepare_batch
from ditlab.train.ema import EMA
from ditlab.train.logger import Logger, Window
from ditlab.train.order import MicroBatches, StepSampler, mix_seed
from ditlab.train.state import rng_state, set_rng_state


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "steps" | "time_budget"
    elapsed_s: float
    images_per_s: float
    last_loss: float
    checkpoint: Path | None


class Trainer:
    """Build data, model, objective, optimizer and EMA from a Config; `train()` runs the loop."""

    def __init__(self, cfg: Config, *, resume: bool | str | Path = False, device: str | None = None):
        self.cfg, t, o = validate(cfg), cfg.train, cfg.optim
        self.env = D.setup(device)
        self.device = self.env.device
        self.run_dir = Path(t.out_dir)
        if t.precision == "bf16" and self.device.type != "cuda":
            raise DitlabError("train.precision=bf16 needs CUDA (bf16 autocast); CPU trains in fp32")
        self.bf16 = self.device.type == "cuda" and t.precision in ("auto", "bf16")
        micro_per_step = self.env.world_size * t.grad_accum
        if o.batch_size % micro_per_step:
            raise DitlabError(f"optim.batch_size={o.batch_size} is not divisible by world size x "
                              f"train.grad_accum = {micro_per_step}")
        self.micro_batch = o.batch_size // micro_per_step
        resume_from = D.on_main(lambda: prepare_run_dir(self.run_dir, resume), self.env)

        self.dataset = build_dataset(cfg)
        self.codec = None  # encodes pixels on the fly (official DiT); stays None for pixel and latent data
        if cfg.vae.path and cfg.data.source != "latents":
            self.codec = load_codec(cfg.vae, device=self.device)
        self._decoder = self.codec  # decodes sample grids; loaded when first needed for latent data
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_model(cfg).to(self.device)
        check_data(self.dataset, self.codec, model)
        self.objective = build_objective(cfg)
        self.objective.resolve_sampling(cfg.sample.sampler, cfg.sample.steps)  # a typo fails now, not after training
        check_guidance(model, cfg.sample.cfg_scale if model.num_classes > 0 else 1.0)
        self.ema = EMA(model, t.ema_decay, t.ema_warmup)
        if t.fsdp:
            self.model = D.wrap_fsdp(model, self.env)
            self.ema.model = D.wrap_fsdp(self.ema.model, self.env)
        else:
            self.model = D.wrap_ddp(model, self.env) if self.env.enabled else model
        self.raw = model  # the unwrapped module (its parameters are FSDP views under FSDP)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.step = 0
        if resume_from is not None:
            self._load(Path(resume_from))
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        self.order = StepSampler(len(self.dataset), o.batch_size, t.seed)

    # ---- checkpoints --------------------------------------------------------------------------

    def _state_dicts(self) -> tuple[dict, dict, dict]:
        model = self.model if self.cfg.train.fsdp else self.raw
        return D.full_state_dicts(model, self.ema.model, self.optimizer, self.cfg.train.fsdp, self.device)

    def save(self) -> Path | None:
        model_sd, ema_sd, optim_sd = self._state_dicts()
        state = {"step": self.step, "optimizer": optim_sd, "ema_updates": self.ema.num_updates,
                 "data": self.order.position(self.step), "rng": rng_state(), "world_size": self.env.world_size,
                 "objective": self.objective.state_dict()}
        return D.on_main(lambda: ckpt.save_checkpoint(self.run_dir, self.step, model_sd, ema_sd, state, self.cfg,
                                                      keep_last=self.cfg.train.keep_last), self.env)

    def _load(self, step_dir: Path) -> None:
        state = load_state(step_dir)
        model = self.model if self.cfg.train.fsdp else self.raw
        D.load_full_state_dicts(model, self.ema.model, self.optimizer, self.cfg.train.fsdp, self.device,
                                read_weights(step_dir / "model.safetensors"), read_weights(step_dir / "ema.safetensors"),
                                state["optimizer"], str(step_dir))
        self.step = int(state["step"])
        self.ema.num_updates = int(state["ema_updates"])
        objective_state = state.get("objective")
        if objective_state is None and (step_dir / "config.yaml").is_file():
            # Checkpoints of older versions kept a flow's measured data std in their config instead.
            objective_state = {"data_std": load_run_config(step_dir / "config.yaml").objective.data_std}
        self.objective.load_state_dict(objective_state or {})
        if state.get("world_size", 1) == self.env.world_size:
            set_rng_state(state["rng"])  # per-micro-batch seeding makes this a formality, kept for exactness

    # ---- the loop -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr

    def _loader(self, end_step: int) -> DataLoader:
        a = self.cfg.train.grad_accum
        micro = list(range(self.env.rank * a, (self.env.rank + 1) * a))
        sampler = MicroBatches(self.order, self.step, end_step, micro, self.micro_batch)
        w = self.cfg.data.num_workers
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=w, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if w > 0 else None)

    def _micro_step(self, x: Tensor, y: Tensor, m: int, last: bool) -> dict[str, Tensor]:
        seed = mix_seed(self.cfg.train.seed, self.step, m)
        x, y = prepare_batch(x, y, num_classes=self.raw.num_classes, device=self.device,
                             gen_cpu=torch.Generator().manual_seed(seed), codec=self.codec,
                             paired_flip=getattr(self.dataset, "paired_flip", False),
                             random_flip=self.cfg.data.random_flip)
        torch.manual_seed(seed)  # global-RNG draws inside the model (label dropout) are per micro-batch too
        gen = torch.Generator(device=self.device).manual_seed(seed)
        sync = contextlib.nullcontext()
        if self.env.enabled and not last and hasattr(self.model, "no_sync"):
            sync = self.model.no_sync()  # accumulate locally; all-reduce on the last micro-batch
        with sync:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                out = self.objective.loss(self.forward_model, x, y, generator=gen)
            (out["loss"] / self.cfg.train.grad_accum).backward()
        return {k: v.detach().float() for k, v in out.items()}

    def _clip_gradients(self) -> float | None:
        clip = self.cfg.optim.grad_clip
        if not clip:
            return None
        if self.cfg.train.fsdp:
            return float(self.model.clip_grad_norm_(clip))
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))

    def train(self, final_samples: bool = True) -> TrainResult:
        from tqdm import tqdm

        cfg, t, env = self.cfg, self.cfg.train, self.env
        logger = Logger(self.run_dir, t.tensorboard) if env.is_main else None
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.model.train()
        start_step, a = self.step, t.grad_accum
        loader = iter(self._loader(t.steps))
        bar = tqdm(total=t.steps, initial=self.step, disable=not (env.is_main and t.progress), desc="train",
                   dynamic_ncols=True)
        t0, window = time.time(), Window()
        stopped, last_loss, saved_at = "steps", float("nan"), None
        try:
            while self.step < t.steps:
                if t.time_budget_s is not None and self.step > start_step:
                    over = torch.tensor(float(time.time() - t0 > t.time_budget_s))
                    if D.all_reduce_mean(over, env).item() > 0:  # any rank over budget stops all
                        stopped = "time_budget"
                        break
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(self.step)
                terms: dict[str, Tensor] = {}
                for i in range(a):
                    x, y = next(loader)
                    for k, v in self._micro_step(x, y, env.rank * a + i, last=i == a - 1).items():
                        terms[k] = terms.get(k, 0.0) + v / a
                grad_norm = self._clip_gradients()
                names = sorted(terms)
                logged = dict(zip(names, D.all_reduce_mean(torch.stack([terms[k] for k in names]).cpu(), env).tolist()))
                if not math.isfinite(logged["loss"]):
                    last = latest_checkpoint(self.run_dir)
                    raise DitlabError(f"non-finite loss ({logged['loss']}) at step {self.step + 1}; stopped without "
                                      f"saving (last good checkpoint: {last or 'none'}); try a lower optim.lr or set optim.grad_clip")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.model if t.fsdp else self.raw)
                self.step += 1
                last_loss = logged["loss"]
                if grad_norm is not None:
                    logged["grad_norm"] = grad_norm
                window.add(logged)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    row = window.flush(cfg.optim.batch_size)
                    row.update(lr=self.lr_at(self.step - 1), elapsed_s=time.time() - t0)
                    if logger:
                        logger.log(self.step, row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save()
                    saved_at = self.step
                if t.sample_every and self.step % t.sample_every == 0:
                    self.sample_grid()
        finally:
            bar.close()
            if logger:
                logger.close()
        path = None
        if saved_at != self.step and self.step > start_step:
            path = self.save()
        elif saved_at == self.step:
            path = self.run_dir / "checkpoints" / step_dir_name(self.step)
        if final_samples and self.step > start_step and (not t.sample_every or self.step % t.sample_every):
            self.sample_grid()
        elapsed = time.time() - t0
        return TrainResult(self.run_dir, self.step, stopped, elapsed,
                           (self.step - start_step) * cfg.optim.batch_size / max(elapsed, 1e-9), last_loss, path)

    # ---- samples ------------------------------------------------------------------------------

    def ema_run(self) -> Run:
        """The EMA weights as a Run (gathered to every rank under FSDP); pixel runs get no codec."""
        model = self.ema.model
        if self.cfg.train.fsdp:
            _, ema_sd, _ = self._state_dicts()
            model = build_model(self.cfg).to(self.device).eval()
            if self.env.is_main:
                model.load_state_dict(ema_sd)
        if self._decoder is None and self.cfg.vae.path:
            self._decoder = load_codec(self.cfg.vae, device=self.device)
        return Run(self.cfg, model, self.objective, self._decoder, step=self.step)

    def sample_grid(self) -> Path | None:
        """An EMA sample grid in RUN/samples/step_N.png (rank 0), with the config's sampler."""
        run = self.ema_run()
        if not self.env.is_main:
            return None
        k = self.raw.num_classes
        n = min(self.cfg.sample.num_samples, 64) if k == 0 else max(1, min(self.cfg.sample.num_samples, 100) // k) * k
        labels = np.arange(k).repeat(n // k) if k > 0 else np.full(n, -1)
        images, _ = generate(run, labels)
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        save_grid(path, images, nrow=(n // k) if k > 0 else math.ceil(math.sqrt(n)))
        return path
