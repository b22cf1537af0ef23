"""The interface every training objective implements (Gaussian diffusion, flow matching, shortcut).

The trainer, `ditlab sample` and `ditlab eval` only talk to an objective through these two calls,
so any model (DiT variant or U-Net) trains and samples with any objective.

Model convention: `model(x, t, y, **kw) -> out` with x [B,C,H,W], t a float or long tensor [B],
y a long tensor [B] of labels (index `model.num_classes` is the null label used by
classifier-free guidance; ignored when `model.num_classes == 0`). The model exposes
`in_channels`, `out_channels`, `learn_sigma`, `num_classes` and `input_size`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class Objective(Protocol):
    samplers: tuple[str, ...]  # names accepted by `sample(sampler=...)`; the first is the default

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training loss of a batch: dict with 'loss' (scalar mean, to backprop) and scalar extras to log."""
        ...

    def sample(
        self,
        model: nn.Module,
        noise: Tensor,
        y: Tensor,
        *,
        sampler: str,
        steps: int,
        cfg_scale: float = 1.0,
        clip_denoised: bool = True,
        progress: bool = False,
        generator: torch.Generator | None = None,
        **options,
    ) -> Tensor:
        """Turn `noise` (the prior sample, shape of the data) into data-space samples."""
        ...
