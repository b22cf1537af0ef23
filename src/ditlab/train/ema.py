"""Exponential moving average of model weights (DiT: decay 0.9999, updated every step).

With warm-up the decay at update n is min(d, (1 + n) / (10 + n)) (as in TF's
ExponentialMovingAverage with num_updates). Without it, an EMA started from DiT's
zero-initialised output layers still holds d^n of them after n steps (0.9999^1400 = 87%),
so short runs would sample from a mostly-untrained average (field notes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)  # ema += (1 - d) * (p - ema)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
