"""`ditlab extract-latents`: encode a dataset once with a VAE/tokenizer into sharded safetensors.

    ditlab extract-latents configs/imagenet256_dit_xl2.yaml vae.path=/models/sd-vae-ft-ema --out latents/ --flip
"""

from __future__ import annotations

import argparse
import json
import sys

from ditlab.config import load_config, split_config_args
from ditlab.train.latents import extract_latents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (data + vae sections); defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. vae.path=/models/sd-vae-ft-ema")
    parser.add_argument("--out", required=True, help="output directory for the shards and index.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10000, help="latents per shard file")
    parser.add_argument("--flip", action="store_true", help="also store latents of mirrored images (for data.random_flip)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", help="storage dtype: float32 | float16 | bfloat16")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    config, overrides = split_config_args(args.config, list(args.overrides))
    cfg = load_config(config, overrides)
    index = extract_latents(cfg, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                            flip=args.flip, device=args.device, dtype=args.dtype,
                            progress=not args.no_progress and sys.stderr.isatty())  # no bar lines in logs
    info = json.loads(index.read_text())
    print(f"wrote {info['num_samples']} latents of shape {info['latent_shape']} in {len(info['shards'])} shard(s) to {index.parent}")
    return 0
