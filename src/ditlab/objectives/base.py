"""The interface every training objective implements (Gaussian diffusion, flow matching, shortcut).

The trainer and `ditlab.sampling.generate` only talk to an objective through this class, so any
model (DiT variant or U-Net) trains and samples with any objective, and no caller needs to
know which objective it holds.

Model convention: `model(x, t, y, **kw) -> out` with x [B,C,H,W], t a float or long tensor [B],
y a long tensor [B] of labels (index `model.num_classes` is the null label used by
classifier-free guidance; ignored when `model.num_classes == 0`). The model exposes
`in_channels`, `out_channels`, `learn_sigma`, `num_classes` and `input_size`.
(Next-byte prediction, `next_byte.py`, trains language models: `model(x) -> logits`.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ditlab.errors import DitlabError


class Objective:
    """Training loss and sampler of one generative objective.

    `samplers` names the samplers `sample` accepts; the first is the default, run for
    `default_steps` steps when a config leaves `sample.sampler` / `sample.steps` unset.
    `last_nfe` is the number of model calls of the last `sample` (a guided call counts once).
    """

    name: str = "this objective"  # for messages
    samplers: tuple[str, ...] = ()
    default_steps: int = 250
    last_nfe: int = 0

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]

    def check_sampling(self, sampler: str, steps: int | None) -> None:
        """One DitlabError line if `sample(sampler=..., steps=...)` cannot run."""
        if sampler not in self.samplers:
            raise DitlabError(f"unknown sampler '{sampler}' for {self.name} (choose {', '.join(self.samplers)})")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise DitlabError(f"sampling steps must be a positive integer, got {steps}")

    def resolve_sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """(sampler, steps) with None replaced by the objective's defaults, checked."""
        sampler = self.default_sampler if sampler is None else sampler
        steps = self.default_steps if steps is None else steps
        self.check_sampling(sampler, steps)
        return sampler, steps

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training loss of a batch: dict with 'loss' (scalar mean, to backprop) and scalar extras to log."""
        raise NotImplementedError

    def sample(
        self,
        model: nn.Module,
        noise: Tensor,
        y: Tensor,
        *,
        sampler: str,
        steps: int,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] | list[float] | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
        generator: torch.Generator | None = None,
        **options,
    ) -> Tensor:
        """Turn `noise` (the prior sample, shape of the data) into data-space samples.

        `guidance_interval` = None uses the objective's own (from `sample.guidance_interval`).
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Training state saved with each checkpoint (empty for a stateless objective)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


# Shared by every objective.
def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=list(range(1, x.ndim)))


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x (its dtype and device).

    With a `generator` the noise is drawn on the generator's device and moved to x's, so a CPU
    generator gives the same numbers for CUDA data; without one it comes from torch's global RNG
    as `torch.randn_like` (the official DiT sampling loops' draw order).
    """
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
