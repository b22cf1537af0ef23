"""The regression targets of flow matching and shortcut models on data that is neither zero nor constant.

An oracle "model" is told the batch's x0. From the (x_t, t) it is called with it recovers the noise
through the documented interpolant x_t = (1 - t) x0 + t eps (t = 1 noise, model time 1000 t), and
returns the exact regression target (eps - x0 for velocity, eps for noise, x0 for data prediction),
or the velocity with the wrong sign (eps + x0). So, independently of how the objective draws t and
eps:
  - the exact oracle has loss 0 up to float rounding;
  - the wrong-sign oracle has loss mean(((eps + x0) - (eps - x0))^2) = 4 mean(x0^2).
Tests with x0 = 0 or a constant x0 cannot tell eps - x0 from eps + x0 (or from eps); these can.

Shortcut models: for a data law that is one point per row (the oracle's view) every path is a
straight line with constant velocity eps - x0, so two half steps of the exact oracle average to
eps - x0 as well: the exact oracle has loss 0 on the self-consistency rows too, and the wrong-sign
oracle 4 mean(x0^2) on the flow rows.

Float error bound. x_t is made by float32 operations, so it carries an error of a few units of
float32 roundoff u times |x0| + |eps|; recovering eps divides that by t. A chain of K = 8 rounded
float32 operations (interpolant 3, output cast 1, target 2, difference 2) gives a per-element error
of at most K u (|x0| + |eps|) (1 + 1/t). For the shortcut targets the second half step starts at
t - d/2 >= t/2 from a point made with two more roundings: twice the chain and 1/t -> 2/t.
The bound on the mean squared error is the mean of the squared per-element bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ditlab.objectives.flow import FlowObjective
from ditlab.objectives.shortcut import ShortcutObjective

U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff
K = 8  # rounded float32 operations on the path from x0, eps to the squared error


pytestmark = pytest.mark.usefixtures("one_thread")


class Oracle(nn.Module):
    """Returns `kind` of the row's (x0, eps), recovering eps from x_t = (1 - t) x0 + t eps."""

    in_channels = out_channels = 2
    num_classes = 0
    learn_sigma = False

    def __init__(self, x0: Tensor, kind: str):
        super().__init__()
        self.x0, self.kind = x0.double(), kind
        self.calls: list[dict] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor, dt: Tensor | None = None, **kw) -> Tensor:
        tt = (t.double() / 1000).view(-1, 1, 1, 1)
        x0 = self.x0[: x.shape[0]]  # the bootstrap passes see the first rows only
        eps = (x.double() - (1 - tt) * x0) / tt
        self.calls.append({"t": tt, "eps": eps, "x0": x0})
        out = {"velocity": eps - x0, "wrong_sign": eps + x0, "noise": eps, "data": x0}[self.kind]
        return out.to(x.dtype)


def data(n: int = 256, seed: int = 0) -> Tensor:
    """Non-zero, non-constant x0: every row and pixel differs, mean 0.3, std 0.7."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.7 * torch.randn(n, 2, 4, 4, generator=g)


def error_bound(call: dict, factor: float = 1.0) -> float:
    """Bound on the mean squared error of an exact prediction (module docstring)."""
    e = factor * K * U32 * (call["x0"].abs() + call["eps"].abs()) * (1 + factor / call["t"])
    return float((e**2).mean())


@pytest.mark.parametrize("prediction,time_sampling", [
    ("velocity", "uniform"), ("velocity", "logit_normal"), ("noise", "uniform"), ("data", "uniform"),
])
def test_flow_loss_is_zero_for_the_exact_target(prediction, time_sampling):
    x0 = data()
    y = torch.zeros(len(x0), dtype=torch.long)
    obj = FlowObjective(prediction=prediction, time_sampling=time_sampling)
    oracle = Oracle(x0, prediction)
    out = obj.loss(oracle, x0, y, generator=torch.Generator().manual_seed(1))
    (call,) = oracle.calls
    assert float(out["loss"]) <= error_bound(call)
    # The times the model saw lie in the objective's interval (noise/data prediction trim one end).
    t = call["t"].flatten()
    assert float(t.min()) >= obj.t_min and float(t.max()) <= obj.t_max and float(t.std()) > 0.1


def test_flow_velocity_target_is_eps_minus_x0():
    x0 = data()
    y = torch.zeros(len(x0), dtype=torch.long)
    wrong = Oracle(x0, "wrong_sign")
    loss = float(FlowObjective().loss(wrong, x0, y, generator=torch.Generator().manual_seed(1))["loss"])
    expected = float(4 * (x0.double() ** 2).mean())  # ((eps + x0) - (eps - x0))^2 = 4 x0^2
    (call,) = wrong.calls
    # |(2 x0 + e)^2 - 4 x0^2| <= 4 |x0| e + e^2 with e the per-element bound.
    e = K * U32 * (call["x0"].abs() + call["eps"].abs()) * (1 + 1 / call["t"])
    assert abs(loss - expected) <= float((4 * call["x0"].abs() * e + e**2).mean()) + 4 * U32 * expected
    assert expected > 1.0  # far from 0: the two signs are told apart


def test_flow_target_with_data_std_scaling_uses_the_scaled_data():
    # The model learns x0 * target/std: its exact velocity is eps - scale * x0.
    x0 = data()
    y = torch.zeros(len(x0), dtype=torch.long)
    obj = FlowObjective(data_std_target=0.82, data_std=2.0)
    oracle = Oracle(x0 * 0.41, "velocity")
    out = obj.loss(oracle, x0, y, generator=torch.Generator().manual_seed(2))
    assert float(out["loss"]) <= error_bound(oracle.calls[0])
    unscaled = Oracle(x0, "velocity")  # an oracle of the unscaled data is wrong here
    assert float(obj.loss(unscaled, x0, y, generator=torch.Generator().manual_seed(2))["loss"]) > 0.1


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_shortcut_loss_is_zero_for_the_exact_velocity(fraction):
    x0 = data()
    y = torch.zeros(len(x0), dtype=torch.long)
    oracle = Oracle(x0, "velocity")
    out = ShortcutObjective(fraction=fraction, base_steps=8).loss(oracle, x0, y, generator=torch.Generator().manual_seed(3))
    assert len(oracle.calls) == (3 if fraction > 0 else 1)  # two target half steps, then the prediction
    assert float(out["loss"]) <= error_bound(oracle.calls[-1], factor=2.0)


def test_shortcut_flow_rows_regress_onto_eps_minus_x0():
    x0 = data()
    y = torch.zeros(len(x0), dtype=torch.long)
    wrong = Oracle(x0, "wrong_sign")
    obj = ShortcutObjective(fraction=0.5, base_steps=8)
    out = obj.loss(wrong, x0, y, generator=torch.Generator().manual_seed(3))
    nb = len(x0) // 2
    call = wrong.calls[-1]
    # Flow rows (d = 1/base_steps): target eps - x0, prediction eps + x0.
    flow = {k: v[nb:] for k, v in call.items()}
    expected = float(4 * (flow["x0"] ** 2).mean())
    e = 2 * K * U32 * (flow["x0"].abs() + flow["eps"].abs()) * (1 + 2 / flow["t"])
    assert abs(float(out["loss_flow"]) - expected) <= float((4 * flow["x0"].abs() * e + e**2).mean()) + 4 * U32 * expected
    assert expected > 1.0
