"""Gflops per forward pass and parameter counts, in the DiT paper's convention.

The DiT paper's "Gflops" (Table 4: DiT-XL/2 118.6, DiT-S/2 6.06 at 256x256, i.e. 32x32x4
latents) are multiply-accumulates (MACs) of one forward pass of one image, attention included.
torch.utils.flop_counter counts 2 FLOPs per MAC for matmuls/linears/convs, and counts nothing
for the CPU fused attention kernel, so we count attention ourselves (QK^T and AV: two batched
matmuls of B*heads*N*M*d MACs each) and report counted FLOPs / 2.

Models are built and run on the meta device (shapes only, no memory, no arithmetic), so
DiT-XL/2 is as cheap to count as DiT-S/8; models that cannot run on meta fall back to CPU.
"""

from __future__ import annotations

import argparse
import inspect

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ditlab.errors import DitlabError

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs (2 per MAC) of softmax(QK^T)V for q [B,h,N,d], k [B,h,M,d], v [B,h,M,dv]."""
    *batch, n, d = query_shape
    m, dv = key_shape[-2], value_shape[-1]
    b = 1
    for s in batch:
        b *= s
    return 2 * b * n * m * d + 2 * b * n * m * dv


# CPU fused attention has no formula in torch's registry; the CUDA kernels do (same count).
ATTENTION_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def model_inputs(model: nn.Module, batch: int = 1, device: str | torch.device = "cpu") -> tuple[tuple, dict]:
    """Dummy (x, t, y) and keyword inputs for a ditlab model (dt= when it conditions on step size)."""
    size = model.input_size
    x = torch.zeros(batch, model.in_channels, size, size, device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    kwargs = {}
    if getattr(model, "step_size_cond", False) and "dt" in inspect.signature(model.forward).parameters:
        kwargs["dt"] = torch.full((batch,), 1 / 128, device=device)
    return (x, t, y), kwargs


def count_flops(model: nn.Module, batch: int = 1) -> float:
    """FLOPs (2 per MAC, torch's convention) of one forward pass of `batch` images."""
    device = next(model.parameters()).device
    args, kwargs = model_inputs(model, batch, device)
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    return float(counter.get_total_flops())


def gflops(model: nn.Module) -> float:
    """DiT-paper Gflops (GMACs) of one forward pass of one image."""
    return count_flops(model, batch=1) / 2 / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_for_counting(cfg) -> nn.Module:
    """Build cfg's model on the meta device (falls back to CPU if construction fails there)."""
    from ditlab.models import build_model

    try:
        with torch.device("meta"):
            return build_model(cfg).eval()
    except DitlabError:
        raise
    except Exception:
        return build_model(cfg).eval()


def measure(cfg) -> dict:
    """{'name', 'params', 'gflops'} of cfg's model; meta device first, CPU if that fails."""
    model = build_for_counting(cfg)
    try:
        g = gflops(model)
    except DitlabError:
        raise
    except Exception:
        if next(model.parameters()).device.type != "meta":
            raise
        from ditlab.models import build_model

        model = build_model(cfg).eval()
        g = gflops(model)
    return {"name": cfg.model.name, "params": count_params(model), "gflops": g}


# ----------------------------------------------------------------------------- CLI


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
    import json

    from ditlab.config import load_config

    overrides = list(args.set)
    if args.config is None:  # the paper's setting: 256x256 ImageNet through the SD VAE (32x32x4)
        overrides = ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000"] + overrides
    if args.image_size is not None:
        overrides.append(f"model.input_size={args.image_size // 8}")
    if args.input_size is not None:
        overrides.append(f"model.input_size={args.input_size}")
    if args.in_channels is not None:
        overrides.append(f"model.in_channels={args.in_channels}")
    if args.num_classes is not None:
        overrides.append(f"model.num_classes={args.num_classes}")
    base = load_config(args.config, overrides) if args.config else load_config(None, overrides)
    names = args.models or ([base.model.name] if args.config else _all_dit_names())
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
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _all_dit_names() -> list[str]:
    from ditlab.models import DiT_models

    return list(DiT_models)


__all__ = ["count_flops", "gflops", "count_params", "measure"]
