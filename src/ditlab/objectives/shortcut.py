"""Shortcut models (Frans, Hafner, Levine, Abbeel 2024, "One Step Diffusion via Shortcut Models").

The network s(x_t, t, d) is also conditioned on a step size d and predicts the average velocity
over a step of size d, so that one step moves x_t to x_{t-d} = x_t - d * s(x_t, t, d).
Same time convention as `flow.py`: x_t = (1 - t) x0 + t eps, **t = 1 is noise, t = 0 is data**,
velocity v = eps - x0, and the model is called as `model(x_t, 1000 t, y, dt=1000 d)`: the step
size in the same 0..1000 units as t, so its sinusoidal embedding separates d = 1/128 from 1/64.

Training, per batch (B rows):
- the first round(B * fraction) rows train self-consistency ("bootstrap"): d = 2^-k with
  k uniform in 0..log2(base_steps)-1, t uniform on the grid {d, 2d, ..., 1}, and the target is
  the mean of two half steps of the model itself (no gradient):
      v1 = s(x_t, t, d/2);  v2 = s(x_t - d/2 v1, t - d/2, d/2);  target = (v1 + v2) / 2
- the other rows train flow matching at the smallest step of the base grid, d = 1/base_steps
  (as the paper's code does; its d = 0 is the limit), t uniform on {1/base, ..., 1}, target eps - x0.
Sampling: `steps` a power of two <= base_steps, d = 1/steps, x <- x - d s(x, t, d) from t = 1.
Label dropout (for classifier-free guidance) is drawn once per batch by the objective, as in the
paper's code, and the same labels (a dropped row gets the null label) go to the target passes and
the prediction pass; the model's own random dropout is switched off with `force_drop_ids`.
Otherwise an unconditional prediction would regress onto a conditional target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ditlab.errors import DitlabError
from ditlab.objectives.base import Objective, mean_flat, randn_like
from ditlab.objectives.guidance import check_guidance, check_interval, guided_forward, scale_at


def _expand(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


class ShortcutObjective(Objective):
    name = "shortcut models"
    samplers = ("shortcut",)
    default_steps = 4

    def __init__(self, fraction: float = 0.25, base_steps: int = 128, guidance_interval=None,
                 num_classes: int = 0, class_dropout_prob: float = 0.0):
        if not 0.0 <= fraction <= 1.0:
            raise DitlabError(f"objective.shortcut_fraction must be in [0, 1], got {fraction}")
        if base_steps < 2 or base_steps & (base_steps - 1):
            raise DitlabError(f"objective.shortcut_base_steps must be a power of two >= 2, got {base_steps}")
        self.fraction = fraction
        self.base_steps = base_steps
        self.levels = int(math.log2(base_steps))  # k = 0..levels-1 for bootstrap, d = 2^-k
        self.guidance_interval = check_interval(guidance_interval)
        self.num_classes = num_classes  # label dropout is done here (see the module docstring)
        self.class_dropout_prob = class_dropout_prob if num_classes > 0 else 0.0

    @classmethod
    def from_config(cls, cfg) -> "ShortcutObjective":
        o = cfg.objective  # fields of other kinds are refused by ditlab.config.validate
        return cls(o.shortcut_fraction, o.shortcut_base_steps, cfg.sample.guidance_interval,
                   cfg.model.num_classes, cfg.model.class_dropout_prob)

    def check_sampling(self, sampler: str, steps: int | None) -> None:
        super().check_sampling(sampler, 1)  # the sampler name; the steps are checked here
        if not isinstance(steps, int) or not 1 <= steps <= self.base_steps or steps & (steps - 1):
            raise DitlabError(f"shortcut sampling steps must be a power of two from 1 to {self.base_steps} "
                              f"(objective.shortcut_base_steps), got {steps}")

    def call(self, model: nn.Module, x: Tensor, t: Tensor, y: Tensor, d: Tensor, **kw) -> Tensor:
        """s(x, t, d): the model's average velocity over a step of size d (t, d in [0, 1], shape [B])."""
        return model(x, t * 1000.0, y, dt=d * 1000.0, **kw)[:, : x.shape[1]]

    def drop_labels(self, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        """Labels with a class_dropout_prob share replaced by the null label, and the model keyword
        that switches the model's own dropout off (empty when there is no dropout to do)."""
        if self.class_dropout_prob <= 0:
            return y, {}
        g = generator.device if generator is not None else y.device
        drop = (torch.rand(y.shape[0], device=g, generator=generator) < self.class_dropout_prob).to(y.device)
        return torch.where(drop, self.num_classes, y), {"force_drop_ids": torch.zeros_like(y)}

    def draw(self, n: int, device=None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, int]:
        """Times t, step sizes d (both [n]) and the number of bootstrap rows (the first ones)."""
        nb = int(round(n * self.fraction))
        g = generator.device if generator is not None else device  # draw where the generator lives
        k = torch.randint(0, self.levels, (nb,), device=g, generator=generator)
        d_boot = 2.0 ** (-k.float())
        # t = j d with j uniform in 1..2^k
        j = torch.floor(torch.rand(nb, device=g, generator=generator) * 2.0**k) + 1
        t_boot = j * d_boot
        jf = torch.randint(1, self.base_steps + 1, (n - nb,), device=g, generator=generator).float()
        t_flow = jf / self.base_steps
        d_flow = torch.full((n - nb,), 1.0 / self.base_steps, device=g)
        return torch.cat([t_boot, t_flow]).to(device), torch.cat([d_boot, d_flow]).to(device), nb

    @torch.no_grad()
    def bootstrap_target(self, model: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, d: Tensor) -> Tensor:
        """Mean velocity of two half steps of size d/2 from (x_t, t): the self-consistency target."""
        was_training = model.training
        model.eval()  # no label dropout here: the labels arrive already dropped (see the module docstring)
        try:
            h = d / 2
            v1 = self.call(model, x_t, t, y, h)
            x_mid = x_t - _expand(h, x_t) * v1
            v2 = self.call(model, x_mid, t - h, y, h)
        finally:
            model.train(was_training)
        return (v1 + v2) / 2

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        n = x0.shape[0]
        t, d, nb = self.draw(n, x0.device, generator)
        eps = randn_like(x0, generator)
        x_t = (1 - _expand(t, x0)) * x0 + _expand(t, x0) * eps
        target = eps - x0
        y, keep_labels = self.drop_labels(y, generator)
        if nb > 0:
            boot = self.bootstrap_target(model, x_t[:nb], t[:nb], y[:nb], d[:nb])
            target = torch.cat([boot, target[nb:]])
        pred = self.call(model, x_t, t, y, d, **keep_labels)
        err = mean_flat((pred.float() - target.float()) ** 2)
        out = {"loss": err.mean()}
        if nb > 0:
            out["loss_boot"] = err[:nb].mean().detach()
        if nb < n:
            out["loss_flow"] = err[nb:].mean().detach()
        return out

    def sample(
        self,
        model: nn.Module,
        noise: Tensor,
        y: Tensor,
        *,
        sampler: str = "shortcut",
        steps: int = 4,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] | list[float] | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
        generator: torch.Generator | None = None,
        **options,
    ) -> Tensor:
        """`steps` shortcut steps of size 1/steps from t = 1 (noise) to t = 0; NFE = steps."""
        if options:
            raise DitlabError(f"shortcut sampling got unknown options: {', '.join(sorted(options))}")
        self.check_sampling(sampler, steps)
        check_guidance(model, cfg_scale)
        interval = self.guidance_interval if guidance_interval is None else check_interval(guidance_interval)
        b = noise.shape[0]
        d = torch.full((b,), 1.0 / steps, device=noise.device, dtype=noise.dtype)
        x = noise
        self.last_nfe = 0
        it = range(steps)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"shortcut {steps} steps")
        with torch.no_grad():
            for i in it:
                t = 1.0 - i / steps
                scale = scale_at(cfg_scale, t, interval)
                tt = torch.full((b,), t, device=noise.device, dtype=noise.dtype)
                v = guided_forward(model, x, tt * 1000.0, y, scale, dt=d * 1000.0)[:, : x.shape[1]]
                self.last_nfe += 1
                x = x - (1.0 / steps) * v
        return x.clamp(-1, 1) if clip_denoised else x
