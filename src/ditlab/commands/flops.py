"""`ditlab flops`: Gflops and parameter counts of model configs (DiT paper Table 4 by default)."""

from __future__ import annotations

import argparse
import json

from ditlab.config import load_config
from ditlab.errors import DitlabError
from ditlab.eval.flops import measure
from ditlab.io import check_writable, save_text
from ditlab.models import DiT_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", help="model names (default: all 12 DiT configs)")
    parser.add_argument("--config", default=None, help="YAML run config (its model section)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixel side; the latent side is image-size/8 (default: the config's input_size)")
    parser.add_argument("--input-size", type=int, default=None, help="model input side (latent or pixel)")
    parser.add_argument("--in-channels", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json)  # before counting: DiT-XL/2 on the CPU fallback takes a while
    overrides = list(args.set)
    if args.config is None:  # the paper's setting: 256x256 ImageNet through the SD VAE (32x32x4)
        overrides = ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000"] + overrides
    if args.image_size is not None:
        if args.image_size < 8 or args.image_size % 8:  # 100 // 8 = 12 would count a 96-pixel model
            raise DitlabError(f"--image-size must be a positive multiple of 8 (the SD-VAE downsamples by 8), "
                              f"got {args.image_size}; give the model side with --input-size instead")
        overrides.append(f"model.input_size={args.image_size // 8}")
    if args.input_size is not None:
        overrides.append(f"model.input_size={args.input_size}")
    if args.in_channels is not None:
        overrides.append(f"model.in_channels={args.in_channels}")
    if args.num_classes is not None:
        overrides.append(f"model.num_classes={args.num_classes}")
    base = load_config(args.config, overrides) if args.config else load_config(None, overrides)
    names = args.models or ([base.model.name] if args.config else list(DiT_models))
    rows = []
    for name in names:
        cfg = load_config(args.config, overrides + [f"model.name={name}"]) if args.config else load_config(
            None, overrides + [f"model.name={name}"])
        rows.append(measure(cfg))
    m = base.model
    print(f"input {m.input_size}x{m.input_size}x{m.in_channels}, {m.num_classes} classes, one image, no guidance")
    print(f"{'model':<12} {'params (M)':>11} {'Gflops':>9}")
    for r in rows:
        print(f"{r['name']:<12} {r['params'] / 1e6:>11.2f} {r['gflops']:>9.2f}")
    if args.json:
        save_text(args.json, json.dumps(rows, indent=2))
    return 0
