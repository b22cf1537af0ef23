"""nn.Linear with its matrix products in oneDNN on CPU: the same layer and weights, faster products.

PyTorch sends an fp32 `nn.Linear` on CPU to MKL's sgemm. On the AVX-512 CPU measured here
(benchmarks/RESULTS.md, `bench_linear.py`) oneDNN's kernels for the same products run 1.3-2.6x
faster at DiT shapes, and nn.Linear's products are most of a DiT training step. `OneDNNLinear`
is an `nn.Linear` (same parameters, same state_dict, same initialisation) whose forward and
backward call oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor uses
for CPU linears):

    forward        y  = x W^T + b
    backward       dx = dy W,   dW = dy^T x,   db = sum over rows of dy

Only the summation order of those products changes, so results equal F.linear's up to float
rounding (tests/test_onednn.py bounds the difference by the rounding error of a K-term sum).
Everything else (CUDA, autocast, other dtypes, meta tensors, torch.compile, which picks its own
kernels, a PyTorch built without oneDNN) takes F.linear unchanged. `use_onednn_linear(model)`
converts a built model's layers in place; `build_model` does so unless `train.onednn_linear=false`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN and its linear kernel (CPU builds for x86 and most aarch64)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _matmul_t(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a @ b^T (+ bias) in oneDNN; a and b may be transposed views (oneDNN reads the strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul_t(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = _matmul_t(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = _matmul_t(grad.t(), x.t()) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """nn.Linear whose fp32 CPU products run in oneDNN (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if torch.compiler.is_compiling() or not (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                                                  and x.numel() > 0 and not torch.is_autocast_enabled("cpu")):
            return F.linear(x, w, self.bias)
        y = _LinearFunction.apply(x.reshape(-1, x.shape[-1]), w, self.bias)
        return y.view(*x.shape[:-1], w.shape[0])


def use_onednn_linear(model: nn.Module) -> int:
    """Turn every plain nn.Linear of model into a OneDNNLinear in place; returns how many.

    Only the class changes (parameters, buffers, hooks and state_dict keys stay), so official
    checkpoints load as before. Subclasses of nn.Linear are left as they are. Without oneDNN the
    model is left unchanged (0).
    """
    if not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            count += 1
    return count
