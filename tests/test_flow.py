"""Flow matching: samplers driven by an exact closed-form field, loss terms, CFG, NFE, CLI errors.

The test problem is a Gaussian mixture whose interpolant velocity is known in closed form.
Closed-form velocity of the linear interpolant for a Gaussian-mixture data law (test helper).

Data x0 ~ sum_k pi_k N(mu_k, s_k^2 I) in D dims, x_t = (1 - t) x0 + t eps, eps ~ N(0, I).
Given component k, x_t ~ N(m_k, sig_k^2 I) with m_k = (1 - t) mu_k, sig_k^2 = (1 - t)^2 s_k^2 + t^2,
and (x_t, eps, x0) are jointly Gaussian, so
    E[eps | x_t, k] = t / sig_k^2 (x_t - m_k)
    E[x0  | x_t, k] = mu_k + (1 - t) s_k^2 / sig_k^2 (x_t - m_k)
The marginal field averages these with the posterior weights w_k(x_t) ∝ pi_k N(x_t; m_k, sig_k^2 I):
    v(x_t) = E[eps - x0 | x_t] = sum_k w_k (E[eps | x_t, k] - E[x0 | x_t, k]).
"""

from __future__ import annotations


import pytest
import torch
from torch import Tensor, nn

from ditlab.config import load_config
from ditlab.objectives import build_objective
from ditlab.objectives.flow import FlowObjective, sample_time
from ditlab.errors import DitlabError



