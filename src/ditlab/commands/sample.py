"""`ditlab sample`: draw class-conditional samples from a checkpoint to a PNG grid and/or an .npz.

    ditlab sample --ckpt runs/mnist --labels 0,1,2,3 --cfg-scale 2 --out-png digits.png
    ditlab sample --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \\
        --vae sd-vae-ft-ema/ --num-samples 8 --steps 250 --cfg-scale 4 --out-npz s.npz

A checkpoint is a ditlab run directory, step directory or weights file (its config.yaml says
which model it is), or an official DiT .pt file (a raw state dict or a dict with "model"/"ema";
name the model with --model, --image-size and --num-classes as in the official sample.py).
The sampling itself is `ditlab.sampling.generate`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ditlab.codecs import latent_shape, load_codec
from ditlab.config import (Config, config_from_dict, config_to_dict, is_language_model, load_config, parse_overrides,
                           validate)
from ditlab.errors import DitlabError
from ditlab.io import check_writable, save_grid, save_npz
from ditlab.models.loading import load_state_dict_file
from ditlab.runs import build_run, choose_weights, resolve_checkpoint, resolve_device, saved_objective_state
from ditlab.sampling import generate


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


def _merge(base: dict, updates: dict) -> dict:
    for k, v in updates.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _resolve(args) -> tuple[Config, dict[str, Tensor], Path, bool]:
    """(config, state dict, weights file, whether the config is official-style from flags)."""
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise DitlabError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    weights, cfg = resolve_checkpoint(Path(args.ckpt).expanduser())  # an official .pt comes back without a config
    if cfg is not None and args.config:  # it would be ignored: the checkpoint's own config describes its weights
        raise DitlabError(f"--config is for checkpoints without a config; {weights} has one "
                          "(change its settings with section.key=value instead)")
    weights = choose_weights(weights, ema=not args.no_ema)
    state = load_state_dict_file(weights, prefer_ema=not args.no_ema)
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
    cfg = config_from_dict(values)
    s = cfg.sample
    for name in ("sampler", "steps", "seed", "batch_size"):  # flags over the run's sample section
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    return validate(cfg), state, weights, official


def _labels(args, cfg: Config, num_classes: int) -> np.ndarray:
    given = None
    if args.labels is not None:
        try:
            given = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise DitlabError(f"--labels must be comma-separated integers, got '{args.labels}'") from None
        if not given:  # e.g. "--labels ," from an empty shell variable: not "no labels given"
            raise DitlabError(f"--labels '{args.labels}' holds no label (give e.g. --labels 0,1,2)")
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
    device = resolve_device(args.device)  # before loading anything
    out_png = args.out_png or (None if args.out_npz else "sample.png")
    for out in (out_png, args.out_npz):
        if out:
            check_writable(out)  # before sampling, which may take hours
    cfg, state, weights, official = _resolve(args)
    if is_language_model(cfg):
        raise DitlabError(f"{weights} holds a byte language model, which samples text: use `ditlab lm generate --ckpt`")
    codec = None
    if official or args.image_size is not None:
        # Official-style: the model sees the VAE's latent grid (image_size / 8 for the SD-VAE).
        codec = load_codec(cfg.vae)
        c, side, _ = latent_shape(codec, cfg.data.image_size, codec.image_channels if codec else cfg.model.in_channels)
        cfg.model.in_channels, cfg.model.input_size = c, side
    if not cfg.vae.path and cfg.model.in_channels not in (1, 3):
        raise DitlabError(f"the model samples {cfg.model.in_channels}-channel latents: pass --vae with the autoencoder to decode them")
    # The objective's saved state (e.g. a flow's measured data std) sits beside ditlab weights.
    run = build_run(cfg, state, device=device, objective_state=saved_objective_state(weights),
                    source=f"checkpoint {weights}", codec=codec)
    labels = _labels(args, cfg, run.model.num_classes)
    images, labels = generate(run, labels, cfg_scale=args.cfg_scale, eta=args.eta, clip_denoised=args.clip_denoised,
                              progress=not args.no_progress and sys.stderr.isatty())  # no per-step lines in logs
    written = []
    if out_png:
        nrow = args.nrow or math.ceil(math.sqrt(len(images)))
        captions = labels if args.caption and run.model.num_classes > 0 else None
        written.append(str(save_grid(out_png, images, nrow, labels=captions)))
    if args.out_npz:
        written.append(str(save_npz(args.out_npz, images, labels)))
    n, h, w, c = images.shape
    s = cfg.sample
    sampler, steps = run.objective.resolve_sampling(s.sampler, s.steps)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (s.cfg_scale if run.model.num_classes else 1.0)
    print(f"sampled {n} images {h}x{w}x{c} ({sampler}, {steps} steps, {run.objective.last_nfe} model calls in the "
          f"last batch, cfg {cfg_scale:g}, seed {s.seed}) -> {', '.join(written)}")
    return 0
