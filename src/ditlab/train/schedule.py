"""The learning-rate schedule: linear warm-up, then constant (the default) or cosine decay to a floor.

Update n (n = step + 1 = 1, 2, ...) uses, with D = optim.decay_steps (None: train.steps),

    warm-up  (n <= W):  lr * n / W
    constant (n >  W):  lr
    cosine   (n >  W):  min_lr + (lr - min_lr) * (1 + cos(pi * min(1, (n - W) / (D - W)))) / 2

so the cosine starts at lr right after the warm-up and reaches min_lr at update D (the last
one, by default). Set decay_steps when a run may be continued past train.steps (--resume with
a larger train.steps): with the default, the new train.steps would stretch the rest of the decay.
"""

from __future__ import annotations

import math

from ditlab.config import OptimConfig


def lr_at(o: OptimConfig, step: int, total_steps: int) -> float:
    """The learning rate of the update made at `step` (0-based) of a run of total_steps updates."""
    warm = o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr
    if o.lr_schedule == "constant" or step + 1 <= o.warmup_steps:
        return warm
    horizon = o.decay_steps if o.decay_steps is not None else total_steps
    progress = min(1.0, (step + 1 - o.warmup_steps) / max(1, horizon - o.warmup_steps))
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
