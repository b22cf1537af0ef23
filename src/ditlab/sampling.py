"""`generate`: class-conditional samples of a `Run`, the one sampling entry point.

`ditlab sample`, `ditlab eval --ckpt`, the trainer's sample grids, quickstart and the experiments
all call it, so the sampler, its step count, guidance, DDIM's eta and clipping are worked out
in one place: every argument left as None takes the run's `sample` section, and a sampler or
step count left unset there takes the objective's own default.
"""

from __future__ import annotations

import numpy as np
import torch

from ditlab.errors import DitlabError
from ditlab.io import to_uint8
from ditlab.objectives.guidance import check_guidance
from ditlab.runs import Run


@torch.no_grad()
def generate(
    run: Run,
    labels: np.ndarray | list[int],
    *,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    guidance_interval: list[float] | None = None,
    eta: float | None = None,
    clip_denoised: bool | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample one image per label: (uint8 [N, H, W, C] images, int64 [N] labels).

    Deterministic for a seed: all noise (the prior sample and each sampler step) comes from one
    CPU generator, so the same seed and batch size give identical images on any device.
    A conditional model needs labels in [0, num_classes); an unconditional model (num_classes=0)
    ignores them and samples without a class (the returned labels are then -1, and the config's
    guidance scale is ignored; an explicit `cfg_scale` other than 1 is an error).
    `clip_denoised=None` clips the predicted x0 in pixel space only (not latents, as the official
    sample.py). The model calls of the last batch are in `run.objective.last_nfe` afterwards.
    """
    model, objective, s = run.model, run.objective, run.cfg.sample
    sampler, steps = objective.resolve_sampling(s.sampler if sampler is None else sampler,
                                                s.steps if steps is None else steps)
    conditional = getattr(model, "num_classes", 0) > 0
    if cfg_scale is None:
        cfg_scale = s.cfg_scale if conditional else 1.0
    check_guidance(model, cfg_scale)
    options = {}
    if eta is not None and eta != 0 and sampler != "ddim":
        raise DitlabError(f"eta applies to the ddim sampler only, not '{sampler}'")
    if sampler == "ddim":
        options["eta"] = s.eta if eta is None else eta
    clip = (s.clip_denoised if run.codec is None else False) if clip_denoised is None else clip_denoised
    seed = s.seed if seed is None else seed
    batch_size = s.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise DitlabError(f"batch size must be positive, got {batch_size}")

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if conditional and labels.size and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise DitlabError(f"labels must be in [0, {model.num_classes - 1}] for this model, got {labels.min()}..{labels.max()}")
    if not conditional:
        labels = np.full_like(labels, -1)
    device = next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    generator = torch.Generator().manual_seed(int(seed))

    was_training = model.training
    model.eval()
    chunks = []
    starts = range(0, len(labels), batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="batches")
    try:
        for start in starts:
            y_np = labels[start:start + batch_size]
            y = torch.from_numpy(np.maximum(y_np, 0)).to(device)
            noise = torch.randn((len(y_np), *shape), generator=generator).to(device)
            x = objective.sample(model, noise, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                 guidance_interval=guidance_interval, clip_denoised=clip, progress=progress,
                                 generator=generator, **options)
            if run.codec is not None:
                x = run.codec.decode(x)
            chunks.append(to_uint8(x))
    finally:
        model.train(was_training)
    images = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 0), dtype=np.uint8)
    return images, labels
