"""Shortcut models (objectives/shortcut.py): what the other shortcut tests leave open, found by
mutation testing (TESTING.md): the draws' law and their random source, label dropout's settings,
the smallest bootstrap share, and the sampler's defaults, guidance interval, dtype and clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditlab.config import load_config
from ditlab.objectives import build_objective
from ditlab.objectives.shortcut import ShortcutObjective


class Constant(nn.Module):
    """s(x, t, d) = v: a constant velocity; records each call's batch, t, d and their dtypes."""

    in_channels = out_channels = 1
    num_classes = 3

    def __init__(self, v: float = 0.0):
        super().__init__()
        self.v = v
        self.calls: list[dict] = []

    def forward(self, x, t, y, dt=None, **kw):
        self.calls.append({"batch": x.shape[0], "t": t.clone(), "dt": dt.clone(), "y": y.clone()})
        return torch.full_like(x, self.v)


def test_bootstrap_draws_are_uniform_on_each_grid():
    # d = 2^-k, t = j d with j uniform on 1..2^k: the mean of t given d is (1 + d) / 2, and t = 1
    # (j = 2^k) is drawn. Standard error of a mean of n uniform draws: at most 0.29 / sqrt(n).
    obj = ShortcutObjective(fraction=1.0, base_steps=128)
    t, d, nb = obj.draw(20_000, generator=torch.Generator().manual_seed(0))
    assert nb == 20_000
    for k in range(7):
        sel = (d - 2.0**-k).abs() < 1e-9
        n = int(sel.sum())
        assert n > 2000
        assert float(t[sel].mean()) == pytest.approx((1 + 2.0**-k) / 2, abs=5 * 0.29 / n**0.5), k
        assert float(t[sel].max()) == pytest.approx(1.0)


def test_draws_and_losses_come_from_the_generator_only():
    obj = ShortcutObjective(fraction=0.5, base_steps=8, num_classes=3, class_dropout_prob=0.5)
    x0, y = torch.randn(16, 1, 2, 2), torch.arange(16) % 3
    state = torch.random.get_rng_state()
    a = obj.draw(16, generator=torch.Generator().manual_seed(1))
    b = obj.draw(16, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a[:2], b[:2]))
    la = obj.drop_labels(y, torch.Generator().manual_seed(2))[0]
    assert torch.equal(la, obj.drop_labels(y, torch.Generator().manual_seed(2))[0])
    losses = [float(obj.loss(Constant(0.3), x0, y, generator=torch.Generator().manual_seed(3))["loss"]) for _ in range(2)]
    assert losses[0] == losses[1]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched


def test_label_dropout_settings():
    y = torch.arange(12) % 3
    assert torch.equal(ShortcutObjective().drop_labels(y)[0], y)  # default: no dropout
    # No classes: nothing to drop, whatever the probability.
    kept, kw = ShortcutObjective(num_classes=0, class_dropout_prob=0.9).drop_labels(y)
    assert torch.equal(kept, y) and kw == {}
    # One class still has its null label (index 1).
    dropped, kw = ShortcutObjective(num_classes=1, class_dropout_prob=1.0).drop_labels(torch.zeros(4, dtype=torch.long))
    assert dropped.tolist() == [1, 1, 1, 1] and torch.equal(kw["force_drop_ids"], torch.zeros(4, dtype=torch.long))
    obj = build_objective(load_config(None, ["objective.kind=shortcut", "model.num_classes=7",
                                             "model.class_dropout_prob=0.15", "sample.guidance_interval=[0.0,0.5]"]))
    assert (obj.num_classes, obj.class_dropout_prob, obj.guidance_interval) == (7, 0.15, (0.0, 0.5))
    assert ShortcutObjective(base_steps=2).levels == 1  # the smallest grid: one step of 1/2


def test_one_bootstrap_row_and_none():
    model = Constant(0.3)
    out = ShortcutObjective(fraction=0.25).loss(model, torch.randn(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    assert [c["batch"] for c in model.calls] == [1, 1, 4]  # two half steps for the one row, then all 4
    assert {"loss_boot", "loss_flow"} <= out.keys()
    out = ShortcutObjective(fraction=0.0).loss(Constant(0.3), torch.randn(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    assert "loss_boot" not in out and "loss_flow" in out


def test_sampler_defaults_interval_dtype_and_clipping(capsys):
    obj = ShortcutObjective(guidance_interval=[0.0, 0.5])
    model = Constant(0.0)
    x = obj.sample(model, torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long), cfg_scale=2.0)
    assert obj.last_nfe == 4 and capsys.readouterr().err == ""  # 4 steps by default, no progress bar
    # t = 1, 0.75, 0.5, 0.25: guided (a doubled batch) only inside [0, 0.5]; times follow the noise dtype.
    assert [c["batch"] for c in model.calls] == [2, 2, 4, 4]
    assert all(c["t"].dtype == c["dt"].dtype == torch.float64 for c in model.calls) and x.dtype == torch.float64
    model.calls.clear()
    obj.sample(model, torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), cfg_scale=2.0, guidance_interval=[0.6, 1.0])
    assert [c["batch"] for c in model.calls] == [4, 4, 2, 2]  # the call's interval overrides the objective's
    # Clipping to [-1, 1] at both ends: velocity 3 moves x from 0 to -3 in 4 steps.
    down = obj.sample(Constant(3.0), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    assert torch.equal(down, torch.full_like(down, -1.0))
    up = obj.sample(Constant(-3.0), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), clip_denoised=False)
    assert torch.allclose(up, torch.full_like(up, 3.0))
