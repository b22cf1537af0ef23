"""The data order: which samples each step and micro-batch reads, as a function of (seed, step).

Because the position in the data is a function of the step, a resumed run needs only the step
to continue with the same batches, and W ranks x A accumulation micro-batches read the same
global batch as one process would.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence), for per-step/micro-batch RNGs."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return (int(a) << 31 | int(b)) & 0x7FFF_FFFF_FFFF_FFFF


class StepSampler:
    """Seeded data order: the concatenation of per-epoch permutations, cut into global batches.

    Step s takes stream positions [s*B, (s+1)*B); epoch e's permutation is seeded by (seed, e).
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


class MicroBatches(Sampler):
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
