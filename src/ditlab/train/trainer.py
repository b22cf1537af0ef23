"""The training loop: one Trainer for a 10-minute CPU MNIST run, a multi-node DiT-XL/2 run and a
byte-level language model.

Per step (the official DiT train.py, plus what short and long runs need):
  global batch B -> W ranks x A accumulation micro-batches, each seeded by (seed, step, m)
  loss = objective.loss(model, x, y)  under bf16 autocast on CUDA
  AdamW (or Muon on the blocks' matrices, `optim.py`), LR warm-up then constant or cosine (`schedule.py`),
  optional grad-norm clipping, EMA update
  loss averaged over ranks -> non-finite check -> progress bar, CSV, TensorBoard
  every ckpt_every steps an atomic checkpoint; every sample_every steps EMA samples.

A byte LM (`config.is_language_model`) trains through the same loop on (bytes, next bytes) windows
with next-byte prediction; the image-only steps (label checks, flips, codec, grids) are skipped.

The data order and all randomness are functions of (seed, step) (`order.py`), so a resumed run
continues bit-identically: the checkpoint stores the step, the optimizer, the EMA, the
objective's state and the RNG states.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ditlab.codecs import load_codec
from ditlab.config import Config, is_language_model, load_run_config, save_config, validate
from ditlab.data import build_dataset
from ditlab.errors import DitlabError
from ditlab.models import build_model
from ditlab.models.flops import measure as measure_flops
from ditlab.objectives import build_objective
from ditlab.runs import Run, load_state, prepare_run_dir, read_weights, step_dir_name
from ditlab.train import checkpoint as ckpt
from ditlab.train import distributed as D
from ditlab.train.batch import check_image_run, prepare_batch
from ditlab.train.ema import EMA
from ditlab.train.logger import Logger, Window
from ditlab.train.optim import MuonAdamW
from ditlab.train.order import MicroBatches, StepSampler, mix_seed
from ditlab.train.samples import write_image_grid, write_text_sample
from ditlab.train.schedule import lr_at
from ditlab.train.state import rng_state, seed_all, set_rng_state
from ditlab.train.stop import StopSignals, agreed_stop, ignore_stop_signals
from ditlab.train.threads import ThreadTuner


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "steps" | "time_budget" | "signal"
    elapsed_s: float
    images_per_s: float  # samples per second (text windows for a byte LM)
    last_loss: float
    checkpoint: Path | None
    bytes_per_s: float | None = None  # byte LMs
    signal: int | None = None  # the stop signal (SIGTERM, SIGINT, SIGUSR1) when stopped == "signal"
    fwd_gflops: float | None = None  # image runs: forward Gflops of one image (DiT-paper convention)
    train_gflops: float | None = None  # image runs: cumulative training compute, 3 x fwd_gflops x images seen


def forward_gflops(cfg: Config) -> float | None:
    """Forward Gflops of one image of cfg's model, counted on the meta device (`models/flops.py`).

    Every global RNG (torch, CUDA, numpy, Python) is restored afterwards, so counting leaves the
    run bit-identical. A model the counter cannot trace gets None (a warning; training goes on).
    """
    saved = rng_state()
    try:
        return float(measure_flops(cfg)["gflops"])
    except Exception as e:
        warnings.warn(f"training compute not counted: {type(e).__name__}: {e}")
        return None
    finally:
        set_rng_state(saved)


class Trainer:
    """Build data, model, objective, optimizer and EMA from a Config; `train()` runs the loop."""

    def __init__(self, cfg: Config, *, resume: bool | str | Path = False, device: str | None = None,
                 adapt_threads: bool = False):
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
        resume_from = D.on_main(lambda: prepare_run_dir(self.run_dir, resume, cfg), self.env)

        self.lm = is_language_model(cfg)
        self.dataset = build_dataset(cfg)
        self.codec = None  # encodes pixels on the fly (official DiT); stays None for pixel and latent data
        if cfg.vae.path and cfg.data.source != "latents":
            self.codec = load_codec(cfg.vae, device=self.device)
        self._decoder = self.codec  # decodes sample grids; loaded when first needed for latent data
        seed_all(t.seed)  # identical initial weights on every rank (and identical runs save identical RNG states)
        model = build_model(cfg).to(self.device)
        self.objective = build_objective(cfg)
        if not self.lm:  # an LM's windows are cut to its context by construction; nothing to check
            check_image_run(self.dataset, self.codec, model, self.objective, cfg.sample)
        self.ema = EMA(model, t.ema_decay, t.ema_warmup)
        if t.fsdp:
            self.model = D.wrap_fsdp(model, self.env)
            self.ema.model = D.wrap_fsdp(self.ema.model, self.env)
        else:
            self.model = D.wrap_ddp(model, self.env) if self.env.enabled else model
        self.raw = model  # the unwrapped module (its parameters are FSDP views under FSDP)
        # CPU: the fused AdamW kernel, ~3.5x faster than the per-parameter loop torch picks on CPU (foreach is
        # no faster there); same update up to float rounding. A resumed checkpoint keeps the kind it was saved with.
        fused = True if self.device.type == "cpu" and not t.fsdp else None
        if o.name == "muon":  # whole matrices: DDP's parameters are the unwrapped module's (FSDP is refused)
            self.optimizer = MuonAdamW(model, o, fused)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                               weight_decay=o.weight_decay, fused=fused)
        self.step = 0
        # adapt_threads (CPU): the torch thread count follows the machine's load (`threads.py`; quickstart).
        self.thread_tuner = ThreadTuner(torch.get_num_threads()) if adapt_threads and self.device.type == "cpu" else None
        # Training compute in the DiT paper's convention: train_gflops = 3 x forward Gflops per image
        # x images seen (global batch x steps; a backward pass costs about two forward passes).
        # Image runs only: a byte LM counts none (None).
        self.fwd_gflops = None if self.lm else forward_gflops(cfg)
        self.train_gflops = None if self.fwd_gflops is None else 0.0
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
                 "objective": self.objective.state_dict(), "fwd_gflops": self.fwd_gflops,
                 "train_gflops": self.train_gflops}
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
        if self.train_gflops is not None:  # checkpoints of older versions lack it: as if at the current batch
            saved = state.get("train_gflops")
            self.train_gflops = float(saved) if saved is not None else \
                3 * self.fwd_gflops * self.cfg.optim.batch_size * self.step
        objective_state = state.get("objective")
        if objective_state is None and (step_dir / "config.yaml").is_file():
            # Checkpoints of older versions kept a flow's measured data std in their config instead.
            objective_state = {"data_std": load_run_config(step_dir / "config.yaml").objective.data_std}
        self.objective.load_state_dict(objective_state or {})
        if state.get("world_size", 1) == self.env.world_size:
            set_rng_state(state["rng"])  # per-micro-batch seeding makes this a formality, kept for exactness

    # ---- the loop -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg.optim, step, self.cfg.train.steps)

    def _loader(self, end_step: int) -> DataLoader:
        a = self.cfg.train.grad_accum
        micro = list(range(self.env.rank * a, (self.env.rank + 1) * a))
        sampler = MicroBatches(self.order, self.step, end_step, micro, self.micro_batch)
        w = self.cfg.data.num_workers
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=w, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if w > 0 else None,
                          worker_init_fn=ignore_stop_signals if w > 0 else None)

    def _micro_step(self, x: Tensor, y: Tensor, m: int, last: bool) -> dict[str, Tensor]:
        seed = mix_seed(self.cfg.train.seed, self.step, m)
        if self.lm:  # bytes and the bytes that follow them: nothing to check, flip or encode
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        else:
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

    def train(self, final_samples: bool = True) -> TrainResult:
        from tqdm import tqdm

        cfg, t, env = self.cfg, self.cfg.train, self.env
        logger = Logger(self.run_dir, t.tensorboard, start_step=self.step) if env.is_main else None
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.model.train()
        start_step, a = self.step, t.grad_accum
        loader = iter(self._loader(t.steps))
        # Off a terminal (a log file, CI) a bar would write a line per step: print a plain line per log step instead.
        tty = sys.stderr.isatty()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (env.is_main and t.progress and tty), desc="train",
                   dynamic_ncols=True)
        t0, window = time.time(), Window()
        unit, per_step = ("bytes", cfg.optim.batch_size * cfg.model.lm_seq_len) if self.lm else ("img", cfg.optim.batch_size)
        stopped, last_loss, saved_at = "steps", float("nan"), None
        signals, stop_signal = StopSignals().install(), None  # a stop signal ends the loop after its step
        try:
            while self.step < t.steps:
                over = t.time_budget_s is not None and self.step > start_step and time.time() - t0 > t.time_budget_s
                over, stop_signal = agreed_stop(env, over, signals)  # any rank over budget or signalled stops all
                if over or stop_signal:
                    stopped = "signal" if stop_signal else "time_budget"
                    break
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(self.step)
                terms: dict[str, Tensor] = {}
                for i in range(a):
                    x, y = next(loader)
                    for k, v in self._micro_step(x, y, env.rank * a + i, last=i == a - 1).items():
                        terms[k] = terms.get(k, 0.0) + v / a
                grad_norm = D.clip_gradients(self.model, cfg.optim.grad_clip, t.fsdp)
                names = sorted(terms)
                # reduced where the terms live (NCCL takes device tensors only), then one read-back
                logged = dict(zip(names, D.all_reduce_mean(torch.stack([terms[k] for k in names]), env).cpu().tolist()))
                if not math.isfinite(logged["loss"]):
                    raise DitlabError(f"non-finite loss ({logged['loss']}) at step {self.step + 1}; stopped without "
                                      f"saving ({ckpt.last_good(self.run_dir, self.step)}); try a lower optim.lr or set optim.grad_clip")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.raw)  # under FSDP (use_orig_params) these are the wrapper's own shard views
                self.step += 1
                if self.thread_tuner is not None and self.thread_tuner.after_step() != torch.get_num_threads():
                    torch.set_num_threads(self.thread_tuner.threads)
                if self.train_gflops is not None:
                    self.train_gflops += 3 * self.fwd_gflops * cfg.optim.batch_size
                last_loss = logged["loss"]
                if grad_norm is not None:
                    logged["grad_norm"] = grad_norm
                window.add(logged)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    row = window.flush(per_step, unit)
                    row.update(lr=self.lr_at(self.step - 1), elapsed_s=time.time() - t0)
                    if self.train_gflops is not None:
                        row["train_gflops"] = self.train_gflops
                    if self.thread_tuner is not None:
                        row["threads"] = torch.get_num_threads()
                    if logger:
                        logger.log(self.step, row)
                        if t.progress and not tty:
                            print(f"train step {self.step}/{t.steps}: loss {row['loss']:.4f}, "
                                  f"{row[f'{unit}_per_s']:.0f} {unit}/s", file=sys.stderr, flush=True)
                        bar.set_postfix({"loss": f"{row['loss']:.4f}", f"{unit}_s": f"{row[f'{unit}_per_s']:.0f}"})
                if t.ckpt_every and self.step % t.ckpt_every == 0:
                    self.save()
                    saved_at = self.step
                if t.sample_every and self.step % t.sample_every == 0:
                    self.write_samples()
        finally:
            signals.restore()
            bar.close()
            if logger:
                logger.close()
        path = None
        if saved_at != self.step and self.step > start_step:
            path = self.save()
        elif saved_at == self.step:
            path = self.run_dir / "checkpoints" / step_dir_name(self.step)
        if final_samples and not stop_signal and self.step > start_step and (not t.sample_every or self.step % t.sample_every):
            self.write_samples()
        elapsed = time.time() - t0
        per_s = (self.step - start_step) * cfg.optim.batch_size / max(elapsed, 1e-9)
        return TrainResult(self.run_dir, self.step, stopped, elapsed, per_s, last_loss, path,
                           bytes_per_s=per_s * cfg.model.lm_seq_len if self.lm else None, signal=stop_signal,
                           fwd_gflops=self.fwd_gflops, train_gflops=self.train_gflops)

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

    def write_samples(self) -> Path | None:
        """EMA samples (rank 0): a grid RUN/samples/step_N.png with the config's sampler, or a
        byte LM's continuation of sample.prompt in RUN/samples/step_N.txt."""
        run = self.ema_run()
        if not self.env.is_main:
            return None
        stem = self.run_dir / "samples" / f"step_{self.step:07d}"
        return write_text_sample(run, stem) if self.lm else write_image_grid(run, stem)
