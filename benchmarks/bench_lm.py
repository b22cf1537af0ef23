"""Byte-LM throughput: ditlab's vanilla LM side by side with karpathy/nanoGPT's model.py (same
width, depth, context and byte vocabulary, in one process, alternating runs, medians and the
ratio), and ditlab's Infini LM at the same size.

    python benchmarks/bench_lm.py NANOGPT_CHECKOUT [--repeats 5] [--steps 3] [--threads N]

NANOGPT_CHECKOUT is a directory holding nanoGPT's model.py (it imports only torch). Tokens are
bytes. "train" is forward + cross-entropy + backward + AdamW step; "eval" is forward + the
cross-entropy over every position under no_grad (what bits-per-byte evaluation does; nanoGPT
computes full logits when given targets). For the comparison ditlab's model is configured as
nanoGPT's architecture: LayerNorm, learned positions, GELU MLP x4, tied embeddings, no dropout,
nanoGPT with bias=False (ditlab's LayerNorm keeps its bias: d parameters per norm). The rows
"ditlab default" (RMSNorm + RoPE) and "ditlab Infini" (segments of a quarter of the context,
linear memory) have no nanoGPT counterpart. ditlab's linear layers compute in oneDNN, as
`build_model` gives them on CPU (`--no-onednn`: PyTorch's own products, as nanoGPT's).
Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ditlab.models.lm import build_lm
from ditlab.models.onednn import use_onednn_linear

# (name, d_model, layers, heads, context, batch): the CPU recipe (configs/lm_gcide.yaml) and a wider one.
SHAPES = [
    ("recipe d128 L4 T128", 128, 4, 4, 128, 32),
    ("d256 L6 T256", 256, 6, 4, 256, 8),
]
START, END = "<!-- bench_lm:start -->", "<!-- bench_lm:end -->"


def load_nanogpt(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return name


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, nanogpt: bool) -> torch.Tensor:
    if nanogpt:
        return model(x, y)[1]
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_rate(model, x, y, steps: int, nanogpt: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    loss_of(model, x, y, nanogpt).backward()  # warm-up (allocations, first-call overheads)
    opt.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for _ in range(steps):
        loss_of(model, x, y, nanogpt).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return x.numel() * steps / (time.perf_counter() - start)


@torch.no_grad()
def eval_rate(model, x, y, steps: int, nanogpt: bool) -> float:
    model.eval()
    loss_of(model, x, y, nanogpt)
    start = time.perf_counter()
    for _ in range(steps):
        loss_of(model, x, y, nanogpt)
    return x.numel() * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nanogpt", type=Path, help="nanoGPT checkout (holds model.py)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-onednn", action="store_true",
                        help="ditlab's linear layers with PyTorch's own products (train.onednn_linear=false)")
    args = parser.parse_args()
    if not (args.nanogpt / "model.py").is_file():
        raise SystemExit(f"error: {args.nanogpt / 'model.py'} not found (give a karpathy/nanoGPT checkout)")
    if args.threads:
        torch.set_num_threads(args.threads)
    nano = load_nanogpt(args.nanogpt)

    rows = []
    for name, d, layers, heads, T, B in SHAPES:
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter count
            theirs = nano.GPT(nano.GPTConfig(block_size=T, vocab_size=256, n_layer=layers, n_head=heads, n_embd=d,
                                             dropout=0.0, bias=False))
        common = dict(seq_len=T, d_model=d, n_layers=layers, n_heads=heads, mlp_ratio=4.0)
        models = {
            "nanoGPT": theirs,
            "ditlab (nanoGPT arch)": build_lm(**common, norm="layernorm", pos="learned"),
            "ditlab default": build_lm(**common),
            "ditlab Infini": build_lm(**common, attention="infini", segment_len=T // 4),
        }
        if not args.no_onednn:  # as build_model gives them (train.onednn_linear, the default)
            for label, model in models.items():
                if label != "nanoGPT":
                    use_onednn_linear(model)
        x = torch.randint(0, 256, (B, T))
        y = torch.randint(0, 256, (B, T))
        rates = {(m, k): [] for m in models for k in ("train", "eval")}
        for _ in range(args.repeats):  # alternate so drift in machine load hits every model alike
            for label, model in models.items():
                nanogpt = label == "nanoGPT"
                rates[(label, "train")].append(train_rate(model, x, y, args.steps, nanogpt))
                rates[(label, "eval")].append(eval_rate(model, x, y, args.steps, nanogpt))
        med = {k: statistics.median(v) for k, v in rates.items()}
        params = {label: sum(p.numel() for p in m.parameters()) for label, m in models.items()}
        rows.append((name, B, med, params))
        ref_t, ref_e = med[("nanoGPT", "train")], med[("nanoGPT", "eval")]
        for label in models:
            t, e = med[(label, "train")], med[(label, "eval")]
            print(f"{name:22s} {label:22s} {params[label] / 1e6:5.2f}M  train {t:9.0f} tok/s (x{t / ref_t:.2f})"
                  f"   eval {e:9.0f} tok/s (x{e / ref_e:.2f})")

    lines = [
        START,
        "## Byte-LM throughput: ditlab vs karpathy/nanoGPT",
        "",
        f"Machine: {machine()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}, fp32 CPU."
        f" Median of {args.repeats} alternating runs of {args.steps} steps; tokens are bytes (vocabulary 256)."
        f" Command: `python benchmarks/bench_lm.py NANOGPT_CHECKOUT{f' --threads {args.threads}' if args.threads else ''}"
        f"{' --no-onednn' if args.no_onednn else ''}`; ditlab's linear layers"
        f" {'with PyTorch products' if args.no_onednn else 'in oneDNN (the default)'}."
        " Ratios are against nanoGPT's model.py"
        " (ditlab configured as its architecture: LayerNorm, learned positions, bias=False, tied embeddings);"
        " \"default\" is RMSNorm + RoPE, \"Infini\" has 4 segments per context and a linear memory.",
        "",
        "| shape | batch | model | params | train tok/s | ratio | eval tok/s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, B, med, params in rows:
        ref_t, ref_e = med[("nanoGPT", "train")], med[("nanoGPT", "eval")]
        for label in params:
            t, e = med[(label, "train")], med[(label, "eval")]
            lines.append(f"| {name} | {B} | {label} | {params[label] / 1e6:.2f}M | {t:,.0f} | {t / ref_t:.2f} |"
                         f" {e:,.0f} | {e / ref_e:.2f} |")
    lines.append(END)
    section = "\n".join(lines)
    text = args.out.read_text() if args.out.exists() else "# Benchmark results\n\n"
    if START in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
