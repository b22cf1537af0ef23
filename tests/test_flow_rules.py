"""Flow matching (objectives/flow.py): what the other flow tests leave open, found by mutation
testing (TESTING.md): option defaults and bounds, the configured time law, the random source,
the trimmed time interval, the sampler's defaults and time grid, clipping, dopri5 tolerances, and
the data-std measurement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ditlab.config import load_config
from ditlab.errors import DitlabError
from ditlab.objectives import build_objective
from ditlab.objectives.flow import T_EPS, FlowObjective, sample_time


class Constant(nn.Module):
    """Velocity v everywhere (plus `extra` junk channels); records every call."""

    in_channels = out_channels = 1
    num_classes = 3

    def __init__(self, v: float = 0.0, extra: int = 0):
        super().__init__()
        self.v, self.extra = v, extra
        self.calls: list[dict] = []

    def forward(self, x, t, y, **kw):
        self.calls.append({"t": t.clone(), "y": y, "batch": x.shape[0]})
        out = torch.full_like(x, self.v)
        return torch.cat([out, torch.full_like(out, 1e3).repeat(1, self.extra, 1, 1)], 1) if self.extra else out


def logit_moments(t: torch.Tensor) -> tuple[float, float]:
    z = torch.log(t / (1 - t)).double()
    return float(z.mean()), float(z.std())


def test_option_defaults_and_bounds():
    obj = FlowObjective()
    assert (obj.prediction, obj.time_sampling, obj.time_mean, obj.time_std) == ("velocity", "uniform", 0.0, 1.0)
    n = 100_000  # standard errors: mean 1/sqrt(n) = 0.003, std 1/sqrt(2n) = 0.002
    m, s = logit_moments(sample_time(n, "logit_normal", generator=torch.Generator().manual_seed(0)))
    assert abs(m) < 0.02 and abs(s - 1) < 0.02  # default law: logit N(0, 1)
    for kwargs in ({"time_std": 0.0}, {"data_std_target": 0.0}, {"data_std": 0.0}):
        with pytest.raises(DitlabError, match="must be > 0"):
            FlowObjective(**kwargs)
    assert FlowObjective(data_std_target=0.5, data_std=0.5).data_scale == 1.0


def test_from_config_passes_every_option():
    cfg = load_config(None, ["objective.kind=flow", "objective.time_sampling=logit_normal", "objective.time_mean=-0.5",
                             "objective.time_std=1.5", "objective.cosine_loss_weight=0.25",
                             "objective.data_std_target=0.82", "objective.data_std=2.0"])
    obj = build_objective(cfg)
    assert (obj.time_sampling, obj.time_mean, obj.time_std, obj.cosine_loss_weight, obj.data_std_target,
            obj.data_std) == ("logit_normal", -0.5, 1.5, 0.25, 0.82, 2.0)


def test_training_times_follow_the_configured_law_and_labels_reach_the_model():
    obj = FlowObjective(time_sampling="logit_normal", time_mean=-0.5, time_std=1.5)
    model = Constant()
    y = torch.arange(20_000) % 3
    obj.loss(model, torch.zeros(20_000, 1, 1, 1), y, generator=torch.Generator().manual_seed(0))
    (call,) = model.calls
    assert call["y"] is y
    m, s = logit_moments(call["t"] / 1000)
    assert abs(m + 0.5) < 5 * 1.5 / math.sqrt(20_000) and abs(s - 1.5) < 5 * 1.5 / math.sqrt(2 * 20_000)


def test_draws_come_from_the_generator_only():
    obj = FlowObjective(time_sampling="logit_normal")
    x0 = torch.randn(8, 1, 2, 2)
    state = torch.random.get_rng_state()
    for kind in ("uniform", "logit_normal"):
        a = sample_time(8, kind, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, sample_time(8, kind, generator=torch.Generator().manual_seed(1)))
    losses = [float(obj.loss(Constant(0.3), x0, torch.zeros(8, dtype=torch.long),
                             generator=torch.Generator().manual_seed(2))["loss"]) for _ in range(2)]
    assert losses[0] == losses[1]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched


def test_loss_reads_only_the_prediction_channels():
    # A learned-sigma model returns 2C channels: the loss takes the first C (the junk is 1e3).
    x0 = torch.zeros(4, 2, 3, 3)
    out = FlowObjective(prediction="data").loss(Constant(0.0, extra=1), x0, torch.zeros(4, dtype=torch.long))
    assert float(out["loss"]) == 0.0


@pytest.mark.parametrize("prediction,grid", [
    ("velocity", [1.0, 0.75, 0.5, 0.25]),
    ("noise", [1 - T_EPS - i * (1 - T_EPS) / 4 for i in range(4)]),  # t <= 1 - T_EPS: (out - x) / (1 - t)
    ("data", [1 - i * (1 - T_EPS) / 4 for i in range(4)]),  # t >= T_EPS: (x - out) / t
])
def test_sampler_time_grid_is_trimmed_and_exact(prediction, grid):
    assert T_EPS == 1e-3
    obj = FlowObjective(prediction=prediction)
    model = Constant()
    obj.sample(model, torch.zeros(2, 1, 1, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.long), steps=4)
    times = [float(c["t"][0]) / 1000 for c in model.calls]
    assert times == pytest.approx(grid, rel=1e-15, abs=1e-15)  # float64 noise: float64 times
    assert all(c["t"].dtype == torch.float64 for c in model.calls)
    assert (obj.t_min, obj.t_max) == {"velocity": (0.0, 1.0), "noise": (0.0, 1 - T_EPS), "data": (T_EPS, 1.0)}[prediction]
    if prediction != "velocity":
        model = Constant()
        obj.sample(model, torch.zeros(2, 1, 1, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.long),
                   sampler="dopri5", steps=None)
        assert float(model.calls[0]["t"][0]) / 1000 == pytest.approx(grid[0], rel=1e-15)  # starts on the trimmed end


def test_sampler_defaults_interval_and_clipping(capsys):
    obj = FlowObjective(guidance_interval=[0.0, 0.5])
    model = Constant()
    x = obj.sample(model, torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), cfg_scale=2.0)
    assert obj.last_nfe == 50 and capsys.readouterr().err == ""  # Euler, 50 steps, no progress bar by default
    assert [c["batch"] for c in model.calls] == [2 if float(c["t"][0]) > 500 else 4 for c in model.calls]
    model.calls.clear()
    obj.sample(model, torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), steps=4, cfg_scale=2.0,
               guidance_interval=[0.6, 1.0])
    assert [c["batch"] for c in model.calls] == [4, 4, 2, 2]  # t = 1, .75 | .5, .25: the call's interval wins
    # Clipped to [-1, 1] by default, at both ends; velocity v moves x from 0 to -v.
    for v in (3.0, -3.0):
        out = obj.sample(Constant(v), torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), steps=2)
        assert torch.equal(out, torch.full_like(out, -math.copysign(1.0, v)))
        raw = obj.sample(Constant(v), torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), steps=2,
                         clip_denoised=False)
        assert torch.allclose(raw, torch.full_like(raw, -v))
    assert x.shape == (2, 1, 1, 1)


def test_dopri5_uses_both_tolerances():
    class Rotation(nn.Module):  # v = A x with a rotation-and-decay A: a smooth field dopri5 must resolve
        in_channels, num_classes = 2, 0

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x, t, y, **kw):
            self.calls += 1
            return torch.stack([3 * x[:, 1] - 0.5 * x[:, 0], -3 * x[:, 0]], 1)

    def nfe(rtol, atol):
        model = Rotation()
        FlowObjective().sample(model, torch.ones(4, 2, 1, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
                               sampler="dopri5", steps=None, rtol=rtol, atol=atol, clip_denoised=False)
        return model.calls

    assert nfe(1e-2, 1e-12) < nfe(1e-8, 1e-12)  # the relative tolerance is used
    assert nfe(1e-12, 1e-2) < nfe(1e-12, 1e-8)  # and the absolute one


def test_measured_data_std_bounds(tmp_path):
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    obj = FlowObjective(data_std_target=0.82)
    obj.loss(Constant(), x, torch.zeros(64, dtype=torch.long))
    assert obj.data_std == pytest.approx(float(x.std()), rel=1e-6)  # a std below 1 is a std
    with pytest.raises(DitlabError, match="zero std"):
        FlowObjective(data_std_target=0.82).loss(Constant(), torch.ones(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    # In a process group, the variance is averaged over the ranks (here one rank: unchanged).
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        obj = FlowObjective(data_std_target=0.82)
        obj.loss(Constant(), x, torch.zeros(64, dtype=torch.long))
        assert obj.data_std == pytest.approx(float(x.std()), rel=1e-6)
    finally:
        dist.destroy_process_group()
