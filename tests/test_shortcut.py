"""Shortcut models: target construction by hand, the (t, d) draws, sampling, CFG, training, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from ditlab.config import load_config
from ditlab.objectives import build_objective
from ditlab.objectives.flow import FlowObjective
from ditlab.objectives.shortcut import ShortcutObjective
from ditlab.errors import DitlabError
from test_flow import MEANS, STDS, GMMField, gmm, moment_error, noise


class Linear(nn.Module):
    """s(x, t, d) = A x + B t + C d (t and d arrive in 0..1000 units); records every call."""

    in_channels = out_channels = 1
    num_classes = 0

    def __init__(self, A=0.5, B=2.0, C=4.0):
        super().__init__()
        self.A, self.B, self.C = A, B, C
        self.calls: list[tuple[Tensor, Tensor, Tensor, bool]] = []

    def forward(self, x, t, y, dt):
        self.calls.append((x.clone(), t.clone(), dt.clone(), self.training))
        expand = lambda v: v.view(-1, 1, 1, 1) / 1000  # noqa: E731
        return self.A * x + self.B * expand(t) + self.C * expand(dt)


def test_bootstrap_target_matches_hand_computation():
    # x = 1, t = 0.5, d = 0.5, half step h = 0.25:
    # v1 = 0.5*1 + 2*0.5 + 4*0.25 = 2.5;  x_mid = 1 - 0.25*2.5 = 0.375
    # v2 = 0.5*0.375 + 2*0.25 + 4*0.25 = 1.6875;  target = (2.5 + 1.6875) / 2 = 2.09375
    model = Linear().train()
    target = ShortcutObjective().bootstrap_target(model, torch.ones(1, 1, 1, 1), torch.tensor([0.5]), torch.zeros(1, dtype=torch.long), torch.tensor([0.5]))
    assert float(target) == pytest.approx(2.09375)
    (x1, t1, d1, train1), (x2, t2, d2, train2) = model.calls
    assert float(t1) == pytest.approx(500) and float(t2) == pytest.approx(250)
    assert float(d1) == float(d2) == pytest.approx(250)
    assert float(x2) == pytest.approx(0.375)
    assert not train1 and not train2 and model.training  # eval mode for the target only
    assert not target.requires_grad


def test_loss_regresses_onto_the_two_half_steps():
    # fraction 1: every row is a self-consistency row. For the linear model the two half steps
    # give target = A x + B t + C d/2 - (d/4)(A v1 + B) with v1 = A x + B t + C d/2, so
    # pred - target = C d/2 + (d/4)(A v1 + B).
    A, B, C = 0.5, 2.0, 4.0
    model = Linear(A, B, C)
    out = ShortcutObjective(fraction=1.0).loss(model, torch.randn(64, 1, 2, 2), torch.zeros(64, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    x, t, d, _ = model.calls[-1]  # the prediction pass sees (x_t, t, d)
    x, t, d = x, t.view(-1, 1, 1, 1) / 1000, d.view(-1, 1, 1, 1) / 1000
    v1 = A * x + B * t + C * d / 2
    expected = ((C * d / 2 + d / 4 * (A * v1 + B)) ** 2).mean()
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert "loss_flow" not in out and float(out["loss_boot"]) == pytest.approx(float(out["loss"]))


def test_flow_rows_train_the_velocity_at_the_smallest_step():
    # fraction 0: every row is flow matching at d = 1/128 with target eps - x0.
    model = Linear(0.0, 0.0, 0.0)  # predicts 0, so the loss is E|eps - x0|^2 = 1 + 0.25
    x0 = torch.full((2048, 1, 2, 2), 0.5)
    out = ShortcutObjective(fraction=0.0).loss(model, x0, torch.zeros(2048, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert float(out["loss"]) == pytest.approx(1.25, rel=0.05)
    ((_, t, d, train),) = model.calls  # one call: no target passes
    assert train and torch.all(d == 1000 / 128)
    assert torch.all((t / 1000 * 128 - (t / 1000 * 128).round()).abs() < 1e-4) and float(t.min()) > 0


def test_draws_lie_on_the_grids():
    obj = ShortcutObjective(fraction=0.25, base_steps=128)
    t, d, nb = obj.draw(4000, generator=torch.Generator().manual_seed(0))
    assert nb == 1000
    k = -torch.log2(d[:nb])
    assert set(k.round().int().tolist()) == set(range(7))  # d = 1, 1/2, ..., 1/64
    j = t[:nb] / d[:nb]
    assert torch.allclose(j, j.round(), atol=1e-4) and float(j.min()) >= 1 and torch.all(j <= 1 / d[:nb] + 1e-4)
    assert torch.all(t[:nb] - d[:nb] >= -1e-6)  # a step of size d from t never passes the data end
    assert torch.all(d[nb:] == 1 / 128)
    assert float(t[nb:].min()) == pytest.approx(1 / 128) and float(t[nb:].max()) == 1.0


class FlowOnly(GMMField):
    """The exact flow field, ignoring dt: the shortcut of a vanishing step."""

    def forward(self, x, t, y, dt=None):
        self.dts = getattr(self, "dts", []) + [float(dt[0])]
        return super().forward(x, t, y)


def test_sampler_steps_match_euler_on_the_same_grid():
    obj = ShortcutObjective()
    y = torch.zeros(500, dtype=torch.long)
    for steps in (1, 4, 128):
        field = FlowOnly([0.5, 0.3, 0.2], MEANS, STDS)
        x = obj.sample(field, noise(500), y, steps=steps, clip_denoised=False)
        ref = FlowObjective().sample(gmm(), noise(500), y, sampler="euler", steps=steps, clip_denoised=False)
        # Same model calls and the same updates: times 1 - i/steps and the step -1/steps are dyadic,
        # so both samplers compute exactly the same numbers.
        assert torch.equal(x, ref)
        assert field.calls == obj.last_nfe == steps
        assert field.dts == [1000 / steps] * steps
        assert field.times == pytest.approx([1 - i / steps for i in range(steps)])
    dmean, dcov = moment_error(x, gmm())  # 128 steps of the exact field reproduce the law
    assert dmean < 0.1 and dcov < 0.2


def test_sampling_with_guidance_passes_dt_to_both_halves():
    field = FlowOnly([0.5, 0.3, 0.2], MEANS, STDS, num_classes=3)
    x = ShortcutObjective().sample(field, noise(8), torch.full((8,), 1, dtype=torch.long), steps=2, cfg_scale=1.5)
    assert field.batches == [16, 16] and field.dts == [500.0, 500.0]
    assert x.shape == (8, 2, 1, 1) and float(x.abs().max()) <= 1.0  # clipped by default


def tiny_cfg(kind: str):
    return load_config(None, [
        f"objective.kind={kind}", "model.name=DiT-S/2", "model.input_size=8", "model.hidden_size=64",
        "model.depth=2", "model.num_heads=2", "model.num_classes=4", "model.learn_sigma=false",
    ])


def bars(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """8x8 images in [-1, 1]: class k is a bright horizontal bar at rows 2k, 2k+1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = -torch.ones(n, 1, 8, 8)
    for i, k in enumerate(y.tolist()):
        x[i, 0, 2 * k : 2 * k + 2] = 1.0
    return x + 0.05 * torch.randn(x.shape, generator=g), y