class GMMField(nn.Module):
    """A "model" returning the exact velocity / noise / data prediction, shaped like a DiT.

    x is [B, D, 1, 1]; t arrives scaled by 1000 (the flow objective's convention). With
    num_classes > 0 a label k selects component k (the conditional field) and the null label
    (index num_classes) gives the mixture. Every call is counted in `calls`, batch sizes in `batches`.
    """

    def __init__(self, weights, means, stds, prediction: str = "velocity", num_classes: int = 0):
        super().__init__()
        self.pi = torch.tensor(weights, dtype=torch.float64)
        self.mu = torch.tensor(means, dtype=torch.float64)  # [K, D]
        self.s = torch.tensor(stds, dtype=torch.float64)  # [K]
        self.prediction = prediction
        self.in_channels = self.out_channels = self.mu.shape[1]
        self.num_classes = num_classes
        self.learn_sigma = False
        self.input_size = 1
        self.calls = 0
        self.batches: list[int] = []
        self.times: list[float] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor, **kw) -> Tensor:
        self.calls += 1
        self.batches.append(x.shape[0])
        self.times.append(float(t[0]) / 1000)
        z = x.flatten(1).double()  # [B, D]
        tt = (t.double() / 1000).view(-1, 1, 1)  # [B, 1, 1]
        m = (1 - tt) * self.mu  # [B, K, D]
        var = ((1 - tt) ** 2 * self.s.view(1, -1, 1) ** 2 + tt**2)  # [B, K, 1]
        r = z[:, None, :] - m
        logw = torch.log(self.pi) - 0.5 * (r**2 / var).sum(-1) - 0.5 * z.shape[1] * torch.log(var[..., 0])
        if self.num_classes > 0:  # a real label picks its component; the null label keeps the mixture
            onehot = torch.nn.functional.one_hot(y.clamp(max=self.num_classes - 1), len(self.pi)).bool()
            cond = (y < self.num_classes)[:, None]
            logw = torch.where(cond & ~onehot, torch.full_like(logw, -torch.inf), logw)
        w = torch.softmax(logw, dim=1)[..., None]  # [B, K, 1]
        e_eps = (w * tt * r / var).sum(1)
        e_x0 = (w * (self.mu + (1 - tt) * self.s.view(1, -1, 1) ** 2 * r / var)).sum(1)
        out = {"velocity": e_eps - e_x0, "noise": e_eps, "data": e_x0}[self.prediction]
        return out.to(x.dtype).view_as(x)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean [D] and covariance [D, D] of the data law."""
        mean = (self.pi[:, None] * self.mu).sum(0)
        d = self.mu.shape[1]
        second = sum(p * (torch.outer(m, m) + s**2 * torch.eye(d, dtype=torch.float64)) for p, m, s in zip(self.pi, self.mu, self.s))
        return mean, second - torch.outer(mean, mean)


# A 2-D mixture of three well-separated Gaussians.
WEIGHTS = [0.5, 0.3, 0.2]
MEANS = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
STDS = [0.3, 0.5, 0.4]
N = 8000


def gmm(prediction: str = "velocity", num_classes: int = 0) -> GMMField:
    return GMMField(WEIGHTS, MEANS, STDS, prediction, num_classes)


def noise(n: int = N, seed: int = 0) -> Tensor:
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed))


def moment_error(x: Tensor, field: GMMField) -> tuple[float, float]:
    z = x.flatten(1).double()
    mean, cov = field.moments()
    return float((z.mean(0) - mean).abs().max()), float((torch.cov(z.T) - cov).abs().max())


def component_shares(x: Tensor) -> Tensor:
    z = x.flatten(1).double()
    nearest = torch.cdist(z, torch.tensor(MEANS, dtype=torch.float64)).argmin(1)
    return torch.bincount(nearest, minlength=3).double() / len(z)


def draw(obj: FlowObjective, model: nn.Module, sampler: str, steps: int, y: Tensor | None = None, **kw) -> Tensor:
    y = torch.zeros(N, dtype=torch.long) if y is None else y
    return obj.sample(model, noise(len(y)), y, sampler=sampler, steps=steps, clip_denoised=False, **kw)


# Monte Carlo with N = 8000 gives a standard error of about 0.02 on the mean (std ~1.8).
@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 20), ("dopri5", 0)])
def test_samplers_reproduce_gmm_moments(sampler, steps):
    field = gmm()
    obj = FlowObjective()
    x = draw(obj, field, sampler, steps)
    dmean, dcov = moment_error(x, field)
    assert dmean < 0.06 and dcov < 0.15, (dmean, dcov)
    assert torch.allclose(component_shares(x), torch.tensor(WEIGHTS, dtype=torch.float64), atol=0.02)
    assert obj.last_nfe == field.calls


def test_few_euler_steps_do_not_reproduce_the_law():
    # The moment check can fail: one Euler step lands on the mean velocity's image, not the mixture.
    field = gmm()
    x = draw(FlowObjective(), field, "euler", 1)
    dmean, dcov = moment_error(x, field)
    assert dcov > 0.5


def test_heun_is_second_order_against_dopri5():
    field = gmm()
    obj = FlowObjective()
    ref = draw(obj, field, "dopri5", 0, rtol=1e-7, atol=1e-7)
    err = {s: float((draw(obj, field, "heun", s) - ref).abs().mean()) for s in (8, 16)}
    err_euler = float((draw(obj, field, "euler", 16) - ref).abs().mean())
    assert err[16] < err_euler / 5
    assert 2.5 < err[8] / err[16] < 6  # ~4 for a second-order method


@pytest.mark.parametrize("prediction", ["noise", "data"])
def test_noise_and_data_prediction_are_converted_to_velocity(prediction):
    field = gmm(prediction)
    obj = FlowObjective(prediction=prediction)
    x = draw(obj, field, "heun", 40)
    dmean, dcov = moment_error(x, field)
    assert dmean < 0.06 and dcov < 0.15, (dmean, dcov)
    # same ODE as velocity prediction, up to the trimmed end of the interval
    v = draw(FlowObjective(), gmm(), "heun", 40)
    assert float((x - v).abs().mean()) < 0.02


def test_step_counts_equal_function_evaluations():
    obj = FlowObjective()
    y = torch.zeros(4, dtype=torch.long)
    for sampler, steps, nfe in [("euler", 7, 7), ("heun", 7, 13), ("heun", 1, 1)]:
        field = gmm()
        obj.sample(field, noise(4), y, sampler=sampler, steps=steps)
        assert field.calls == obj.last_nfe == nfe
    field = gmm()
    obj.sample(field, noise(4), y, sampler="dopri5", steps=0)
    assert field.calls == obj.last_nfe > 6  # dopri5: 6 evaluations per step plus the first
    loose = gmm()
    obj.sample(loose, noise(4), y, sampler="dopri5", steps=0, rtol=1e-2, atol=1e-2)
    assert loose.calls < field.calls  # the adaptive solver takes fewer steps at a looser tolerance


def test_euler_time_grid_runs_from_noise_to_data():
    field = gmm()
    FlowObjective().sample(field, noise(4), torch.zeros(4, dtype=torch.long), sampler="euler", steps=4)
    assert field.times == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_class_conditioning_and_guidance_interval():
    field = gmm(num_classes=3)
    obj = FlowObjective()
    y = torch.full((N,), 1, dtype=torch.long)
    x = draw(obj, field, "heun", 20, y=y)  # label 1: component 1 only
    assert torch.allclose(x.flatten(1).mean(0).double(), torch.tensor(MEANS[1], dtype=torch.float64), atol=0.03)
    assert float(x.flatten(1).std(0).mean()) == pytest.approx(STDS[1], abs=0.03)
    # guidance only for t in [0, 0.5]: calls at t = 1.0, 0.9, ..., 0.1; doubled batch only inside
    field = gmm(num_classes=3)
    obj = FlowObjective(guidance_interval=[0.0, 0.5])
    obj.sample(field, noise(4), torch.ones(4, dtype=torch.long), sampler="euler", steps=10, cfg_scale=3.0)
    assert field.calls == obj.last_nfe == 10
    assert field.batches == [4 if t > 0.5 + 1e-9 else 8 for t in field.times]
    assert field.batches.count(8) == 5


def test_guidance_extrapolates_from_the_unconditional_field():
    field = gmm(num_classes=3)
    x, y = noise(16), torch.full((16,), 2, dtype=torch.long)
    obj = FlowObjective()
    tt = torch.full((16,), 0.4)
    # The guided velocity is the formula on the doubled batch the one guided call runs ...
    both = field(torch.cat([x, x]), torch.cat([tt, tt]) * 1000, torch.cat([y, torch.full_like(y, 3)]))
    v_c, v_u = both.chunk(2)
    assert torch.equal(obj.velocity(field, x, 0.4, y, 4.0), v_u + 4.0 * (v_c - v_u))
    # ... the field of each label: the field works row by row in float64, so a batch of 16 and one
    # of 32 may differ by float64 rounding, which moves the float32 result by at most one ulp.
    for v, label in ((v_c, y), (v_u, torch.full_like(y, 3))):
        single = field(x, tt * 1000, label)
        assert torch.all((v - single).abs() <= torch.finfo(torch.float32).eps * single.abs())
    # the samples move past the class's component, away from the mixture mean
    y = torch.full((2000,), 2, dtype=torch.long)
    plain = draw(obj, field, "euler", 50, y=y)
    guided = draw(obj, field, "euler", 50, y=y, cfg_scale=4.0)
    mean, _ = field.moments()
    direction = torch.tensor(MEANS[2], dtype=torch.float64) - mean
    along = lambda x: float(((x.flatten(1).double() - mean) @ direction).mean())  # noqa: E731
    assert along(guided) > along(plain) + 0.5


def test_data_std_scaling_round_trip():
    # The model learns the law of x0 * target/std; sampling undoes the scale.
    std, target = 2.0, 0.82
    scale = target / std
    scaled = GMMField(WEIGHTS, [[m * scale for m in mu] for mu in MEANS], [s * scale for s in STDS])
    obj = FlowObjective(data_std_target=target, data_std=std)
    x = draw(obj, scaled, "heun", 20)
    dmean, dcov = moment_error(x, gmm())
    assert dmean < 0.06 and dcov < 0.15, (dmean, dcov)


class Recorder(nn.Module):
    """Returns a fixed multiple of eps recovered from x_t (valid when x0 = 0: x_t = t eps)."""

    in_channels = out_channels = 1
    num_classes = 0

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor
        self.seen: list[Tensor] = []

    def forward(self, x, t, y):
        self.seen.append(x)
        return self.factor * x / (t / 1000).view(-1, 1, 1, 1)


def test_loss_terms_closed_form():
    # x0 = 0, so x_t = t eps and the velocity target is eps: a model returning c * eps has
    # mse = (c - 1)^2 E[eps^2] and direction loss 0 if c > 0, 2 if c < 0.
    x0 = torch.zeros(512, 1, 4, 4)
    y = torch.zeros(512, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    out = FlowObjective(cosine_loss_weight=0.5).loss(Recorder(3.0), x0, y, generator=g)
    assert float(out["mse"]) == pytest.approx(4.0, rel=0.05)
    assert float(out["cos"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["loss"]) == pytest.approx(float(out["mse"]), rel=1e-5)
    out = FlowObjective(cosine_loss_weight=0.5).loss(Recorder(-1.0), x0, y, generator=g)
    assert float(out["cos"]) == pytest.approx(2.0, abs=1e-5)
    assert float(out["loss"]) == pytest.approx(float(out["mse"]) + 1.0, rel=1e-5)
    assert "cos" not in FlowObjective().loss(Recorder(1.0), x0, y, generator=g)


def test_measured_data_std_lives_in_the_objective_state():
    cfg = load_config(None, ["objective.kind=flow", "objective.data_std_target=0.82"])
    obj = build_objective(cfg)
    assert obj.state_dict() == {}  # nothing measured yet
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 + 1
    rec = Recorder(1.0)
    obj.loss(rec, x0, torch.zeros(64, dtype=torch.long))
    assert obj.state_dict()["data_std"] == pytest.approx(float(x0.std()))
    assert obj.data_scale == pytest.approx(0.82 / float(x0.std()))
    assert cfg.objective.data_std is None  # the config is never written behind the caller's back
    # a later batch does not change it
    obj.loss(rec, x0 * 10, torch.zeros(64, dtype=torch.long))
    assert obj.state_dict()["data_std"] == pytest.approx(float(x0.std()))
    # a fresh objective (a resumed run, `load_run`) takes it from the saved state
    restored = build_objective(cfg)
    restored.load_state_dict(obj.state_dict())
    assert restored.data_scale == obj.data_scale
    with pytest.raises(DitlabError, match="data_std"):
        FlowObjective(data_std_target=0.82).sample(rec, noise(2)[:, :1], torch.zeros(2, dtype=torch.long), sampler="euler", steps=2)


def test_std_scaled_run_keeps_its_measured_std_through_resume_and_load_run(tmp_path):
    from ditlab.cli import main
    from ditlab.runs import latest_checkpoint, load_run, load_state
    from test_train import tiny

    args = tiny(tmp_path / "run", "objective.data_std_target=0.82", "train.ckpt_every=2")
    assert main(["train", *args, "train.steps=2"]) == 0
    measured = load_state(latest_checkpoint(tmp_path / "run"))["objective"]["data_std"]
    assert load_config(tmp_path / "run" / "config.yaml").objective.data_std is None
    assert main(["train", *args, "train.steps=4", "--resume"]) == 0
    assert load_state(latest_checkpoint(tmp_path / "run"))["objective"]["data_std"] == measured  # not re-measured
    assert load_run(tmp_path / "run").objective.data_std == measured


@pytest.mark.parametrize("kind", ["logit_normal", "lognormal"])
def test_logit_normal_time_sampling(kind):
    t = sample_time(200_000, kind, mean=-0.5, std=1.5, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(-0.5, abs=0.02)
    assert float(logit.std()) == pytest.approx(1.5, abs=0.02)
    u = sample_time(200_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01) and float(u.var()) == pytest.approx(1 / 12, abs=0.002)


def test_from_config_and_bad_input():
    cfg = load_config(None, ["objective.kind=flow", "objective.prediction=data", "sample.guidance_interval=[0.1,0.6]"])
    obj = build_objective(cfg)
    assert isinstance(obj, FlowObjective) and obj.prediction == "data" and obj.guidance_interval == (0.1, 0.6)
    assert obj.samplers[0] == "euler"
    for override, match in [
        ("objective.prediction=score", "prediction"),
        ("objective.time_sampling=beta", "time_sampling"),
        ("sample.guidance_interval=[0.8,0.2]", "guidance_interval"),
    ]:
        with pytest.raises(DitlabError, match=match):
            build_objective(load_config(None, ["objective.kind=flow", override]))
    obj = FlowObjective()
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(DitlabError, match="unknown sampler 'rk4'.*euler, heun, dopri5"):
        obj.sample(gmm(), noise(2), y, sampler="rk4", steps=4)
    with pytest.raises(DitlabError, match="positive integer"):
        obj.sample(gmm(), noise(2), y, sampler="euler", steps=0)
    with pytest.raises(DitlabError, match="num_classes=0"):
        obj.sample(gmm(), noise(2), y, sampler="euler", steps=2, cfg_scale=2.0)


def test_training_a_tiny_dit_lowers_the_flow_loss():
    from test_shortcut import train_tiny

    before, after = train_tiny("flow")
    assert after < 0.6 * before, (before, after)
