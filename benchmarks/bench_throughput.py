"""Training and sampling throughput of ditlab's DiT against the official facebookresearch/DiT,
side by side in one process, alternating runs, reporting medians and the ratio.

    DITLAB_OFFICIAL_DIT=/path/to/DiT python benchmarks/bench_throughput.py [--repeats 5]

The official models.py imports timm; where timm cannot import (no torchvision), put a stub
on PYTHONPATH (see benchmarks/README.md). Writes the table to benchmarks/RESULTS.md (the
section between the markers, so other benchmark sections stay).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ditlab.models import DiT
from ditlab.models.onednn import use_onednn_linear

# MNIST-scale shapes from the field notes, plus one latent-space shape.
CASES = [
    dict(name="MNIST h128 d4 p4 (49 tok)", input_size=28, in_channels=1, patch_size=4, hidden_size=128, depth=4, num_heads=4, num_classes=10, batch=128),
    dict(name="MNIST h256 d6 p2 (196 tok)", input_size=28, in_channels=1, patch_size=2, hidden_size=256, depth=6, num_heads=4, num_classes=10, batch=64),
    dict(name="latent 32x32x4 DiT-S/4 (64 tok)", input_size=32, in_channels=4, patch_size=4, hidden_size=384, depth=12, num_heads=6, num_classes=1000, batch=32),
]


def load_official(path: str):
    spec = importlib.util.spec_from_file_location("official_dit_models", Path(path) / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DiT


def train_rate(model: torch.nn.Module, case: dict, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = case["batch"]
    x = torch.randn(b, case["in_channels"], case["input_size"], case["input_size"])
    t = torch.randint(0, 1000, (b,))
    y = torch.randint(0, case["num_classes"], (b,))
    model.train()
    model(x, t, y).square().mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x, t, y).square().mean().backward()
        opt.step()
    return b * steps / (time.perf_counter() - start)


@torch.no_grad()
def sample_rate(model: torch.nn.Module, case: dict, steps: int) -> float:
    b = case["batch"]
    x = torch.randn(b, case["in_channels"], case["input_size"], case["input_size"])
    t = torch.randint(0, 1000, (b,))
    y = torch.randint(0, case["num_classes"], (b,))
    model.eval()
    model(x, t, y)
    start = time.perf_counter()
    for _ in range(steps):
        model(x, t, y)
    return b * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=os.environ.get("DITLAB_OFFICIAL_DIT"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--no-onednn", action="store_true",
                        help="ditlab's linear layers with PyTorch's own products (train.onednn_linear=false)")
    args = parser.parse_args()
    if not args.official:
        sys.exit("error: give --official PATH or set DITLAB_OFFICIAL_DIT to a facebookresearch/DiT checkout")
    Official = load_official(args.official)
    torch.manual_seed(0)
    rows = []
    for case in CASES:
        kw = {k: case[k] for k in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes")}
        ours, theirs = DiT(**kw), Official(**kw)
        theirs.load_state_dict(ours.state_dict())
        if not args.no_onednn:  # as build_model gives it (train.onednn_linear, the default)
            use_onednn_linear(ours)
        rates = {("ditlab", "train"): [], ("official", "train"): [], ("ditlab", "sample"): [], ("official", "sample"): []}
        for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
            for label, model in (("ditlab", ours), ("official", theirs)):
                rates[(label, "train")].append(train_rate(model, case, args.steps))
                rates[(label, "sample")].append(sample_rate(model, case, args.steps))
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append((case["name"], case["batch"], med))
        print(f"{case['name']:34s} train {med[('ditlab', 'train')]:7.1f} vs {med[('official', 'train')]:7.1f} img/s"
              f" (x{med[('ditlab', 'train')] / med[('official', 'train')]:.2f})   forward {med[('ditlab', 'sample')]:7.1f} vs"
              f" {med[('official', 'sample')]:7.1f} img/s (x{med[('ditlab', 'sample')] / med[('official', 'sample')]:.2f})")

    lines = [
        "<!-- bench_throughput:start -->",
        "## DiT throughput: ditlab vs official facebookresearch/DiT",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32 CPU."
        f" Median of {args.repeats} alternating runs of {args.steps} steps; same weights in both; ditlab's linear layers"
        f" {'with PyTorch products' if args.no_onednn else 'in oneDNN (the default)'}. Command: `python benchmarks/bench_throughput.py"
        f"{' --no-onednn' if args.no_onednn else ''}`.",
        "",
        "| shape | batch | train img/s ditlab | train img/s official | ratio | forward img/s ditlab | forward img/s official | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, batch, med in rows:
        lines.append(
            f"| {name} | {batch} | {med[('ditlab', 'train')]:.1f} | {med[('official', 'train')]:.1f} | {med[('ditlab', 'train')] / med[('official', 'train')]:.2f} |"
            f" {med[('ditlab', 'sample')]:.1f} | {med[('official', 'sample')]:.1f} | {med[('ditlab', 'sample')] / med[('official', 'sample')]:.2f} |"
        )
    lines.append("<!-- bench_throughput:end -->")
    section = "\n".join(lines)
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Benchmark results\n\n"
    if "<!-- bench_throughput:start -->" in text:
        head, rest = text.split("<!-- bench_throughput:start -->", 1)
        tail = rest.split("<!-- bench_throughput:end -->", 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
