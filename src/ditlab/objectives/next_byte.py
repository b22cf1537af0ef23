"""Next-byte prediction: the training loss of a byte-level language model (objective.kind=next-byte).

Its model convention differs from the image objectives': `model(x) -> logits [B, T, V]` for
bytes x [B, T] (int64), and the "labels" y [B, T] are the targets, the bytes that follow x
(`ditlab.data.text.TextWindows`). The loss is the mean cross-entropy in nats; bits per byte
(loss / ln 2) is logged beside it. This objective samples nothing: text comes from
`ditlab.sampling.generate_text`, so the image sampling entry points refuse it with one line.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.errors import DitlabError
from ditlab.objectives.base import Objective

NOT_IMAGES = "a byte language model samples text, not images: use `ditlab lm generate --ckpt RUN`"


class NextByteObjective(Objective):
    name = "next-byte prediction"
    samplers = ()

    @classmethod
    def from_config(cls, cfg) -> "NextByteObjective":
        return cls()

    def resolve_sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        raise DitlabError(NOT_IMAGES)

    def check_sampling(self, sampler: str, steps: int | None) -> None:
        raise DitlabError(NOT_IMAGES)

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Mean next-byte cross-entropy of targets y [B, T] given bytes x0 [B, T]; 'bpb' is logged.

        Nothing here is random (`generator` is unused); dropout inside the model draws from the
        global RNG, which the trainer seeds per micro-batch.
        """
        logits = model(x0)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax of bf16 logits in float32
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return {"loss": loss, "bpb": loss.detach() / math.log(2.0)}

    def sample(self, model: nn.Module, noise: Tensor, y: Tensor, **kwargs) -> Tensor:
        raise DitlabError(NOT_IMAGES)
