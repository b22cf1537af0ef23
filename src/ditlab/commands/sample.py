"""`ditlab sample`: draw class-conditional samples from a checkpoint to a PNG grid and/or an .npz.

    ditlab sample --ckpt runs/mnist --labels 0,1,2,3 --cfg-scale 2 --out-png digits.png
    ditlab sample --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \\
        --vae sd-vae-ft-ema/ --num-samples 8 --steps 250 --cfg-scale 4 --out-npz s.npz

A checkpoint is a ditlab run directory, step directory or weights file (its config.yaml says
which model it is), or an official DiT .pt file (a raw state dict or a dict with "model"/"ema";
name the model with --model, --image-size and --num-classes as in the official sample.py).
`generate` is the library entry point the trainer (sample grids) and `ditlab eval` reuse.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ditlab.config import Config, config_from_dict, config_to_dict, load_config, parse_overrides
from ditlab.errors import DitlabError
from ditlab.images import save_grid, save_npz, to_uint8


# ---------------------------------------------------------------------------------------------
# Library
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: nn.Module,
    objective,
    labels: np.ndarray | list[int],
    *,
    sampler: str,
    steps: int,
    cfg_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 100,
    codec=None,
    progress: bool = False,
    clip_denoised: bool | None = None,
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample one image per label: (uint8 [N, H, W, C] images, int64 [N] labels).

    Deterministic for a seed: all noise (the prior sample and each sampler step) comes from one
    CPU generator, so the same seed and batch size give identical images on any device.
    A conditional model needs labels in [0, num_classes); an unconditional model (num_classes=0)
    ignores them and samples without a class (the returned labels are then -1).
    `clip_denoised=None` clips the predicted x0 in pixel space only (not latents, as the official
    sample.py). Extra `options` (e.g. eta) go to `objective.sample`.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if batch_size < 1:
        raise DitlabError(f"batch size must be positive, got {batch_size}")
    conditional = getattr(model, "num_classes", 0) > 0
    if conditional and labels.size and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise DitlabError(f"labels must be in [0, {model.num_classes - 1}] for this model, got {labels.min()}..{labels.max()}")
    if not conditional:
        labels = np.full_like(labels, -1)
    clip = (codec is None) if clip_denoised is None else clip_denoised
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
                                 clip_denoised=clip, progress=progress, generator=generator, **options)
            if codec is not None:
                x = codec.decode(x)
            chunks.append(to_uint8(x))
    finally:
        model.train(was_training)
    images = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 0), dtype=np.uint8)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="ditlab run dir / step dir / .safetensors, or an official DiT .pt")
    p.add_argument("--config", help="YAML config of the model (when the checkpoint carries none)")
    p.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    p.add_argument("--model", help="model name, e.g. DiT-XL/2 (official checkpoints)")
    p.add_argument("--image-size", type=int, help="image side in pixels (official default 256)")
    p.add_argument("--num-classes", type=int, help="number of classes (official default 1000; 0 = unconditional)")
    p.add_argument("--in-channels", type=int, help="image channels of a pixel-space official-style model (default 3)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory or weights file (latents x 0.18215)")
    p.add_argument("--labels", help="comma-separated class labels, e.g. 0,1,2 (cycled up to --num-samples)")
    p.add_argument("--num-samples", type=int, help="number of samples (default: one per --labels, else sample.num_samples)")
    p.add_argument("--random-labels", action="store_true", help="draw labels uniformly (seeded) instead of cycling 0,1,2,...")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--sampler", help="ddpm | ddim for Gaussian diffusion (euler | heun | dopri5 for flow, ...)")
    p.add_argument("--steps", type=int, help="sampling steps (respaced from the training steps)")
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, help="random seed (same seed -> same samples)")
    p.add_argument("--batch-size", type=int, help="samples per forward batch")
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="clip predicted x0 to [-1, 1] (default: yes in pixel space, no for latents)")
    p.add_argument("--out-png", help="write a PNG grid here (default sample.png when no output is given)")
    p.add_argument("--out-npz", help="write an ADM-style .npz here (arr_0 uint8 NHWC, labels int64)")
    p.add_argument("--nrow", type=int, help="images per grid row (default ceil(sqrt(N)))")
    p.add_argument("--caption", action="store_true", help="write each sample's class label above it in the PNG")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device, failing with one line when it is unknown or absent here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DitlabError(f"unknown --device '{name}' (choose cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DitlabError(f"--device {name} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DitlabError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_sampler(objective, name: str) -> str:
    """The sampler to run: `name` if the objective has it; the default "ddpm" on a non-Gaussian
    objective means that objective's default (its first sampler); anything else is a typo."""
    if name in objective.samplers:
        return name
    if name == "ddpm":
        return objective.samplers[0]
    raise DitlabError(f"unknown sample.sampler '{name}' for this objective (choose {', '.join(objective.samplers)})")


