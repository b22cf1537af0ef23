"""`generate`: class-conditional samples of a `Run`, the one sampling entry point for images;
`generate_text`: the continuation of a prompt by a byte language model run.

`ditlab sample`, `ditlab eval --ckpt`, the trainer's sample grids, quickstart and the experiments
all call it (and `ditlab lm generate`, the trainer's text samples and `ditlab.eval.lm` call
`generate_text` / `generate_bytes`), so the sampler, its step count, guidance, DDIM's eta and clipping are worked out
in one place: every argument left as None takes the run's `sample` section, and a sampler or
step count left unset there takes the objective's own default.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

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


def generate_bytes(model: nn.Module, prompt_bytes: bytes, max_new: int, temperature: float = 1.0,
                   top_k: int | None = None, generator: torch.Generator | None = None, memory: bool = True) -> bytes:
    """Sample max_new bytes after the prompt from a byte LM (`model(x) -> logits`); returns only the new bytes.

    temperature 0 is greedy decoding. Sampling runs on the CPU with `generator` (a CPU
    torch.Generator), so a seed gives the same text on any device up to the logits' rounding.
    A model with a finite `max_context` (vanilla) sees the last max_context bytes; an Infini model
    re-reads the whole text each step (no caching: simple, quadratic in the length).
    """
    if not prompt_bytes:
        raise DitlabError("generate needs a non-empty prompt")
    if temperature < 0 or (top_k is not None and top_k < 1) or max_new < 0:
        raise DitlabError(f"need temperature >= 0, top_k >= 1 and max_new >= 0 (got {temperature}, {top_k}, {max_new})")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    idx = torch.tensor(list(prompt_bytes), dtype=torch.int64, device=device)[None]
    context = getattr(model, "max_context", None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new):
                x = idx if context is None else idx[:, -context:]
                logits = (model(x) if memory else model(x, memory=False))[0, -1].cpu()
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits sampled in float32
                if temperature == 0:
                    nxt = logits.argmax()
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.numel():
                        logits[logits < torch.topk(logits, top_k).values[-1]] = -float("inf")
                    nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]
                idx = torch.cat([idx, nxt.view(1, 1).to(device)], dim=1)
    finally:
        model.train(was_training)
    return bytes(idx[0, len(prompt_bytes):].tolist())


def generate_text(run: Run, prompt: bytes, *, max_new: int | None = None, temperature: float | None = None,
                  top_k: int | None = None, seed: int | None = None) -> bytes:
    """The bytes a byte-LM run writes after `prompt`; arguments left None take the run's `sample`
    section (max_new_bytes, temperature, top_k, seed). A top_k of 0 means all bytes."""
    s = run.cfg.sample
    if not run.is_language_model:
        raise DitlabError(f"{run.weights or 'this run'} is an image model ({run.cfg.model.name}); "
                          "sample it with `ditlab sample`")
    top_k = s.top_k if top_k is None else (top_k or None)
    generator = torch.Generator().manual_seed(int(s.seed if seed is None else seed))
    return generate_bytes(run.model, prompt, s.max_new_bytes if max_new is None else max_new,
                          s.temperature if temperature is None else temperature, top_k, generator)
