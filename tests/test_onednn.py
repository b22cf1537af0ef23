"""nn.Linear through oneDNN (models/onednn.py): the same layer up to float rounding, taken where valid.

The layer's forward and backward are each a sum of K products; whatever order a kernel sums them
in, the float32 result differs from the exact one by at most gamma_K = K u / (1 - K u) times the
sum of the terms' magnitudes (u = 2^-24, the standard bound for a dot product, with or without
FMA). The exact values come from float64, whose own error is 2^29 times smaller. A kernel that
computed in bf16 or dropped a term would break the bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ditlab.config import load_config, load_run_config, save_config
from ditlab.models import build_model
from ditlab.models import onednn
from ditlab.models.onednn import OneDNNLinear, use_onednn_linear

pytestmark = pytest.mark.skipif(not onednn.onednn_available(), reason="this PyTorch has no oneDNN")

U = 2.0 ** -24


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def _check(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int, what: str) -> None:
    assert got.dtype == torch.float32
    err = (got.double() - exact).abs()
    bound = gamma(terms) * magnitude + U * exact.abs()  # the sum's error, then rounding the result to float32
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the float32 rounding bound"


@pytest.fixture
def counted(monkeypatch):
    """Counts the oneDNN products actually computed."""
    calls = []
    real = onednn._matmul_t

    def matmul_t(a, b, bias=None):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, bias)

    monkeypatch.setattr(onednn, "_matmul_t", matmul_t)
    return calls


def _layer(k: int, n: int, bias: bool = True) -> tuple[nn.Linear, OneDNNLinear]:
    plain = nn.Linear(k, n, bias=bias)
    with torch.no_grad():  # magnitudes of both signs well away from the default init's
        plain.weight.copy_(torch.randn(n, k) * 3)
        if bias:
            plain.bias.copy_(torch.randn(n) * 5)
    fast = copy.deepcopy(plain)
    assert use_onednn_linear(fast) == 1
    return plain, fast


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_within_the_rounding_bound_of_exact_arithmetic(counted, bias):
    torch.manual_seed(0)
    batch, tokens, k, n = 3, 37, 130, 70  # odd sizes: no kernel's block size divides them
    _, fast = _layer(k, n, bias)
    x = (torch.randn(batch, tokens, k) * 2).requires_grad_()
    grad_out = torch.randn(batch, tokens, n)
    y = fast(x)
    y.backward(grad_out)
    assert y.shape == (batch, tokens, n)
    assert len(counted) == 3, "forward, input gradient and weight gradient must all run in oneDNN"

    x64, w64, g64 = x.detach().double().reshape(-1, k), fast.weight.detach().double(), grad_out.double().reshape(-1, n)
    b64 = fast.bias.detach().double() if bias else torch.zeros(n, dtype=torch.float64)
    rows = x64.shape[0]
    _check(y.reshape(-1, n), x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), k + 1, "y")
    _check(x.grad.reshape(-1, k), g64 @ w64, g64.abs() @ w64.abs(), n, "dL/dx")
    _check(fast.weight.grad, g64.T @ x64, g64.abs().T @ x64.abs(), rows, "dL/dW")
    if bias:
        _check(fast.bias.grad, g64.sum(0), g64.abs().sum(0), rows, "dL/db")
    else:
        assert fast.bias is None


def test_gradients_only_for_what_requires_them(counted):
    torch.manual_seed(0)
    _, fast = _layer(16, 8)
    fast.weight.requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and fast.weight.grad is None and fast.bias.grad is not None
    assert len(counted) == 2  # forward and dL/dx, no weight-gradient product

    counted.clear()
    fast.weight.requires_grad_(True)
    fast(torch.randn(5, 16)).sum().backward()  # an input without gradient (e.g. fixed frequency features)
    assert fast.weight.grad is not None and len(counted) == 2


@pytest.mark.parametrize("case", ["float64", "meta", "autocast", "empty", "compiling"])
def test_everything_else_takes_f_linear(counted, monkeypatch, case):
    torch.manual_seed(0)
    plain, fast = _layer(12, 6)
    x = torch.randn(4, 12)
    if case == "float64":
        plain, fast, x = plain.double(), fast.double(), x.double()
    elif case == "meta":  # how models/flops.py counts
        plain, fast, x = plain.to("meta"), fast.to("meta"), x.to("meta")
    elif case == "empty":
        x = x[:0]
    elif case == "compiling":  # inductor cannot lower oneDNN's linear with a trainable weight: it takes aten's
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got, want = fast(x), plain(x)
    assert counted == []
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    if case != "meta":
        assert torch.equal(got, want)


def test_conversion_keeps_weights_keys_and_subclasses():
    torch.manual_seed(0)

    class Special(nn.Linear):  # a subclass has its own forward: not ours to replace
        pass

    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 8), Special(8, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_onednn_linear(model) == 2
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [OneDNNLinear, OneDNNLinear, Special]
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_the_smallest_input_runs_in_onednn(counted):
    _, fast = _layer(1, 3)
    x = torch.full((1, 1), 2.0, requires_grad=True)
    fast(x).sum().backward()  # one value in: only an empty input (no rows to reduce over) takes F.linear
    assert len(counted) == 3


def test_availability_needs_onednn_and_its_linear_kernel(monkeypatch):
    assert onednn.onednn_available()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not onednn.onednn_available()

    def broken():
        raise RuntimeError("no oneDNN in this build")

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", broken)
    assert not onednn.onednn_available()


def test_without_onednn_nothing_changes(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_available", lambda: False)
    model = nn.Sequential(nn.Linear(4, 4))
    assert use_onednn_linear(model) == 0 and type(model[0]) is nn.Linear


def test_build_model_converts_unless_switched_off(tmp_path):
    overrides = ["model.name=DiT-S/4", "model.input_size=8", "model.hidden_size=32", "model.depth=1",
                 "model.num_heads=2", "model.in_channels=1", "model.num_classes=3"]
    fast = build_model(load_config(None, overrides))
    plain = build_model(load_config(None, [*overrides, "train.onednn_linear=false"]))
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert not any(isinstance(m, OneDNNLinear) for m in plain.modules())
    assert list(fast.state_dict()) == list(plain.state_dict())

    # a run saved before the option existed keeps PyTorch's products, so its resume stays bit-identical
    path = tmp_path / "config.yaml"
    save_config(load_config(None, overrides), path)
    assert load_run_config(path).train.onednn_linear is True
    path.write_text(path.read_text().replace("  onednn_linear: true\n", ""))
    assert load_run_config(path).train.onednn_linear is False