def train_tiny(kind: str, steps: int = 40) -> tuple[float, float]:
    from ditlab.models import build_model

    torch.manual_seed(0)
    cfg = tiny_cfg(kind)
    model, obj = build_model(cfg), build_objective(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_eval, y_eval = bars(256, seed=99)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(obj.loss(model, x_eval, y_eval, generator=torch.Generator().manual_seed(7))["loss"])

    before = eval_loss()
    for step in range(steps):
        x, y = bars(32, seed=step)
        loss = obj.loss(model, x, y, generator=torch.Generator().manual_seed(1000 + step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, eval_loss()


def test_training_a_tiny_dit_lowers_the_shortcut_loss():
    before, after = train_tiny("shortcut")
    assert after < 0.6 * before, (before, after)


def test_bad_input():
    obj = ShortcutObjective()
    y = torch.zeros(2, dtype=torch.long)
    for steps in (3, 0, 256, 6):
        with pytest.raises(DitlabError, match="power of two from 1 to 128"):
            obj.sample(Linear(), noise(2)[:, :1], y, steps=steps)
    with pytest.raises(DitlabError, match="unknown sampler 'euler'.*shortcut"):
        obj.sample(Linear(), noise(2)[:, :1], y, sampler="euler", steps=4)
    with pytest.raises(DitlabError, match="num_classes=0"):
        obj.sample(Linear(), noise(2)[:, :1], y, steps=4, cfg_scale=3.0)
    for override, match in [("objective.shortcut_base_steps=100", "power of two"), ("objective.shortcut_fraction=1.5", "shortcut_fraction"),
                            ("objective.data_std_target=0.82", "belongs to objective.kind flow, not shortcut"),
                            ("objective.prediction=noise", "belongs to objective.kind flow")]:
        with pytest.raises(DitlabError, match=match):
            build_objective(load_config(None, ["objective.kind=shortcut", override]))
    assert math.log2(build_objective(load_config(None, ["objective.kind=shortcut"])).base_steps) == 7


# ---- through the CLI: `ditlab train` / `ditlab sample` with flow and shortcut runs ------------------

TINY = ["model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
        "train.steps=2", "train.ckpt_every=2", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
        "optim.batch_size=8", "sample.num_samples=2", "sample.steps=2", "data.source=mnist-embedded"]


RUNS = {"flow": ["objective.kind=flow"], "shortcut": ["objective.kind=shortcut", "sample.sampler=shortcut"],
        "uncond": ["objective.kind=flow", "model.num_classes=0", "sample.cfg_scale=1.0"]}


class _Runs(dict):
    """Tiny runs trained through `ditlab train` on first use (2 steps each)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        from ditlab.cli import main

        assert main(["train", *TINY, *RUNS[name], f"train.out_dir={self.root / name}"]) == 0
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp("runs"))


def test_cli_trains_and_samples_flow_and_shortcut(runs, tmp_path, capsys):
    from ditlab.cli import main

    for run, flags in [("flow", ["--sampler", "euler", "--steps", "3"]), ("flow", ["--sampler", "heun", "--steps", "2"]),
                       ("flow", ["--sampler", "dopri5"]), ("shortcut", ["--steps", "4", "--cfg-scale", "2"])]:
        png = tmp_path / f"{run}.png"
        assert main(["sample", "--ckpt", str(runs[run]), *flags, "--labels", "0,1", "--out-png", str(png), "--no-progress"]) == 0
        assert png.is_file()
        printed = capsys.readouterr().out
        if "dopri5" in flags:  # the adaptive solver reports how many model calls it made
            assert re.search(r"\b\d+ model calls", printed), printed


@pytest.mark.parametrize("run,args,message", [
    ("flow", ["sample", "--sampler", "rk4"], "unknown sampler 'rk4'"),
    ("shortcut", ["sample", "--steps", "3"], "power of two from 1 to 128"),
    ("shortcut", ["sample", "--sampler", "euler"], "unknown sampler 'euler'"),
    ("uncond", ["sample", "--cfg-scale", "3"], "num_classes=0"),
])
def test_cli_bad_input(runs, tmp_path, capsys, run, args, message):
    from ditlab.cli import main

    code = main([args[0], "--ckpt", str(runs[run]), *args[1:], "--out-png", str(tmp_path / "x.png"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("override,message", [
    ("objective.time_sampling=beta", "time_sampling"),
    ("objective.prediction=score", "prediction"),
    ("objective.shortcut_base_steps=96", "power of two"),
])
def test_cli_train_rejects_bad_objective_options(tmp_path, capsys, override, message):
    from ditlab.cli import main

    kind = "shortcut" if "shortcut" in override else "flow"
    code = main(["train", *TINY, f"objective.kind={kind}", override, f"train.out_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_label_dropout_is_drawn_once_for_target_and_prediction():
    """A dropped row must be unconditional in the two target passes and in the prediction alike."""

    class Recorder(nn.Module):
        num_classes, in_channels = 10, 2

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.calls = []

        def forward(self, x, t, y, dt=None, force_drop_ids=None):
            self.calls.append((y.clone(), force_drop_ids, self.training))
            return x * self.w

    obj = ShortcutObjective(fraction=0.5, base_steps=8, num_classes=10, class_dropout_prob=0.5)
    model = Recorder().train()
    y = torch.arange(16) % 10
    obj.loss(model, torch.randn(16, 2, 1, 1), y, generator=torch.Generator().manual_seed(0))
    (y1, f1, tr1), (y2, f2, tr2), (yp, fp, trp) = model.calls
    assert not tr1 and not tr2 and trp  # targets in eval mode, prediction in train mode
    assert f1 is None and f2 is None and torch.equal(fp, torch.zeros(16, dtype=torch.long))  # model dropout off
    assert torch.equal(y1, yp[:8]) and torch.equal(y2, yp[:8])  # the same labels in all passes
    dropped = yp == 10
    assert 0 < int(dropped.sum()) < 16 and torch.equal(yp[~dropped], y[~dropped])
    # No dropout configured: labels pass through and the model is called as before.
    model.calls.clear()
    ShortcutObjective(fraction=0.5, base_steps=8).loss(model, torch.randn(16, 2, 1, 1), y)
    assert all(torch.equal(c[0], y[: len(c[0])]) and c[1] is None for c in model.calls)
