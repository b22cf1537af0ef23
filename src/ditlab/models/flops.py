"""Gflops per forward pass and parameter counts, in the DiT paper's convention.

The DiT paper's "Gflops" (Table 4: DiT-XL/2 118.6, DiT-S/2 6.06 at 256x256, i.e. 32x32x4
latents) are multiply-accumulates (MACs) of one forward pass of one image, attention included.
torch.utils.flop_counter counts 2 FLOPs per MAC for matmuls/linears/convs, and counts nothing
for the CPU fused attention kernel, so we count attention ourselves (QK^T and AV: two batched
matmuls of B*heads*N*M*d MACs each) and report counted FLOPs / 2.

Models are built and run on the meta device (shapes only, no memory, no arithmetic), so
DiT-XL/2 is as cheap to count as DiT-S/8; models that cannot run on meta fall back to CPU.

It lives in models/ so that both train/ (training-compute accounting) and eval/ (`ditlab flops`,
which imports it through `ditlab.eval.flops`) can use it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ditlab.errors import DitlabError
from ditlab.models import build_model

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs (2 per MAC) of softmax(QK^T)V for q [B,h,N,d], k [B,h,M,d], v [B,h,M,dv]."""
    *batch, n, d = query_shape
    m, dv = key_shape[-2], value_shape[-1]
    b = 1
    for s in batch:
        b *= s
    return 2 * b * n * m * d + 2 * b * n * m * dv


def _linear_flops(input_shape, weight_shape, *args, **kwargs) -> int:
    """FLOPs of x W^T for x [..., K] and W [N, K]: oneDNN's linear (`onednn.py`), counted as aten's mm."""
    rows = 1
    for s in input_shape[:-1]:
        rows *= s
    return 2 * rows * weight_shape[0] * weight_shape[1]


# Ops without a formula in torch's registry: CPU fused attention (the CUDA kernels have one, with the
# same count) and oneDNN's linear, which `build_model` uses on CPU.
FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    FORMULAS[torch.ops.mkldnn._linear_pointwise] = _linear_flops


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
    counter = FlopCounterMode(display=False, custom_mapping=FORMULAS)
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
        model = build_model(cfg).eval()
        g = gflops(model)
    return {"name": cfg.model.name, "params": count_params(model), "gflops": g}
