"""`ditlab train-classifier`: train the MNIST / Fashion-MNIST evaluator CNN."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ditlab.eval.classifier import DATASETS, default_data_dir, train_classifier, weights_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument("--data", default=None, help="IDX dir (default: $DITLAB_DATA/<dataset>)")
    parser.add_argument("--out", default=None, help="weights file (default: the package's assets)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else default_data_dir(args.dataset)
    out = Path(args.out) if args.out else weights_path(args.dataset)
    r = train_classifier(args.dataset, data, out, args.epochs, args.batch_size, args.lr, args.width, args.seed)
    size_kb = Path(r["path"]).stat().st_size / 1024
    print(f"{args.dataset}: test accuracy {r['test_accuracy']:.4f}, {r['seconds']:.0f}s, wrote {out} ({size_kb:.0f} KB)")
    return 0