def sampler_options(cfg: Config, sampler: str) -> dict:
    """Sampler keyword options from the config (only DDIM has one: eta)."""
    return {"eta": cfg.sample.eta} if cfg.objective.kind == "gaussian" and sampler == "ddim" else {}


def _sampler(args, objective, cfg: Config) -> str:
    """The sampler to run; --eta only applies to DDIM (a silently dropped flag would mislead)."""
    if args.sampler is not None and args.sampler not in objective.samplers:
        raise DitlabError(f"unknown sampler '{args.sampler}' for objective '{cfg.objective.kind}' "
                          f"(choose: {', '.join(objective.samplers)})")
    # The config's sampler: "ddpm" (the default, which a flow run's checkpoint may carry) means a
    # non-Gaussian objective's default sampler; any other unknown name is a typo.
    sampler = pick_sampler(objective, cfg.sample.sampler)
    if args.eta and sampler != "ddim":
        raise DitlabError(f"--eta applies to the ddim sampler only, not '{sampler}' (add --sampler ddim)")
    return sampler


def _merge(base: dict, updates: dict) -> dict:
    for k, v in updates.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _resolve(args) -> tuple[Config, dict[str, Tensor], str, bool]:
    """(config, state dict, source description, whether the config is official-style from flags)."""
    from ditlab.models.loading import load_state_dict_file
    from ditlab.train.checkpoint import resolve_checkpoint

    weights, cfg = resolve_checkpoint(Path(args.ckpt).expanduser())  # an official .pt comes back without a config
    if args.no_ema and weights.name == "ema.safetensors" and (weights.parent / "model.safetensors").is_file():
        weights = weights.parent / "model.safetensors"
    state, source = load_state_dict_file(weights, prefer_ema=not args.no_ema), f"checkpoint {weights}"
    official = cfg is None and args.config is None
    if cfg is None:
        cfg = load_config(args.config) if args.config else Config()
    # Flags and overrides on top of the checkpoint's config.
    values = config_to_dict(cfg)
    if official:  # the official sample.py defaults
        values["model"].update(num_classes=1000, learn_sigma=True)
        values["data"]["image_size"] = 256
    if args.model:
        values["model"]["name"] = args.model
    if args.num_classes is not None:
        values["model"]["num_classes"] = args.num_classes
    if args.image_size is not None:
        values["data"]["image_size"] = args.image_size
    if args.in_channels is not None:
        values["model"]["in_channels"] = args.in_channels
    elif official:
        values["model"]["in_channels"] = 3
    if args.vae:
        values["vae"]["path"] = args.vae
    overrides = parse_overrides(args.overrides)
    if official and not args.model and "name" not in overrides.get("model", {}):
        raise DitlabError(f"{weights} carries no config: name the model with --model (e.g. DiT-XL/2) or give --config")
    _merge(values, overrides)
    return config_from_dict(values), state, source, official


