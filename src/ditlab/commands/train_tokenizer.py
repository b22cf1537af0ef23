"""`ditlab train-tokenizer`: train a conv autoencoder tokenizer and report its held-out PSNR.

    ditlab train-tokenizer --kind conv2 --token-dim 16 --data mnist-embedded --steps 2000 --out runs/tok
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ditlab.codecs.tokenizers import FILE_NAME, TOKENIZER_KINDS, evaluate_psnr, save_tokenizer
from ditlab.errors import DitlabError
from ditlab.io import check_writable, save_text
from ditlab.train.tokenizer import fit_tokenizer


def _writable_dir(out: Path) -> Path:
    """Check the output directory could take files, before any training time is spent. Creates
    nothing yet, so a run that fails later leaves no empty folder (nor a probe file) behind."""
    check_writable(out / FILE_NAME)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=list(TOKENIZER_KINDS), default="conv2", help="conv1: 2x2 patches; conv2: 4x4 patches")
    parser.add_argument("--token-dim", type=int, default=16, help="channels per token (conv1: 4/8/16, conv2: 16/32/64)")
    parser.add_argument("--hidden", type=int, default=64, help="conv2 hidden width")
    parser.add_argument("--data", default="mnist-embedded", help="mnist-embedded | mnist | fashion-mnist")
    parser.add_argument("--data-path", default=None, help="dataset directory (default $DITLAB_DATA/<data>)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output directory (writes tokenizer.safetensors, metrics.json)")


def run(args: argparse.Namespace) -> int:
    dims = TOKENIZER_KINDS[args.kind][1]
    if args.token_dim not in dims:
        raise DitlabError(f"--token-dim {args.token_dim} is not offered for {args.kind} (choose {', '.join(map(str, dims))})")
    if args.steps < 1 or args.batch_size < 1:
        raise DitlabError("--steps and --batch-size must be positive")
    out = _writable_dir(Path(args.out))  # fail now, not after the training run
    t0 = time.time()
    tok, train, test, losses = fit_tokenizer(args.kind, args.token_dim, args.data, args.data_path, args.steps,
                                             hidden=args.hidden, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                             device=args.device, log_every=max(args.steps // 10, 1))
    seconds = time.time() - t0
    side = train.shape[-1] // TOKENIZER_KINDS[args.kind][0]
    test_dev, train_dev = test.to(args.device), train.to(args.device)
    metrics = {
        "kind": args.kind,
        "token_dim": args.token_dim,
        "data": args.data,
        "steps": args.steps,
        "train_images": len(train),
        "test_images": len(test),
        "train_psnr": evaluate_psnr(tok, train_dev[:5000]),
        "test_psnr": evaluate_psnr(tok, test_dev),
        "final_train_mse": float(np.mean(losses[-50:])),
        "latent_shape": [args.token_dim, side, side],
        "train_seconds": round(seconds, 1),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tok.cpu(), out / FILE_NAME, extra={"data": args.data, "steps": str(args.steps),
                                                         "test_psnr": f"{metrics['test_psnr']:.3f}"})
        save_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    except OSError as e:
        raise DitlabError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"test PSNR {metrics['test_psnr']:.2f} dB on {len(test)} held-out images "
          f"(train {metrics['train_psnr']:.2f} dB); wrote {out / FILE_NAME}")
    print(f"use it with: vae.path={out / FILE_NAME} model.in_channels={args.token_dim} model.input_size={side}")
    return 0
