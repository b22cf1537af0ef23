"""Gaussian diffusion against independent references: diffusers' schedulers and closed forms."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from ditlab.objectives.gaussian import GaussianObjective, create_diffusion, space_timesteps
from ditlab.errors import DitlabError

diffusers = pytest.importorskip("diffusers")


def _const_model(out: torch.Tensor, seen: list | None = None):
    """A 'model' that returns a fixed output (and records the timesteps it was called with)."""

    def model(x, t, **kw):
        if seen is not None:
            seen.append(t.clone())
        return out

    return model


# ------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("ours,theirs", [("linear", "linear"), ("squaredcos_cap_v2", "squaredcos_cap_v2"),
                                         ("quadratic", "scaled_linear")])
def test_alphas_cumprod_match_diffusers(ours, theirs):
    d = create_diffusion("", noise_schedule=ours)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=1e-4, beta_end=0.02)
    assert d.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(d.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(d.betas, ref.betas.double().numpy(), rtol=1e-5, atol=1e-9)


def test_linear_schedule_rescales_with_steps():
    # Official: endpoints scaled by 1000 / T so that shorter processes add similar total noise.
    d = create_diffusion("", diffusion_steps=500)
    assert d.num_timesteps == 500
    np.testing.assert_allclose([d.betas[0], d.betas[-1]], [2e-4, 0.04], rtol=1e-9)
    with pytest.raises(DitlabError, match="diffusion_steps"):
        create_diffusion("", diffusion_steps=20)  # last beta = 1: degenerate
    with pytest.raises(DitlabError, match="noise_schedule"):
        create_diffusion("", noise_schedule="sigmoid")


# ------------------------------------------------------------------------------------ respacing


def test_respacing_official_timestep_sets():
    # Expected values printed by the official DiT code: diffusion.respace.space_timesteps(1000, ...).
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert sorted(space_timesteps(1000, "10,10,10")) == [
        0, 37, 74, 111, 148, 185, 222, 259, 296, 333, 334, 371, 408, 445, 482, 518, 555, 592, 629, 666,
        667, 704, 741, 778, 815, 851, 888, 925, 962, 999]
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and sum(s250) == 124875
    assert s250[:10] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert s250[120:130] == [481, 485, 489, 493, 497, 502, 506, 510, 514, 518]
    assert s250[-5:] == [983, 987, 991, 995, 999]
    assert sorted(space_timesteps(1000, "25")) == [
        0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791,
        832, 874, 916, 957, 999]
    assert sorted(space_timesteps(100, "3,4,3")) == [0, 16, 33, 34, 45, 55, 66, 67, 83, 99]
    assert create_diffusion("").num_timesteps == 1000
    with pytest.raises(DitlabError):
        space_timesteps(1000, "ddim600")  # no integer stride gives exactly 600 steps


def test_respaced_process_keeps_alphas_cumprod_and_feeds_original_timesteps():
    full, spaced = create_diffusion(""), create_diffusion("ddim10", learn_sigma=False)
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    seen: list = []
    x = torch.randn(2, 1, 4, 4)
    spaced.p_mean_variance(_const_model(torch.zeros_like(x), seen), x, torch.tensor([9, 3]))
    assert seen[0].tolist() == [900, 300]  # the model is called with the original timestep numbers


# ------------------------------------------------------------------------------------ samplers vs diffusers


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(eta):
    steps = 50
    d = create_diffusion(f"ddim{steps}", learn_sigma=False)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    clip_sample=True, set_alpha_to_one=True, steps_offset=0)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == sorted(d.timestep_map, reverse=True)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5)
    for k, t_orig in enumerate(sched.timesteps.tolist()):
        if k % 7:
            continue
        eps = torch.randn_like(x) * 1.5  # large enough that x0 gets clipped at some steps
        i = steps - 1 - k  # index in the respaced process
        seen: list = []
        ours = d.ddim_sample(_const_model(eps, seen), x, torch.full((3,), i), eta=eta,
                             generator=torch.Generator().manual_seed(k))["sample"]
        assert seen[0].tolist() == [t_orig] * 3
        # use_clipped_model_output: the official code re-derives eps from the clipped x0.
        theirs = sched.step(eps, t_orig, x, eta=eta, use_clipped_model_output=True,
                            generator=torch.Generator().manual_seed(k)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("sigma_small,variance_type", [(True, "fixed_small"), (False, "fixed_large")])
def test_ddpm_step_matches_diffusers(sigma_small, variance_type):
    d = create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    variance_type=variance_type, clip_sample=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4)
    for t in (999, 500, 37, 1, 0):
        eps = torch.randn_like(x)
        ours = d.p_sample(_const_model(eps), x, torch.full((2,), t), generator=torch.Generator().manual_seed(t))["sample"]
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=3e-5)


# ------------------------------------------------------------------------------------ closed forms


def _abar(betas: np.ndarray) -> torch.Tensor:
    return torch.cumprod(1 - torch.from_numpy(betas), 0)


def test_q_sample_closed_form_and_statistics():
    d = create_diffusion("")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64).numpy()  # independent schedule
    abar = _abar(betas)
    x0, noise = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 10, 500, 999])
    expect = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise).double(), expect, rtol=1e-5, atol=1e-6)
    # Statistically: x_t | x_0 ~ N(sqrt(abar) x0, 1 - abar).
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    tt = torch.full((20000,), 300)
    xt = d.q_sample(x0, tt)
    assert abs(xt.mean().item() - 0.7 * abar[300].sqrt().item()) < 0.02
    assert abs(xt.std().item() - (1 - abar[300]).sqrt().item()) < 0.02


def _bayes_posterior(betas: np.ndarray, x0: torch.Tensor, xt: torch.Tensor, t: int):
    """q(x_{t-1} | x_t, x_0) by multiplying q(x_t | x_{t-1}) and q(x_{t-1} | x_0) (t >= 1)."""
    b = torch.from_numpy(betas)
    abar_prev = _abar(betas)[t - 1]
    precision = (1 - b[t]) / b[t] + 1 / (1 - abar_prev)
    var = 1 / precision
    mean = var * ((1 - b[t]).sqrt() * xt / b[t] + abar_prev.sqrt() * x0 / (1 - abar_prev))
    return mean, var


@pytest.mark.parametrize("respacing", ["", "ddim25"])
def test_posterior_matches_bayes_rule(respacing):
    d = create_diffusion(respacing)
    x0, xt = torch.randn(1, 2, 3, 3).double(), torch.randn(1, 2, 3, 3).double()
    for t in (1, 5, d.num_timesteps - 1):
        mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.tensor([t]))
        ref_mean, ref_var = _bayes_posterior(d.betas, x0, xt, t)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
        assert math.isclose(var.flatten()[0].item(), ref_var.item(), rel_tol=1e-5)
        assert math.isclose(log_var.flatten()[0].item(), math.log(ref_var.item()), rel_tol=1e-5)


def test_training_losses_vb_is_closed_form_kl():
    d = create_diffusion("", diffusion_steps=100)
    torch.manual_seed(0)
    B, C = 3, 2
    x0, noise = torch.rand(B, C, 4, 4) * 2 - 1, torch.randn(B, C, 4, 4)
    eps_hat = torch.randn(B, C, 4, 4)
    v = (torch.rand(B, C, 4, 4) * 2 - 1)
    out = torch.cat([eps_hat, v], 1).requires_grad_(True)
    t = torch.tensor([1, 40, 99])
    terms = d.training_losses(_const_model(out), x0, t, noise=noise)

    betas = torch.from_numpy(d.betas)
    abar = _abar(d.betas)
    xt = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
    x0_hat = (xt - (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps_hat) / abar[t].sqrt().view(-1, 1, 1, 1)
    vb = []
    for i, ti in enumerate(t.tolist()):
        m_true, v_true = _bayes_posterior(d.betas, x0[i].double(), xt[i].double(), ti)
        m_model, _ = _bayes_posterior(d.betas, x0_hat[i].double(), xt[i].double(), ti)
        frac = (v[i].double() + 1) / 2
        log_v_model = frac * betas[ti].log() + (1 - frac) * v_true.log()  # beta_t .. beta~_t
        v_model = log_v_model.exp()
        kl = 0.5 * (log_v_model - v_true.log() + (v_true + (m_true - m_model) ** 2) / v_model - 1)
        vb.append(kl.mean() / math.log(2))  # bits per dimension
    torch.testing.assert_close(terms["vb"].double(), torch.stack(vb), rtol=1e-4, atol=1e-6)
    mse = ((noise - eps_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["loss"], mse + terms["vb"])
    # Stop-gradient: the vb term trains only the variance channels.
    (g,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert g[:, :C].abs().max() == 0 and g[:, C:].abs().max() > 0


# ------------------------------------------------------------------------------------ the objective


class _TinyNet(torch.nn.Module):
    in_channels, out_channels, learn_sigma, num_classes, input_size = 1, 2, True, 3, 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.emb = torch.nn.Embedding(4, 2)

    def forward(self, x, t, y):
        out = self.conv(x) * (1 + torch.cos(t.float() / 300).view(-1, 1, 1, 1)) + self.emb(y)[..., None, None]
        return torch.cat([out[:, :1], torch.tanh(out[:, 1:])], 1)


def test_objective_loss_and_sampling_are_seeded():
    torch.manual_seed(0)
    net = _TinyNet()
    obj = GaussianObjective(learn_sigma=True)
    x0, y = torch.rand(4, 1, 4, 4) * 2 - 1, torch.tensor([0, 1, 2, 0])
    a = obj.loss(net, x0, y, generator=torch.Generator().manual_seed(3))
    b = obj.loss(net, x0, y, generator=torch.Generator().manual_seed(3))
    assert set(a) == {"loss", "mse", "vb"} and torch.equal(a["loss"], b["loss"])
    a["loss"].backward()
    assert net.conv.weight.grad.abs().sum() > 0
    noise = torch.randn(2, 1, 4, 4)
    for sampler in obj.samplers:
        s1 = obj.sample(net, noise, y[:2], sampler=sampler, steps=5, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
        s2 = obj.sample(net, noise, y[:2], sampler=sampler, steps=5, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
        assert torch.equal(s1, s2) and s1.shape == noise.shape and s1.abs().max() <= 1.0 + 1e-6
    s3 = obj.sample(net, noise, y[:2], sampler="ddpm", steps=5, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(s1, s3)
    with pytest.raises(DitlabError, match="ddpm, ddim"):
        obj.sample(net, noise, y[:2], sampler="euler", steps=5)
    with pytest.raises(DitlabError, match="steps"):
        obj.sample(net, noise, y[:2], sampler="ddpm", steps=1)


def test_guidance_interval_comes_from_the_config_and_is_checked():
    from ditlab.config import load_config
    from ditlab.objectives import build_objective

    class Recorder(_TinyNet):
        def __init__(self):
            super().__init__()
            self.calls = []  # (batch size, original timestep) per model call

        def forward(self, x, t, y):
            self.calls.append((x.shape[0], int(t[0])))
            return super().forward(x, t, y)

    obj = build_objective(load_config(None, ["sample.guidance_interval=[0.0,0.5]"]))
    assert isinstance(obj, GaussianObjective) and obj.guidance_interval == (0.0, 0.5)
    net, noise, y = Recorder(), torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    obj.sample(net, noise, y, sampler="ddim", steps=10, cfg_scale=3.0)
    # ddim10 visits the original t = 900, 800, ..., 0; t / T near 1 is noise (flow's t = 1), so
    # [0, 0.5] guides (a doubled cond + uncond batch) only the last six, t = 500..0.
    assert net.calls == [(2 if t > 500 else 4, t) for t in range(900, -1, -100)]
    net.calls.clear()
    obj.sample(net, noise, y, sampler="ddim", steps=10, cfg_scale=3.0, guidance_interval=[0.75, 1.0])  # per call
    assert [b for b, _ in net.calls] == [4, 4, 2, 2, 2, 2, 2, 2, 2, 2]
    for bad in ("[0.9,0.1]", "[0.2,1.5]", "[0.1,0.2,0.3]"):
        with pytest.raises(DitlabError, match="sample.guidance_interval"):
            build_objective(load_config(None, [f"sample.guidance_interval={bad}"]))
    with pytest.raises(DitlabError, match="sample.guidance_interval"):
        obj.sample(net, noise, y, sampler="ddpm", steps=2, cfg_scale=3.0, guidance_interval=[0.9, 0.1])


def test_ddim_eta0_loop_is_deterministic_without_generator():
    # eta = 0 never uses its noise: two runs from the same x_T agree whatever the RNG state.
    net = _TinyNet()
    d = create_diffusion("ddim10")
    z = torch.randn(2, 1, 4, 4)
    kw = {"y": torch.tensor([1, 2])}
    torch.manual_seed(1)
    a = d.ddim_sample_loop(net, z.shape, noise=z, model_kwargs=kw)
    torch.manual_seed(2)
    b = d.ddim_sample_loop(net, z.shape, noise=z, model_kwargs=kw)
    assert torch.equal(a, b)
    # DDIM inversion: for an eps that does not depend on x, a reverse step then a forward step
    # returns exactly to the start (both move along the same x0/eps line).
    x = torch.randn(2, 1, 4, 4) * 0.5
    t = torch.tensor([5, 5])
    model = _const_model(torch.cat([torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)], 1))
    fwd = d.ddim_reverse_sample(model, x, t - 1, clip_denoised=False)["sample"]
    back = d.ddim_sample(model, fwd, t, clip_denoised=False)["sample"]
    assert not torch.allclose(fwd, x, atol=1e-2)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_calc_bpd_loop_totals():
    d = create_diffusion("5")
    out = d.calc_bpd_loop(_TinyNet(), torch.rand(2, 1, 4, 4) * 2 - 1, model_kwargs={"y": torch.tensor([0, 1])},
                          generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (2, 5) and out["mse"].shape == (2, 5)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert (out["prior_bpd"] >= 0).all()


@pytest.mark.skipif(not os.environ.get("DITLAB_OFFICIAL_DIT"), reason="set DITLAB_OFFICIAL_DIT to a facebookresearch/DiT checkout")
def test_matches_official_code():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "check_official_diffusion.py"
    spec = importlib.util.spec_from_file_location("check_official_diffusion", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.compare(os.environ["DITLAB_OFFICIAL_DIT"])
    bad = [r for r in rows if not r[2] <= module.TOL]
    assert len(rows) > 200 and not bad, bad[:5]


def test_loss_second_moment_resampler_is_unbiased_and_focuses():
    from ditlab.objectives.gaussian import LossSecondMomentResampler

    T = 50
    r = LossSecondMomentResampler(T, history=3)
    g = torch.Generator().manual_seed(0)
    t, w = r.sample(8, torch.device("cpu"), g)
    assert torch.equal(w, torch.ones(8))  # uniform until warmed up
    true_loss = torch.linspace(0.1, 4.0, T)  # later steps have larger losses
    for _ in range(3):
        r.update(torch.arange(T), true_loss)
    p = r.weights() / r.weights().sum()
    assert p[-1] > 10 * p[0]
    # Importance weights 1 / (T p(t)) keep the expected loss: sum_t p(t) w(t) L(t) = mean_t L(t).
    w_all = 1 / (T * p)
    np.testing.assert_allclose((p * w_all * true_loss.numpy()).sum(), true_loss.mean().item(), rtol=1e-6)
    t, w = r.sample(5000, torch.device("cpu"), g)
    assert (t >= T // 2).float().mean() > 0.6
    torch.testing.assert_close(w, torch.from_numpy(w_all[t.numpy()]).float())
    # Through the objective: the loss is weighted, the history is updated and checkpointable.
    obj = GaussianObjective(diffusion_steps=T, timestep_sampler="loss-second-moment")
    out = obj.loss(_TinyNet(), torch.rand(4, 1, 4, 4) * 2 - 1, torch.tensor([0, 1, 2, 0]), generator=g)
    assert torch.isfinite(out["loss"]) and obj.resampler.loss_counts.sum() == 4
    fresh = GaussianObjective(diffusion_steps=T, timestep_sampler="loss-second-moment")
    fresh.load_state_dict(obj.state_dict())
    assert np.array_equal(fresh.resampler.loss_history, obj.resampler.loss_history)
    with pytest.raises(DitlabError, match="timestep_sampler"):
        GaussianObjective(timestep_sampler="bogus")


def test_training_then_sampling_recovers_class_conditional_data():
    """Loss and samplers together: a small MLP trained for 500 steps on two classes of constant
    images (-0.5 and +0.5) samples each class near its own value, with DDPM and DDIM."""
    from torch import nn

    class Net(nn.Module):
        in_channels, out_channels, learn_sigma, num_classes, input_size = 1, 2, True, 2, 4

        def __init__(self):
            super().__init__()
            self.emb, self.temb = nn.Embedding(3, 32), nn.Linear(1, 32)
            self.net = nn.Sequential(nn.Linear(48, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 32))

        def forward(self, x, t, y):
            h = torch.cat([x.flatten(1), self.emb(y) + self.temb(t.float()[:, None] / 1000)], 1)
            return self.net(h).view(-1, 2, 4, 4)

    torch.manual_seed(0)
    net, obj = Net(), GaussianObjective()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        y = torch.randint(0, 2, (64,), generator=g)
        x0 = (y.float() - 0.5).view(-1, 1, 1, 1) + 0.05 * torch.randn(64, 1, 4, 4, generator=g)
        y_in = torch.where(torch.rand(64, generator=g) < 0.1, 2, y)  # label dropout for CFG
        loss = obj.loss(net, x0, y_in, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    y = torch.tensor([0] * 40 + [1] * 40)
    for sampler, steps, scale in (("ddpm", 50, 1.0), ("ddim", 25, 1.0), ("ddim", 25, 3.0)):
        x = obj.sample(net, torch.randn(80, 1, 4, 4, generator=g), y, sampler=sampler, steps=steps, cfg_scale=scale, generator=g)
        assert abs(x[:40].mean().item() + 0.5) < 0.15 and abs(x[40:].mean().item() - 0.5) < 0.15, (sampler, scale)
        assert x[:40].std() < 0.35 and x[40:].std() < 0.35  # the data std is 0.05
