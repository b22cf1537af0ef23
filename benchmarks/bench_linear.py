"""The linear layers of a DiT on this CPU: PyTorch's products (MKL) against oneDNN's (`OneDNNLinear`).

    python benchmarks/bench_linear.py [--threads 1] [--repeats 20]

For the qkv, attention-output and MLP layers of the shapes in profile_step.py (rows = batch x
tokens), times the forward and the forward + backward of one nn.Linear and of the same layer as
`OneDNNLinear` (what `build_model` gives on CPU unless `train.onednn_linear=false`), alternating,
medians, and prints Gflop/s and the ratio. Run it on a new CPU to see whether the default pays
there: the layer's products are most of a DiT training step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from ditlab.models.onednn import onednn_available, use_onednn_linear

# (name, rows, in_features, out_features): a DiT block's linear layers at profile_step.py's shapes
SHAPES = [
    ("quickstart qkv", 32 * 49, 128, 384), ("quickstart mlp fc1", 32 * 49, 128, 512), ("quickstart mlp fc2", 32 * 49, 512, 128),
    ("h256 qkv", 64 * 196, 256, 768), ("h256 mlp fc1", 64 * 196, 256, 1024), ("h256 mlp fc2", 64 * 196, 1024, 256),
    ("DiT-S/4 qkv", 32 * 64, 384, 1152), ("DiT-S/4 mlp fc1", 32 * 64, 384, 1536), ("DiT-S/4 mlp fc2", 32 * 64, 1536, 384),
]


def timed(fn, repeats: int) -> list[float]:
    fn()  # first call: allocations, oneDNN primitive creation
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("error: this PyTorch has no oneDNN (torch.backends.mkldnn): nothing to compare")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); Gflop/s, medians of {args.repeats} alternating runs")
    print(f"{'layer':20s} {'rows x in -> out':>20s} | {'forward MKL':>11s} {'oneDNN':>7s} {'ratio':>5s} | "
          f"{'fwd+bwd MKL':>11s} {'oneDNN':>7s} {'ratio':>5s}")
    for name, rows, k, n in SHAPES:
        plain = nn.Linear(k, n)
        fast = copy.deepcopy(plain)
        use_onednn_linear(fast)
        x = torch.randn(rows, k, requires_grad=True)
        grad = torch.randn(rows, n)
        flops = {"fwd": 2 * rows * k * n, "train": 6 * rows * k * n}
        times = {(label, kind): [] for label in ("mkl", "onednn") for kind in flops}
        for _ in range(2):  # alternate halves so drift in machine load hits both alike
            for label, layer in (("mkl", plain), ("onednn", fast)):
                with torch.no_grad():
                    times[(label, "fwd")] += timed(lambda: layer(x), args.repeats // 2)
                times[(label, "train")] += timed(lambda: layer(x).backward(grad), args.repeats // 2)
        rate = {key: flops[key[1]] / statistics.median(v) / 1e9 for key, v in times.items()}
        print(f"{name:20s} {f'{rows} x {k} -> {n}':>20s} | {rate[('mkl', 'fwd')]:11.0f} {rate[('onednn', 'fwd')]:7.0f} "
              f"{rate[('onednn', 'fwd')] / rate[('mkl', 'fwd')]:5.2f} | {rate[('mkl', 'train')]:11.0f} "
              f"{rate[('onednn', 'train')]:7.0f} {rate[('onednn', 'train')] / rate[('mkl', 'train')]:5.2f}")


if __name__ == "__main__":
    main()
