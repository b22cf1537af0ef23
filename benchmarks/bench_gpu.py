"""DiT training throughput on one CUDA GPU: img/s, model FLOPs utilisation and peak memory.

    python benchmarks/bench_gpu.py                                  # DiT-XL/2, 256x256 (32x32x4 latents)
    python benchmarks/bench_gpu.py --official /path/to/DiT          # the official models.py beside it
    python benchmarks/bench_gpu.py --device cpu --model DiT-S/8 --input-size 8 --batch 4 --steps 2   # smoke run
    python benchmarks/bench_gpu.py --budget-s 420 --out gpu.md      # on a lent GPU: stop starting rows at 7 min

One training step = the official DiT step: Gaussian-diffusion hybrid loss (learned sigma) on
random latents, AdamW, under bf16 autocast on CUDA (fp32 on CPU). Variants, each timed after
warm-up with CUDA events around `--steps` steps:
  eager / torch.compile;  SDPA backend flash / efficient / math;  gradient checkpointing off / on;
then the fastest variant at doubling batches up to the first that does not fit. Model FLOPs utilisation (MFU) =
3 x forward FLOPs (ditlab's counter, attention counted analytically; the DiT paper's training
convention) x img/s / the device's dense bf16 peak (from the table below by device name, or
--peak-tflops). Prints a table and, with --out, writes it as markdown naming the device, again after
every row, so a run stopped from outside keeps what it measured. Nothing is reported for a variant
that did not run: its row says why (out of memory, no kernel, past --budget-s).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ditlab.eval.flops import gflops
from ditlab.models import DiT_models
from ditlab.objectives.gaussian import GaussianObjective

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' datasheets, by a substring
# of torch.cuda.get_device_name(). Datasheet peaks are not reached by any kernel; MFU is against them.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,  # fp32-accumulate rate of the A10G datasheet
}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def sdpa_backend(name: str):
    """A context manager that allows only one SDPA backend (None: torch's own choice)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "math": SDPBackend.MATH}[name])


def build(args, official_cls=None, grad_ckpt: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(input_size=args.input_size, in_channels=4, num_classes=1000)
    if official_cls is not None:
        size = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
        depth, hidden, heads = size[args.model.split("-")[1].split("/")[0]]
        return official_cls(depth=depth, hidden_size=hidden, num_heads=heads,
                            patch_size=int(args.model.split("/")[1]), **kw)
    return DiT_models[args.model](grad_checkpointing=grad_ckpt, **kw)


def time_steps(model: torch.nn.Module, args, batch: int, device: torch.device, *, compiled: bool,
               backend: str) -> float:
    """Images per second over args.steps training steps (after warm-up)."""
    model = model.to(device).train()
    objective = GaussianObjective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 4, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), sdpa_backend(backend):
            loss = objective.loss(forward, x, y)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - t0
    return batch * args.steps / seconds


def measure(label: str, make, args, batch: int, device: torch.device, train_gflops: float, peak: float | None,
            **kw) -> dict:
    """One row: img/s, MFU and peak memory, or the reason it did not run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        rate = time_steps(make(), args, batch, device, **kw)
    except torch.cuda.OutOfMemoryError:
        return {"variant": label, "batch": batch, "error": "out of memory"}
    except RuntimeError as e:  # e.g. no kernel for that SDPA backend on this device
        return {"variant": label, "batch": batch, "error": str(e).splitlines()[0][:80]}
    row = {"variant": label, "batch": batch, "img_s": rate, "tflops": rate * train_gflops / 1e3}
    if peak:
        row["mfu"] = row["tflops"] / peak
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def format_table(rows: list[dict]) -> str:
    lines = ["| variant | batch | img/s | TFLOP/s | MFU | peak memory (GiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | — ({r['error']}) | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "—"
        mem = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "—"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['img_s']:.1f} | {r['tflops']:.2f} | {mfu} | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models))
    p.add_argument("--input-size", type=int, default=32, help="latent side (256x256 images -> 32)")
    p.add_argument("--batch", type=int, default=32, help="batch of the variant sweep")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-batch", type=int, default=1024, help="upper end of the batch sweep")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    p.add_argument("--official", default=None, help="facebookresearch/DiT checkout: time its models.py too")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="only eager/compiled with torch's SDPA choice")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new measurement after this many seconds (a lent GPU's time is short)")
    p.add_argument("--out", default=None, help="write the table as markdown here (rewritten after every row)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; nothing was measured (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU"
    peak = peak_tflops(name, args.peak_tflops) if cuda else args.peak_tflops
    train_gflops = 3 * gflops(build(args).eval())
    print(f"{args.model} at {args.input_size}x{args.input_size}x4 on {name}: {train_gflops:.1f} training Gflop per image; "
          f"peak {peak or 'unknown'} TFLOP/s")
    head = (f"{args.model}, {args.input_size}x{args.input_size}x4 latents, {name}, torch {torch.__version__}, "
            f"{'bf16 autocast, fused AdamW' if cuda else 'fp32, AdamW'}, {args.steps} timed steps after {args.warmup}; "
            f"MFU against {peak or 'unknown'} TFLOP/s dense bf16. Command: "
            f"`python benchmarks/bench_gpu.py{''.join(' ' + a for a in argv)}`.")
    rows: list[dict] = []

    def add(row: dict) -> None:  # printed and written at once: a run cut short keeps what it measured
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        if args.out:
            Path(args.out).write_text(f"## GPU training throughput\n\n{head}\n\n{format_table(rows)}\n")

    def in_budget(label: str, batch: int) -> bool:
        if args.budget_s is None or time.perf_counter() - started < args.budget_s:
            return True
        add({"variant": label, "batch": batch, "error": f"not run: past --budget-s {args.budget_s:g}"})
        return False

    variants = [("eager", False, "auto", False), ("compiled", True, "auto", False)]
    if not args.quick:
        variants += [(f"eager, {b}", False, b, False) for b in ("flash", "efficient", "math")]
        variants += [("eager, grad checkpointing", False, "auto", True), ("compiled, grad checkpointing", True, "auto", True)]
    for label, compiled, backend, ckpt in variants:
        if in_budget(label, args.batch):
            add(measure(label, lambda ckpt=ckpt: build(args, grad_ckpt=ckpt), args, args.batch, device,
                        train_gflops, peak, compiled=compiled, backend=backend))
    ran = [r for r in rows if "img_s" in r]
    if ran and cuda:  # the fastest variant at doubling batches, up to the first that does not fit
        best = max(ran, key=lambda r: r["img_s"])
        compiled, backend, ckpt = next((c, b, k) for lab, c, b, k in variants if lab == best["variant"])
        label, batch = f"{best['variant']}, batch sweep", args.batch * 2
        while batch <= args.max_batch and in_budget(label, batch):
            add(measure(label, lambda: build(args, grad_ckpt=ckpt), args, batch, device, train_gflops, peak,
                        compiled=compiled, backend=backend))
            if "error" in rows[-1]:
                break
            batch *= 2
    if args.official:
        sys.path.insert(0, args.official)  # its models.py imports timm (see benchmarks/README.md)
        spec = importlib.util.spec_from_file_location("official_dit_models", Path(args.official) / "models.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for label, compiled in (("official, eager", False), ("official, compiled", True)):
            if in_budget(label, args.batch):
                add(measure(label, lambda: build(args, official_cls=module.DiT), args, args.batch, device,
                            train_gflops, peak, compiled=compiled, backend="auto"))
    print(format_table(rows))
    ran = [r for r in rows if "img_s" in r]
    median = statistics.median(r["img_s"] for r in ran) if ran else float("nan")
    print(f"median over variants: {median:.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