def _labels(args, cfg: Config, num_classes: int) -> np.ndarray:
    given = None
    if args.labels:
        try:
            given = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise DitlabError(f"--labels must be comma-separated integers, got '{args.labels}'") from None
        if num_classes == 0:
            raise DitlabError("--labels needs a class-conditional model; this one has num_classes=0")
        bad = [v for v in given if not 0 <= v < num_classes]
        if bad:
            raise DitlabError(f"labels {bad} out of range for {num_classes} classes")
    n = args.num_samples if args.num_samples is not None else len(given) if given else cfg.sample.num_samples
    if n < 1:
        raise DitlabError(f"--num-samples must be positive, got {n}")
    if num_classes == 0:
        return np.full(n, -1, dtype=np.int64)
    if given:
        return np.resize(np.array(given, dtype=np.int64), n)  # cycled
    if args.random_labels:
        return np.random.default_rng(cfg.sample.seed).integers(0, num_classes, n).astype(np.int64)
    return np.arange(n, dtype=np.int64) % num_classes


def run(args) -> int:
    from ditlab.diffusion import build_objective
    from ditlab.diffusion.guidance import check_guidance
    from ditlab.models import build_model
    from ditlab.models.codec import latent_shape, load_codec
    from ditlab.models.loading import check_state_dict

    device = resolve_device(args.device)  # before loading anything
    cfg, state, source, official = _resolve(args)
    s = cfg.sample
    for name in ("cfg_scale", "sampler", "steps", "seed", "batch_size", "eta"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))

    codec = load_codec(cfg.vae, device)
    if official or args.image_size is not None:
        # Official-style: the model sees the VAE's latent grid (image_size / 8 for the SD-VAE).
        c, side, _ = latent_shape(codec, cfg.data.image_size, codec.image_channels if codec else cfg.model.in_channels)
        cfg.model.in_channels, cfg.model.input_size = c, side
    model = build_model(cfg)
    check_state_dict(model, state, source)  # one line naming the keys/shapes that differ
    model.load_state_dict(state, strict=True)
    model.to(device)
    if codec is None and model.in_channels not in (1, 3):
        raise DitlabError(f"the model samples {model.in_channels}-channel latents: pass --vae with the autoencoder to decode them")
    if codec is not None and codec.latent_channels != model.in_channels:
        raise DitlabError(f"the VAE has {codec.latent_channels} latent channels but the model takes {model.in_channels}")

    objective = build_objective(cfg)
    sampler = _sampler(args, objective, cfg)
    check_guidance(model, s.cfg_scale)
    labels = _labels(args, cfg, model.num_classes)
    options = sampler_options(cfg, sampler)
    clip = args.clip_denoised if args.clip_denoised is not None else (s.clip_denoised if codec is None else False)

    images, labels = generate(model, objective, labels, sampler=sampler, steps=s.steps, cfg_scale=s.cfg_scale,
                              seed=s.seed, batch_size=s.batch_size, codec=codec, progress=not args.no_progress,
                              clip_denoised=clip, **options)
    out_png = args.out_png or (None if args.out_npz else "sample.png")
    written = []
    if out_png:
        nrow = args.nrow or math.ceil(math.sqrt(len(images)))
        captions = labels if args.caption and model.num_classes > 0 else None
        written.append(str(save_grid(out_png, images, nrow, labels=captions)))
    if args.out_npz:
        written.append(str(save_npz(args.out_npz, images, labels)))
    n, h, w, c = images.shape
    nfe = getattr(objective, "last_nfe", None)  # adaptive solvers (dopri5) report their function evaluations
    steps = f"{s.steps} steps" + (f", {nfe} model calls in the last batch" if nfe is not None else "")
    print(f"sampled {n} images {h}x{w}x{c} ({sampler}, {steps}, cfg {s.cfg_scale:g}, seed {s.seed}) -> {', '.join(written)}",
          file=sys.stdout)
    return 0
