"""Classifier-free guidance for any model: one batched forward of cond + uncond halves, and the
guidance interval (guide only at noise levels t in [t_lo, t_hi], t = 1 noise, t = 0 data)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ditlab.errors import DitlabError

Interval = tuple[float, float]


def check_guidance(model: nn.Module, cfg_scale: float) -> None:
    if cfg_scale != 1.0 and getattr(model, "num_classes", 0) == 0:
        raise DitlabError(f"cfg_scale={cfg_scale} needs a class-conditional model; this one has num_classes=0")
    # Every ditlab label encoder says whether its null input was trained (label dropout on);
    # an official-style table without it has no null row.
    embedder = getattr(model, "y_embedder", None)
    table = getattr(embedder, "embedding_table", None)
    has_null = getattr(embedder, "has_null", table is None or table.num_embeddings > model.num_classes)
    if cfg_scale != 1.0 and not has_null:
        raise DitlabError(f"cfg_scale={cfg_scale} needs a null label, but this model was built with "
                          "class_dropout_prob=0 (it never learned the unconditional input)")


def check_interval(interval) -> Interval | None:
    """[t_lo, t_hi] as a checked tuple (None: guide at every step)."""
    if interval is None:
        return None
    if len(interval) != 2 or not (0.0 <= interval[0] <= interval[1] <= 1.0):
        raise DitlabError(f"sample.guidance_interval must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1, got {list(interval)}")
    return (float(interval[0]), float(interval[1]))


def scale_at(cfg_scale: float, t: float, interval: Interval | None) -> float:
    """The guidance scale at noise level t in [0, 1]: cfg_scale inside the interval, else 1 (no guidance)."""
    if interval is None:
        return cfg_scale
    lo, hi = interval
    return cfg_scale if lo <= t <= hi else 1.0


def guided_forward(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, **kw) -> Tensor:
    """out = uncond + s * (cond - uncond) on the `in_channels` prediction channels.

    Extra output channels (the learned-sigma half) are taken from the conditional pass. Unlike
    the official DiT `forward_with_cfg`, which guides only the first 3 channels, every
    prediction channel is guided (the two agree for in_channels=3).
    """
    if cfg_scale == 1.0:
        return model(x, t, y, **kw)
    check_guidance(model, cfg_scale)
    null = torch.full_like(y, model.num_classes)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **{k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in kw.items()})
    cond, uncond = both.chunk(2)
    c = model.in_channels
    guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)
