"""The training loop: one Trainer for a 10-minute CPU MNIST run and a multi-node DiT-XL/2 run.

Per step (official DiT train.py, plus what short and long runs need):
  global batch B -> W ranks x A accumulation micro-batches, each seeded by (seed, step, m)
  loss = objective.loss(model, x, y)  under bf16 autocast on CUDA
  AdamW with linear LR warm-up, optional grad-norm clipping, EMA update (with decay warm-up)
  loss averaged over ranks -> non-finite check -> progress bar, CSV, TensorBoard
  every ckpt_every steps an atomic checkpoint; every sample_every steps an EMA sample grid.

The data order and all randomness are functions of (seed, step), so a resumed run continues
bit-identically: the checkpoint stores the step, the optimizer, the EMA and the RNG states.
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from ditlab.config import Config, save_config
from ditlab.errors import DitlabError
from ditlab.train import checkpoint as ckpt
from ditlab.train import distributed as D
from ditlab.train.ema import EMA


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), for per-step/micro-batch RNGs."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return (int(a) << 31 | int(b)) & 0x7FFF_FFFF_FFFF_FFFF


class StepSampler:
    """Seeded data order: the concatenation of per-epoch permutations, cut into global batches.

    Step s takes stream positions [s*B, (s+1)*B); epoch e's permutation is seeded by (seed, e).
    The position in the data is thus a function of the step, so resume needs only the step.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        self.n, self.batch, self.seed = num_samples, global_batch, seed
        self._perms: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xDA7A))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)
        epoch, offset = pos // self.n, pos % self.n
        out = torch.empty_like(offset)
        for e in epoch.unique().tolist():
            sel = epoch == e
            out[sel] = self.permutation(e)[offset[sel]]
        return out

    def position(self, step: int) -> dict:
        p = step * self.batch
        return {"epoch": p // self.n, "offset": p % self.n, "step": step}


class _MicroBatches(Sampler):
    """Yields this rank's micro-batch index lists, step after step, from `start_step` on."""

    def __init__(self, order: StepSampler, start_step: int, end_step: int, micro: list[int], per_micro: int):
        self.order, self.start, self.end, self.micro, self.b = order, start_step, end_step, micro, per_micro

    def __iter__(self):
        for step in range(self.start, self.end):
            idx = self.order.indices(step)
            for m in self.micro:
                yield idx[m * self.b : (m + 1) * self.b].tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * len(self.micro)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: str  # "steps" | "time_budget"
    elapsed_s: float
    images_per_s: float
    last_loss: float
    checkpoint: Path | None


def _check_config(cfg: Config) -> None:
    """One-line errors for optimizer/loop settings that would otherwise crash mid-run with a traceback."""
    o, t = cfg.optim, cfg.train
    checks = [
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (t.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0 = only at the end), got {t.ckpt_every}"),
        (t.sample_every >= 0, f"train.sample_every must be >= 0 (0 = only at the end), got {t.sample_every}"),
        (t.keep_last >= 0, f"train.keep_last must be >= 0 (0 = keep every checkpoint), got {t.keep_last}"),
        (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (t.time_budget_s is None or t.time_budget_s >= 0, f"train.time_budget_s must be >= 0 seconds, got {t.time_budget_s}"),
        (o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}"),
        (o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be > 0, got {o.lr}"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}"),
        (o.grad_clip is None or o.grad_clip >= 0, f"optim.grad_clip must be > 0 (or null/0 = off), got {o.grad_clip}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DitlabError(message)


def check_sample_config(model: nn.Module, objective, cfg: Config) -> None:
    """Validate the sample section up front, so a typo fails before training rather than after it."""
    from ditlab.diffusion.guidance import check_guidance
    from ditlab.sampling import pick_sampler

    s = cfg.sample
    sampler = pick_sampler(objective, s.sampler)
    if hasattr(objective, "spaced"):  # Gaussian: the respacing itself checks 2 <= steps <= T
        objective.spaced(sampler, s.steps)
    elif hasattr(objective, "base_steps"):  # shortcut: the step sizes it was trained on
        b = objective.base_steps
        if not isinstance(s.steps, int) or s.steps < 1 or s.steps > b or s.steps & (s.steps - 1):
            raise DitlabError(f"sample.steps must be a power of two from 1 to objective.shortcut_base_steps={b} "
                              f"for shortcut sampling, got {s.steps}")
    elif sampler != "dopri5" and (not isinstance(s.steps, int) or s.steps < 1):
        raise DitlabError(f"sample.steps must be a positive integer, got {s.steps}")
    check_guidance(model, s.cfg_scale)


class Trainer:
    """Build data, model, objective, optimizer and EMA from a Config; `train()` runs the loop."""

    def __init__(self, cfg: Config, *, resume: bool | str | Path = False, device: str | None = None):
        from ditlab.data import build_dataset
        from ditlab.diffusion import build_objective
        from ditlab.models import build_model

        _check_config(cfg)
        self.cfg, t = cfg, cfg.train
        self.env = D.setup(device)
        self.device = self.env.device
        self.run_dir = Path(t.out_dir)
        self.bf16 = self._precision()
        self.micro_per_step = self.env.world_size * t.grad_accum
        if cfg.optim.batch_size % self.micro_per_step:
            raise DitlabError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by world size x "
                              f"train.grad_accum = {self.micro_per_step}")
        self.micro_batch = cfg.optim.batch_size // self.micro_per_step
        resume_from = self._prepare_run_dir(resume)

        self.dataset = build_dataset(cfg)
        self.codec = None
        if cfg.vae.path and cfg.data.source != "latents":  # encode pixels on the fly (official DiT)
            from ditlab.models.codec import load_codec

            self.codec = load_codec(cfg.vae, device=self.device)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_model(cfg).to(self.device)
        self._check_data(model)
        self.objective = build_objective(cfg)
        check_sample_config(model, self.objective, cfg)
        self.ema = EMA(model, t.ema_decay, t.ema_warmup)
        if t.fsdp:
            self.model = D.wrap_fsdp(model, self.env)
            self.ema.model = D.wrap_fsdp(self.ema.model, self.env)
        elif self.env.enabled:
            self.model = D.wrap_ddp(model, self.env)
        else:
            self.model = model
        self.raw = model  # the unwrapped module (its parameters are FSDP views under FSDP)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.step = 0
        if resume_from is not None:
            self._load(resume_from)
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        self.order = StepSampler(len(self.dataset), o.batch_size, t.seed)

    # ---- setup helpers ------------------------------------------------------------------------

    def _precision(self) -> bool:
        p = self.cfg.train.precision
        if p not in ("auto", "fp32", "bf16"):
            raise DitlabError(f"train.precision must be auto, fp32 or bf16, got '{p}'")
        if p == "bf16" and self.device.type != "cuda":
            raise DitlabError("train.precision=bf16 needs CUDA (bf16 autocast); CPU trains in fp32")
        return self.device.type == "cuda" and p in ("auto", "bf16")

    def _prepare_run_dir(self, resume: bool | str | Path) -> Path | None:
        """Create/check the run dir on rank 0; returns the step dir to resume from (or None)."""
        err, found = None, None
        if self.env.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                err = f"output folder {self.run_dir} is not writable: {e.strerror or e}"
            if err is None:
                try:
                    latest = ckpt.latest_checkpoint(self.run_dir)
                    if resume and resume is not True:
                        found = str(ckpt.resolve_checkpoint(resume)[0].parent)
                    elif resume:
                        if latest is None:
                            raise DitlabError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
                        found = str(latest)
                    elif latest is not None:
                        raise DitlabError(f"{self.run_dir} already holds checkpoints (latest {latest.name}); "
                                          "pass --resume to continue it or choose another train.out_dir")
                except DitlabError as e:
                    err = str(e)
        err, found = D.broadcast_object((err, found), self.env)
        if err:
            raise DitlabError(err)
        return Path(found) if found else None

    def _check_data(self, model: nn.Module) -> None:
        x, y = self.dataset[0]
        if self.codec is not None:
            from ditlab.models.codec import latent_shape

            shape = latent_shape(self.codec, x.shape[-1], x.shape[0])
        else:
            shape = tuple(x.shape)
            if getattr(self.dataset, "paired_flip", False):
                shape = (shape[0] // 2, *shape[1:])
        want = (model.in_channels, model.input_size, model.input_size)
        if tuple(shape) != want:
            raise DitlabError(f"data gives samples of shape {list(shape)} but the model expects {list(want)} "
                              "(model.in_channels, model.input_size; data.image_size)")
        k = model.num_classes
        data_classes = int(getattr(self.dataset, "num_classes", 0))
        if k > 0 and data_classes > k:
            raise DitlabError(f"data has labels 0..{data_classes - 1} but model.num_classes is {k}")

    # ---- checkpoints --------------------------------------------------------------------------

    def _state_dicts(self) -> tuple[dict, dict, dict]:
        """Full model, EMA and optimizer state dicts (collective under FSDP; rank 0 gets them)."""
        if self.cfg.train.fsdp:
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.fsdp")
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            offload = self.device.type == "cuda"  # CPU offload of CPU tensors crashes (torch 2.13, gloo)
            full = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
            optim_full = FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True)
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, full, optim_full):
                model_sd = self.model.state_dict()
                optim_sd = FSDP.optim_state_dict(self.model, self.optimizer)
            with FSDP.state_dict_type(self.ema.model, StateDictType.FULL_STATE_DICT, full):
                ema_sd = self.ema.model.state_dict()
            return model_sd, ema_sd, optim_sd
        return self.raw.state_dict(), self.ema.model.state_dict(), self.optimizer.state_dict()

    def save(self) -> Path | None:
        model_sd, ema_sd, optim_sd = self._state_dicts()
        path, err = None, None
        if self.env.is_main:
            state = {
                "step": self.step,
                "optimizer": optim_sd,
                "ema_updates": self.ema.num_updates,
                "data": self.order.position(self.step),
                "rng": _rng_state(),
                "world_size": self.env.world_size,
            }
            objective_state = getattr(self.objective, "state_dict", None)
            if objective_state is not None:  # e.g. the loss-second-moment sampler's loss history
                state["objective"] = objective_state()
            try:
                path = ckpt.save_checkpoint(self.run_dir, self.step, model_sd, ema_sd, state, self.cfg,
                                            keep_last=self.cfg.train.keep_last)
            except DitlabError as e:
                err = str(e)
        err = D.broadcast_object(err, self.env)
        if err:
            raise DitlabError(err)
        return path

    def _load(self, step_dir: Path) -> None:
        from ditlab.models.loading import load_weights

        state = ckpt.load_state(step_dir)
        model_sd = ckpt.read_weights(step_dir / "model.safetensors")
        ema_sd = ckpt.read_weights(step_dir / "ema.safetensors")
        if self.cfg.train.fsdp:
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.fsdp")
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            full = FullStateDictConfig(offload_to_cpu=self.device.type == "cuda", rank0_only=False)
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, full):
                load_weights(self.model, model_sd, source=str(step_dir / "model.safetensors"))
                osd = FSDP.optim_state_dict_to_load(self.model, self.optimizer, state["optimizer"])
            with FSDP.state_dict_type(self.ema.model, StateDictType.FULL_STATE_DICT, full):
                load_weights(self.ema.model, ema_sd, source=str(step_dir / "ema.safetensors"))
        else:
            load_weights(self.raw, model_sd, source=str(step_dir / "model.safetensors"))
            load_weights(self.ema.model, ema_sd, source=str(step_dir / "ema.safetensors"))
            osd = state["optimizer"]
        try:
            self.optimizer.load_state_dict(osd)
        except (ValueError, KeyError) as e:
            raise DitlabError(f"optimizer state in {step_dir} does not fit this model/config: {e}") from None
        self.step = int(state["step"])
        self.ema.num_updates = int(state["ema_updates"])
        if "objective" in state and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])
        if state.get("world_size", 1) == self.env.world_size:
            _set_rng_state(state["rng"])  # per-micro-batch seeding makes this a formality, kept for exactness

    # ---- the loop -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr

    def _loader(self, end_step: int) -> DataLoader:
        a = self.cfg.train.grad_accum
        micro = list(range(self.env.rank * a, (self.env.rank + 1) * a))
        sampler = _MicroBatches(self.order, self.step, end_step, micro, self.micro_batch)
        w = self.cfg.data.num_workers
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=w, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if w > 0 else None)

    def _prepare(self, x: Tensor, y: Tensor, gen_cpu: torch.Generator) -> tuple[Tensor, Tensor]:
        k = self.raw.num_classes
        if k > 0 and len(y):  # checked on the CPU batch: no device sync per micro-batch
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                raise DitlabError(f"label {hi if hi >= k else lo} out of range 0..{k - 1} (model.num_classes)")
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if getattr(self.dataset, "paired_flip", False):  # latents of the image and of its mirror
            c = x.shape[1] // 2
            flip = (torch.rand(len(x), generator=gen_cpu) < 0.5).to(self.device).view(-1, 1, 1, 1)
            x = torch.where(flip, x[:, c:], x[:, :c])
        elif self.cfg.data.random_flip:
            flip = (torch.rand(len(x), generator=gen_cpu) < 0.5).to(self.device).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        if self.codec is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, (1,), generator=gen_cpu)))
            x = self.codec.encode(x, generator=gen)
        return x, y

    def _micro_step(self, x: Tensor, y: Tensor, m: int, last: bool) -> dict[str, Tensor]:
        seed = mix_seed(self.cfg.train.seed, self.step, m)
        gen_cpu = torch.Generator().manual_seed(seed)
        x, y = self._prepare(x, y, gen_cpu)
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
        logger = _Logger(self.run_dir, cfg, env.is_main) if env.is_main else None
        if env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.model.train()
        start_step, a = self.step, t.grad_accum
        loader = iter(self._loader(t.steps))
        bar = tqdm(total=t.steps, initial=self.step, disable=not (env.is_main and t.progress), desc="train",
                   dynamic_ncols=True)
        t0 = time.time()
        window = {"n": 0, "images": 0, "t": time.time()}
        sums: dict[str, float] = {}
        stopped, last_loss, saved_at, img_s = "steps", float("nan"), None, 0.0
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
                    out = self._micro_step(x, y, env.rank * a + i, last=i == a - 1)
                    for k, v in out.items():
                        terms[k] = terms.get(k, 0.0) + v / a
                grad_norm = None
                if cfg.optim.grad_clip:
                    params = self.model.parameters()
                    clip = getattr(self.model, "clip_grad_norm_", None) if t.fsdp else None
                    grad_norm = clip(cfg.optim.grad_clip) if clip else torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                names = sorted(terms)
                stats = D.all_reduce_mean(torch.stack([terms[k] for k in names]).cpu(), env)
                logged = dict(zip(names, stats.tolist()))
                if not math.isfinite(logged["loss"]):
                    last = ckpt.latest_checkpoint(self.run_dir)
                    raise DitlabError(f"non-finite loss ({logged['loss']}) at step {self.step + 1}; stopped without "
                                      f"saving (last good checkpoint: {last or 'none'}); try a lower optim.lr or set optim.grad_clip")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.model if t.fsdp else self.raw)
                self.step += 1
                last_loss = logged["loss"]
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm)
                for k, v in logged.items():
                    sums[k] = sums.get(k, 0.0) + v
                window["n"] += 1
                window["images"] += cfg.optim.batch_size
                if env.is_main:
                    bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    dt = max(time.time() - window["t"], 1e-9)
                    img_s = window["images"] / dt
                    row = {k: v / window["n"] for k, v in sums.items()}
                    row.update(lr=self.lr_at(self.step - 1), img_per_s=img_s, elapsed_s=time.time() - t0)
                    if logger:
                        logger.log(self.step, row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{img_s:.0f}")
                    sums, window = {}, {"n": 0, "images": 0, "t": time.time()}
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
            path = self.run_dir / "checkpoints" / ckpt.step_dir_name(self.step)
        if final_samples and self.step > start_step and (not t.sample_every or self.step % t.sample_every):
            self.sample_grid()
        elapsed = time.time() - t0
        done = self.step - start_step
        return TrainResult(self.run_dir, self.step, stopped, elapsed,
                           done * cfg.optim.batch_size / max(elapsed, 1e-9), last_loss, path)

    # ---- samples ------------------------------------------------------------------------------

    def ema_model(self) -> nn.Module:
        """A plain module holding the EMA weights (gathered to every rank under FSDP)."""
        if not self.cfg.train.fsdp:
            return self.ema.model
        from ditlab.models import build_model

        _, ema_sd, _ = self._state_dicts()
        model = build_model(self.cfg).to(self.device).eval()
        if self.env.is_main:
            model.load_state_dict(ema_sd)
        return model

    def sample_grid(self) -> Path | None:
        """An EMA sample grid in RUN/samples/step_N.png (rank 0), with the config's sampler."""
        model = self.ema_model()
        if not self.env.is_main:
            return None
        from ditlab.images import save_grid

        k = self.raw.num_classes
        n = min(self.cfg.sample.num_samples, 64) if k == 0 else max(1, min(self.cfg.sample.num_samples, 100) // k) * k
        labels = np.arange(k).repeat(n // k) if k > 0 else np.full(n, -1)
        images, _ = sample_images(model, self.objective, self.cfg, labels, codec=self.codec_for_sampling())
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        save_grid(path, images, nrow=(n // k) if k > 0 else math.ceil(math.sqrt(n)))
        return path

    def codec_for_sampling(self):
        if self.codec is not None or not self.cfg.vae.path:
            return self.codec
        from ditlab.models.codec import load_codec

        self.codec = load_codec(self.cfg.vae, device=self.device)  # latents source: decode grids
        return self.codec


def sample_images(model: nn.Module, objective, cfg: Config, labels, *, codec=None):
    """(uint8 [N, H, W, C], labels) from `ditlab.sampling.generate` with the config's sample section."""
    from ditlab.sampling import generate, pick_sampler, sampler_options

    s = cfg.sample
    sampler = pick_sampler(objective, s.sampler)
    options = sampler_options(cfg, sampler)
    cfg_scale = s.cfg_scale if model.num_classes > 0 else 1.0
    return generate(model, objective, labels, sampler=sampler, steps=s.steps, cfg_scale=cfg_scale, seed=s.seed,
                    batch_size=s.batch_size, codec=codec, clip_denoised=s.clip_denoised if codec is None else False,
                    **options)


class _Logger:
    """CSV (RUN/log.csv) and TensorBoard (RUN/tb) scalars, written by rank 0 only."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool):
        self.path = run_dir / "log.csv"
        self.fields: list[str] | None = None
        if self.path.is_file():
            with open(self.path) as f:
                self.fields = next(csv.reader(f), None)
        self.tb = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, row: dict[str, float]) -> None:
        row = {"step": step, **row}
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
