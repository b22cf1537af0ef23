"""Image batches: checks of the data against the model, and from a loader batch to what the
objective trains on (label check, flips, on-the-fly encoding). Byte LMs need none of it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ditlab.codecs import Codec, latent_shape
from ditlab.config import SampleConfig
from ditlab.errors import DitlabError
from ditlab.objectives import Objective
from ditlab.objectives.guidance import check_guidance


def check_data(dataset: Dataset, codec: Codec | None, model: nn.Module) -> None:
    """One line when the data's sample shape or labels do not fit the model."""
    x, _ = dataset[0]
    if codec is not None:
        shape = latent_shape(codec, x.shape[-1], x.shape[0])
    else:
        shape = tuple(x.shape)
        if getattr(dataset, "paired_flip", False):
            shape = (shape[0] // 2, *shape[1:])
    want = (model.in_channels, model.input_size, model.input_size)
    if tuple(shape) != want:
        raise DitlabError(f"data gives samples of shape {list(shape)} but the model expects {list(want)} "
                          "(model.in_channels, model.input_size; data.image_size)")
    k = model.num_classes
    data_classes = int(getattr(dataset, "num_classes", 0))
    if k > 0 and data_classes > k:
        raise DitlabError(f"data has labels 0..{data_classes - 1} but model.num_classes is {k}")


def check_image_run(dataset: Dataset, codec: Codec | None, model: nn.Module, objective: Objective,
                    sample: SampleConfig) -> None:
    """What can be checked before training an image model: data shape and labels, the sampler, guidance."""
    check_data(dataset, codec, model)
    objective.resolve_sampling(sample.sampler, sample.steps)  # a typo fails now, not after training
    check_guidance(model, sample.cfg_scale if model.num_classes > 0 else 1.0)


def prepare_batch(x: Tensor, y: Tensor, *, num_classes: int, device: torch.device, gen_cpu: torch.Generator,
                  paired_flip: bool = False, random_flip: bool = False, codec: Codec | None = None) -> tuple[Tensor, Tensor]:
    """Move a batch to the device, pick flips (seeded by `gen_cpu`) and encode pixels with `codec`."""
    if num_classes > 0 and len(y):  # checked on the CPU batch: no device sync per micro-batch
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DitlabError(f"label {hi if hi >= num_classes else lo} out of range 0..{num_classes - 1} (model.num_classes)")
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if paired_flip:  # latents of the image and of its mirror, stored side by side
        c = x.shape[1] // 2
        flip = (torch.rand(len(x), generator=gen_cpu) < 0.5).to(device).view(-1, 1, 1, 1)
        x = torch.where(flip, x[:, c:], x[:, :c])
    elif random_flip:
        flip = (torch.rand(len(x), generator=gen_cpu) < 0.5).to(device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if codec is not None:
        gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen_cpu)))
        x = codec.encode(x, generator=gen)
    return x, y
