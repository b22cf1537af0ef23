"""Rules of the Gaussian objective that the recorded official outputs do not reach: the config's
options reaching the process, the timestep draw, the loss-second-moment importance sampler,
classifier guidance (cond_fn) and DDIM inversion. Each against a closed form or a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch import nn

from ditlab.config import load_config
from ditlab.errors import DitlabError
from ditlab.objectives import build_objective
from ditlab.objectives.gaussian import (GaussianDiffusion, GaussianObjective, LossSecondMomentResampler, create_diffusion,
                                        discretized_gaussian_log_likelihood, get_named_beta_schedule, normal_kl)


COSINE = "squaredcos_cap_v2"  # the linear schedule needs more than 20 steps


def _const_model(out: torch.Tensor):
    return lambda x, t, **kw: out


def _spy_training_losses(obj: GaussianObjective, seen: list) -> None:
    """Record (t, per-example terms) of every training_losses call of obj's process."""
    real = obj.diffusion.training_losses

    def spy(model, x0, t, **kw):
        terms = real(model, x0, t, **kw)
        seen.append((t.clone(), {k: v.detach().clone() for k, v in terms.items()}))
        return terms

    obj.diffusion.training_losses = spy


def _net(x, t, y=None):
    # depends on x, t and y, with the doubled channels of a learned sigma
    eps = torch.tanh(x * 0.7 + t.float().view(-1, 1, 1, 1) / 50 + y.float().view(-1, 1, 1, 1) / 10)
    return torch.cat([eps, torch.sigmoid(x) * 2 - 1], dim=1)


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, var_type, loss_type, mean_type", [
    ([], "learned_range", "mse", "epsilon"),
    (["objective.use_kl=true"], "learned_range", "rescaled_kl", "epsilon"),
    (["objective.rescale_learned_sigmas=true"], "learned_range", "rescaled_mse", "epsilon"),
    (["objective.predict_xstart=true"], "learned_range", "mse", "start_x"),
    (["model.learn_sigma=false"], "fixed_large", "mse", "epsilon"),
    (["model.learn_sigma=false", "objective.sigma_small=true"], "fixed_small", "mse", "epsilon"),
])
def test_every_config_option_reaches_the_process(overrides, var_type, loss_type, mean_type):
    obj = build_objective(load_config(None, ["objective.kind=gaussian", *overrides]))
    d = obj.diffusion
    assert (d.var_type, d.loss_type, d.mean_type) == (var_type, loss_type, mean_type)
    assert obj.resampler is None and d.num_timesteps == 1000


def test_schedule_steps_sampler_and_guidance_interval_come_from_the_config():
    cfg = load_config(None, ["objective.kind=gaussian", "objective.noise_schedule=squaredcos_cap_v2",
                             "objective.diffusion_steps=50", "objective.timestep_sampler=loss-second-moment",
                             "sample.guidance_interval=[0.2,0.8]"])
    obj = build_objective(cfg)
    reference = create_diffusion("", noise_schedule="squaredcos_cap_v2", diffusion_steps=50)
    np.testing.assert_array_equal(obj.diffusion.alphas_cumprod, reference.alphas_cumprod)
    assert isinstance(obj.resampler, LossSecondMomentResampler) and obj.resampler.num_timesteps == 50
    assert list(obj.guidance_interval) == [0.2, 0.8]
    # and each of those three at its default is a different process
    default = build_objective(load_config(None, ["objective.kind=gaussian", "objective.diffusion_steps=50"]))
    assert not np.array_equal(default.diffusion.alphas_cumprod, reference.alphas_cumprod)
    assert default.resampler is None and default.guidance_interval is None


# ------------------------------------------------------------------------------ timestep draws


def test_uniform_timesteps_cover_every_step_one_per_example_from_the_generator():
    obj = GaussianObjective(diffusion_steps=5, noise_schedule=COSINE)
    seen: list = []
    _spy_training_losses(obj, seen)
    x0, y = torch.rand(7, 1, 2, 2) * 2 - 1, torch.arange(7) % 3
    obj.loss(_net, x0, y, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global RNG must not matter
    obj.loss(_net, x0, y, generator=torch.Generator().manual_seed(0))
    assert seen[0][0].shape == (7,) and torch.equal(seen[0][0], seen[1][0])
    for _ in range(40):
        obj.loss(_net, x0, y, generator=torch.Generator().manual_seed(len(seen)))
    drawn = torch.cat([t for t, _ in seen])
    assert sorted(set(drawn.tolist())) == [0, 1, 2, 3, 4]  # t = 0 (the decoder's NLL term) included


def test_loss_is_the_mean_of_the_terms_and_logs_mse_and_vb():
    obj = GaussianObjective(diffusion_steps=10, noise_schedule=COSINE)
    seen: list = []
    _spy_training_losses(obj, seen)
    out = obj.loss(_net, torch.rand(6, 1, 2, 2) * 2 - 1, torch.arange(6) % 3, generator=torch.Generator().manual_seed(1))
    _, terms = seen[0]
    torch.testing.assert_close(out["loss"], terms["loss"].mean())
    torch.testing.assert_close(out["mse"], terms["mse"].mean())
    torch.testing.assert_close(out["vb"], terms["vb"].mean())
    assert not out["mse"].requires_grad and not torch.equal(out["mse"], out["vb"])


# -------------------------------------------------------------------- loss-second-moment sampler


def test_resampler_weights_are_uniform_until_every_history_is_full_then_the_closed_form():
    r = LossSecondMomentResampler(3, history=2, uniform_prob=0.1)
    np.testing.assert_array_equal(r.weights(), np.ones(3))
    r.update(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([1.0, 3.0, 2.0, 2.0, 4.0]))
    np.testing.assert_array_equal(r.weights(), np.ones(3))  # step 2 holds one loss of two
    r.update(torch.tensor([2]), torch.tensor([0.0]))
    rms = np.array([np.sqrt((1 + 9) / 2), 2.0, np.sqrt(16 / 2)])
    expected = rms / rms.sum() * 0.9 + 0.1 / 3
    np.testing.assert_allclose(r.weights(), expected, rtol=1e-12)
    assert r.weights().sum() == pytest.approx(1.0)


def test_resampler_keeps_the_last_history_losses_in_order():
    r = LossSecondMomentResampler(2, history=3)
    losses = [5.0, 1.0, 4.0, 2.0, 8.0, 7.0]
    for i, loss in enumerate(losses):
        r.update(torch.tensor([1]), torch.tensor([loss]))
        kept = losses[max(0, i + 1 - 3):i + 1]  # a naive window over the stream
        np.testing.assert_array_equal(r.loss_history[1, :len(kept)], kept)
        assert r.loss_counts[1] == len(kept)
    assert r.loss_counts[0] == 0 and not r.loss_history[0].any()


def test_resampler_draws_from_its_weights_with_importance_weights():
    r = LossSecondMomentResampler(4, history=1, uniform_prob=0.0)
    r.update(torch.arange(4), torch.tensor([1.0, 1.0, 2.0, 4.0]))  # p = [1, 1, 2, 4] / 8
    t, w = r.sample(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    freq = torch.bincount(t, minlength=4).double() / len(t)
    p = torch.tensor([1, 1, 2, 4], dtype=torch.float64) / 8
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / len(t)).sqrt().max()  # 4 binomial standard errors
    torch.testing.assert_close(w, (1.0 / (4 * p[t])).float())  # E[w L_t] = the uniform mean of L_t
    assert w.dtype == torch.float32 and t.dtype == torch.long
    # seeded by the generator alone; without one, by the global RNG
    torch.manual_seed(5)
    again, _ = r.sample(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    torch.manual_seed(0)
    assert torch.equal(r.sample(20000, torch.device("cpu"))[0], t)


def test_importance_weighted_loss_and_resumable_history():
    obj = GaussianObjective(diffusion_steps=4, noise_schedule=COSINE, timestep_sampler="loss-second-moment")
    obj.resampler.update(torch.arange(4).repeat(10), torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(10))  # histories full
    seen: list = []
    _spy_training_losses(obj, seen)
    before = obj.resampler.weights()
    out = obj.loss(_net, torch.rand(8, 1, 2, 2) * 2 - 1, torch.arange(8) % 3, generator=torch.Generator().manual_seed(2))
    t, terms = seen[0]
    p = torch.from_numpy(before / before.sum())
    torch.testing.assert_close(out["loss"], (terms["loss"] * (1.0 / (4 * p[t])).float()).mean())
    # the losses just seen entered the history of their timesteps, last in
    last = {ti: loss for ti, loss in zip(t.tolist(), terms["loss"].tolist())}
    for ti, loss in last.items():
        assert obj.resampler.loss_history[ti, -1] == pytest.approx(loss, rel=1e-6)
    assert (obj.resampler.loss_counts == 10).all() and not np.array_equal(obj.resampler.weights(), before)
    # the importance-sampled timesteps come from the generator alone, as the uniform ones do
    drawn = []
    for global_seed in (0, 1):
        twin = GaussianObjective(diffusion_steps=4, noise_schedule=COSINE, timestep_sampler="loss-second-moment")
        twin.resampler.update(torch.arange(4).repeat(10), torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(10))
        _spy_training_losses(twin, drawn)
        torch.manual_seed(global_seed)
        twin.loss(_net, torch.zeros(64, 1, 2, 2), torch.zeros(64, dtype=torch.long), generator=torch.Generator().manual_seed(2))
    assert torch.equal(drawn[0][0], drawn[1][0])
    # the state round-trips; a state without it (an older checkpoint) leaves the sampler as it is
    state = obj.state_dict()
    fresh = GaussianObjective(diffusion_steps=4, noise_schedule=COSINE, timestep_sampler="loss-second-moment")
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.resampler.weights(), obj.resampler.weights())
    assert fresh.resampler.loss_counts.dtype == np.int64
    untouched = GaussianObjective(diffusion_steps=4, noise_schedule=COSINE, timestep_sampler="loss-second-moment")
    untouched.load_state_dict({})
    assert not untouched.resampler.loss_counts.any()
    assert GaussianObjective(diffusion_steps=4, noise_schedule=COSINE).state_dict() == {}


# ------------------------------------------------------------------ classifier guidance (cond_fn)


def test_classifier_guidance_shifts_the_mean_and_the_score_by_the_closed_forms():
    d = create_diffusion("", diffusion_steps=40, learn_sigma=False)
    x = torch.randn(2, 1, 3, 3)
    t = torch.tensor([7, 12])
    eps = torch.randn(2, 1, 3, 3)
    grad = torch.randn(2, 1, 3, 3)
    model, cond_fn = _const_model(eps), _const_model(grad)
    abar = torch.tensor(d.alphas_cumprod, dtype=torch.float64)[t].view(-1, 1, 1, 1).float()
    plain = d.p_mean_variance(model, x, t, clip_denoised=False)
    # DDPM: mean + variance * gradient; the step's noise (same generator seed) is added to it
    torch.testing.assert_close(d.condition_mean(cond_fn, plain, x, t), plain["mean"] + plain["variance"] * grad)
    guided = d.p_sample(model, x, t, clip_denoised=False, cond_fn=cond_fn, generator=torch.Generator().manual_seed(3))
    unguided = d.p_sample(model, x, t, clip_denoised=False, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(guided["sample"] - unguided["sample"], plain["variance"] * grad, rtol=1e-5, atol=1e-6)
    # DDIM: eps - sqrt(1 - abar) * gradient, then x0 and the posterior mean from that eps
    cond = d.condition_score(cond_fn, plain, x, t)
    eps_guided = eps - (1 - abar).sqrt() * grad
    x0 = (x - (1 - abar).sqrt() * eps_guided) / abar.sqrt()
    torch.testing.assert_close(cond["pred_xstart"], x0, rtol=1e-5, atol=1e-5)
    mean, _, _ = d.q_posterior_mean_variance(x0, x, t)
    torch.testing.assert_close(cond["mean"], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["variance"], plain["variance"])
    # the DDIM steps (both directions) use the guided score; the model's keyword arguments reach cond_fn
    needs_scale = lambda x, t, scale: grad * scale  # noqa: E731
    for step in (d.ddim_sample, d.ddim_reverse_sample):
        with_grad = step(model, x, t, clip_denoised=False, cond_fn=cond_fn)
        with_eps = step(_const_model(eps_guided), x, t, clip_denoised=False)
        torch.testing.assert_close(with_grad["sample"], with_eps["sample"], rtol=1e-5, atol=1e-5)
        with_kwargs = step(model, x, t, clip_denoised=False, cond_fn=needs_scale, model_kwargs={"scale": 1.0})
        torch.testing.assert_close(with_kwargs["sample"], with_eps["sample"], rtol=1e-5, atol=1e-5)


def test_ddim_inversion_clips_its_x0_by_default():
    d = create_diffusion("", diffusion_steps=40, learn_sigma=False)
    x = torch.randn(2, 1, 3, 3) * 3
    t = torch.tensor([3, 15])
    model = _const_model(torch.randn(2, 1, 3, 3) * 3)
    clipped = d.ddim_reverse_sample(model, x, t)
    assert clipped["pred_xstart"].abs().max() <= 1.0
    unclipped = d.ddim_reverse_sample(model, x, t, clip_denoised=False)
    assert unclipped["pred_xstart"].abs().max() > 1.0
    torch.testing.assert_close(clipped["pred_xstart"], unclipped["pred_xstart"].clamp(-1, 1))
    # x_{t+1} = sqrt(abar_{t+1}) x0 + sqrt(1 - abar_{t+1}) eps(x0), eps re-derived from the clipped x0
    abar = torch.tensor(d.alphas_cumprod, dtype=torch.float64)[t].view(-1, 1, 1, 1).float()
    nxt = torch.tensor(np.append(d.alphas_cumprod[1:], 0.0))[t].view(-1, 1, 1, 1).float()
    x0 = clipped["pred_xstart"]
    eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    torch.testing.assert_close(clipped["sample"], nxt.sqrt() * x0 + (1 - nxt).sqrt() * eps, rtol=1e-5, atol=1e-5)
    # denoised_fn replaces the predicted x0, as in the other steps
    halved = d.ddim_reverse_sample(model, x, t, clip_denoised=False, denoised_fn=lambda x0: x0 / 2)
    torch.testing.assert_close(halved["pred_xstart"], unclipped["pred_xstart"] / 2)


# -------------------------------------------------------------------------------------- sampling


class _Stub(nn.Module):
    """A class-conditional 'model' whose eps depends on x, t and y (learned-sigma channels at 0),
    recording the batch size and timesteps of each call."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes, self.in_channels, self.calls = num_classes, 1, []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], t.clone()))
        label = torch.zeros_like(t) if y is None else y
        eps = torch.tanh(x + t.float().view(-1, 1, 1, 1) / 100 + label.float().view(-1, 1, 1, 1) / 5)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sampling_runs_the_respaced_loop_it_names():
    obj = GaussianObjective(noise_schedule=COSINE, diffusion_steps=100)
    noise, y = torch.randn(2, 1, 3, 3), torch.tensor([0, 2])
    for sampler, respacing, extra in (("ddpm", "10", {}), ("ddim", "ddim10", {"eta": 0.5})):
        reference = create_diffusion(respacing, noise_schedule=COSINE, diffusion_steps=100)
        loop = reference.ddim_sample_loop if sampler == "ddim" else reference.p_sample_loop
        outs = []
        for clip in (True, False):
            stub = _Stub()
            got = obj.sample(stub, noise, y, sampler=sampler, steps=10, clip_denoised=clip, generator=_g(0), **extra)
            want = loop(_Stub(), tuple(noise.shape), noise=noise, clip_denoised=clip, model_kwargs={"y": y},
                        generator=_g(0), **extra)
            assert torch.equal(got, want), (sampler, clip)
            torch.manual_seed(99)  # the loop's noise comes from the generator alone
            again = obj.sample(_Stub(), noise, y, sampler=sampler, steps=10, clip_denoised=clip, generator=_g(0), **extra)
            assert torch.equal(got, again)
            assert obj.last_nfe == len(stub.calls) == 10
            outs.append(got)
        assert not torch.equal(*outs)  # clipping mattered: the test can tell the two apart


def test_sampling_defaults_are_ddpm_250_steps_unguided_clipped_and_quiet(capsys):
    obj = GaussianObjective()
    stub, noise, y = _Stub(), torch.randn(1, 1, 2, 2), torch.tensor([1])
    got = obj.sample(stub, noise, y, generator=_g(1))
    want = create_diffusion("250").p_sample_loop(_Stub(), (1, 1, 2, 2), noise=noise, clip_denoised=True,
                                                 model_kwargs={"y": y}, generator=_g(1))
    assert torch.equal(got, want)
    assert len(stub.calls) == obj.last_nfe == 250 and {b for b, _ in stub.calls} == {1}  # no doubled batch
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    obj.sample(_Stub(), noise, y, sampler="ddim", steps=5, progress=True)
    bar = capsys.readouterr().err
    assert "0/5" in bar and "5/5" not in bar  # a bar over the 5 steps, cleared when done


def test_guidance_interval_guides_only_inside_it_even_for_a_batch_of_one():
    obj = GaussianObjective(noise_schedule=COSINE, diffusion_steps=100)
    stub = _Stub()
    obj.sample(stub, torch.randn(1, 1, 2, 2), torch.tensor([1]), sampler="ddim", steps=10, cfg_scale=3.0,
               guidance_interval=[0.0, 0.5], generator=_g(0))
    for batch, t in stub.calls:  # the guided steps run the doubled (conditional + null) batch
        assert batch == (2 if t[0] / 100 <= 0.5 else 1), (batch, t)
    assert {b for b, _ in stub.calls} == {1, 2} and obj.last_nfe == 10


def test_sampling_options_eta_and_guidance_are_checked():
    obj = GaussianObjective(noise_schedule=COSINE, diffusion_steps=100)
    noise, y = torch.randn(1, 1, 2, 2), torch.tensor([0])
    with pytest.raises(DitlabError, match=r"does not take option\(s\) order"):
        obj.sample(_Stub(), noise, y, steps=4, order=2)
    obj.sample(_Stub(), noise, y, steps=4, order=None)  # an option left at None was not given
    with pytest.raises(DitlabError, match="applies to the ddim sampler only"):
        obj.sample(_Stub(), noise, y, sampler="ddpm", steps=4, eta=0.5)
    obj.sample(_Stub(), noise, y, sampler="ddim", steps=4, eta=0.5)
    obj.sample(_Stub(num_classes=0), noise, torch.tensor([-1]), steps=4)  # unconditional, unguided
    with pytest.raises(DitlabError, match="needs a class-conditional model"):
        obj.sample(_Stub(num_classes=0), noise, torch.tensor([-1]), steps=4, cfg_scale=2.0)


def test_step_counts_each_sampler_can_take():
    obj = GaussianObjective(noise_schedule=COSINE, diffusion_steps=100)
    for sampler, steps in (("ddpm", 100), ("ddpm", 11), ("ddpm", 2), ("ddim", 10), ("ddim", 100)):
        obj.check_sampling(sampler, steps)
    for sampler, steps, message in (("ddim", 11, "integer stride"), ("ddpm", 1, "between 2"), ("ddpm", 101, "between 2")):
        with pytest.raises(DitlabError, match=message):
            obj.check_sampling(sampler, steps)


def test_kl_losses_are_the_variational_bound_term_once_and_times_t():
    betas = get_named_beta_schedule(COSINE, 10)
    x0, noise, t = torch.rand(3, 1, 2, 2) * 2 - 1, torch.randn(3, 1, 2, 2), torch.tensor([0, 3, 9])
    kl = GaussianDiffusion(betas, loss_type="kl")
    loss = kl.training_losses(_Stub(), x0, t, noise=noise)["loss"]
    x_t = kl.q_sample(x0, t, noise=noise)
    torch.testing.assert_close(loss, kl._vb_terms_bpd(_Stub(), x0, x_t, t, clip_denoised=False)["output"])
    rescaled = GaussianDiffusion(betas, loss_type="rescaled_kl").training_losses(_Stub(), x0, t, noise=noise)["loss"]
    torch.testing.assert_close(rescaled, loss * 10)


def test_bits_per_dim_loop_draws_its_noise_from_the_generator():
    d = create_diffusion("", noise_schedule=COSINE, diffusion_steps=6)
    x = torch.rand(2, 1, 2, 2) * 2 - 1
    totals = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        totals.append(d.calc_bpd_loop(_Stub(), x, model_kwargs={"y": torch.tensor([0, 1])}, generator=_g(4))["total_bpd"])
    assert torch.equal(*totals)


def test_default_step_counts_follow_the_process_length():
    assert GaussianObjective().resolve_sampling(None, None) == ("ddpm", 250)  # the official sample.py
    assert GaussianObjective(noise_schedule=COSINE, diffusion_steps=100).resolve_sampling(None, None) == ("ddpm", 100)


def test_sampling_loops_apply_denoised_fn_and_are_quiet_by_default(capsys):
    d = create_diffusion("5", noise_schedule=COSINE, diffusion_steps=50)
    noise, kw = torch.randn(2, 1, 2, 2), {"model_kwargs": {"y": torch.tensor([0, 1])}}
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        plain = loop(_Stub(), (2, 1, 2, 2), noise=noise, generator=_g(0), **kw)
        # at t = 0 both steps return their x0 prediction (no noise, posterior weight 0 on x_t)
        zeroed = loop(_Stub(), (2, 1, 2, 2), noise=noise, generator=_g(0), denoised_fn=torch.zeros_like, **kw)
        assert plain.abs().min() > 0 and torch.equal(zeroed, torch.zeros_like(zeroed))
    # the progressive DDIM loop is the deterministic ODE unless eta is given
    *_, last = d.ddim_sample_loop_progressive(_Stub(), (2, 1, 2, 2), noise=noise, generator=_g(7), **kw)
    assert torch.equal(last["sample"], d.ddim_sample_loop(_Stub(), (2, 1, 2, 2), noise=noise, eta=0.0, **kw))
    list(d.p_sample_loop_progressive(_Stub(), (2, 1, 2, 2), noise=noise, generator=_g(0), **kw))
    assert capsys.readouterr().err == ""


def _approx_cdf64(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def test_discretized_log_likelihood_edges_and_interior_bins():
    x = torch.tensor([-1.0, -1.0, 0.2, 1.0, 1.0])
    means = torch.tensor([-0.95, 0.3, 0.25, 0.9, -0.2])
    log_scales = torch.log(torch.tensor([0.05, 0.5, 0.1, 0.05, 0.5]))
    got = discretized_gaussian_log_likelihood(x, means, log_scales).double().numpy()
    xs, mu, sd = x.double().numpy(), means.double().numpy(), np.exp(log_scales.double().numpy())
    plus, minus = _approx_cdf64((xs - mu + 1 / 255) / sd), _approx_cdf64((xs - mu - 1 / 255) / sd)
    want = np.where(xs < -0.999, np.log(plus), np.where(xs > 0.999, np.log(1 - minus), np.log(plus - minus)))
    # float32 evaluation of the same formula: a few ulps of the CDFs, divided by the probabilities
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 / np.exp(want).min())
    assert (got < 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normal_kl_takes_python_floats_on_either_side(dtype):
    m1, lv1 = torch.tensor([0.3, -1.2], dtype=dtype), torch.tensor([0.2, -0.7], dtype=dtype)

    def closed(m1, lv1, m2, lv2):
        return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))

    def ref(a, i):  # as the official code: a Python-float log-variance becomes a float32 tensor first
        return a.double().numpy() if torch.is_tensor(a) else float(np.float32(a)) if i in (1, 3) else a

    for args in ((m1, 0.1, 0.5, -0.3), (0.25, lv1, m1, 0.1), (m1, lv1, 0.5, 0.1)):
        got = normal_kl(*args)
        want = closed(*(ref(a, i) for i, a in enumerate(args)))
        assert got.dtype == dtype  # the floats take the tensors' dtype
        # a sum of five terms of size <= 4 that cancel to the KL: a few ulps of 4 in the dtype
        np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=32 * torch.finfo(dtype).eps)


def test_process_defaults_and_its_checks():
    betas = get_named_beta_schedule(COSINE, 10)
    d = GaussianDiffusion(betas.astype(np.float32))  # float32 betas: the process is still computed in float64
    assert (d.mean_type, d.var_type, d.loss_type) == ("epsilon", "learned_range", "mse")
    assert d.alphas_cumprod.dtype == np.float64
    np.testing.assert_array_equal(d.alphas_cumprod, np.cumprod(1 - betas.astype(np.float32).astype(np.float64)))
    for bad in ({"mean_type": "noise"}, {"var_type": "learned"}, {"loss_type": "l1"}):
        with pytest.raises(AssertionError):
            GaussianDiffusion(betas, **bad)
    # x0 is clipped by default, as in the official code: the mean, its parts and the vb term
    x, t = torch.randn(2, 1, 2, 2) * 3, torch.tensor([9, 9])
    out = torch.cat([torch.randn(2, 1, 2, 2) * 3, torch.zeros(2, 1, 2, 2)], dim=1)
    big = _const_model(out)
    assert d.p_mean_variance(big, x, t)["pred_xstart"].abs().max() <= 1.0
    assert d.p_mean_variance(big, x, t, clip_denoised=False)["pred_xstart"].abs().max() > 1.0
    torch.testing.assert_close(d._p_from_output(out, x, t)["pred_xstart"], d.p_mean_variance(big, x, t)["pred_xstart"])
    x0 = torch.rand(2, 1, 2, 2) * 2 - 1
    vb = {clip: d._vb_terms_bpd(big, x0, x, t, clip_denoised=clip)["output"] for clip in (True, False)}
    torch.testing.assert_close(d._vb_terms_bpd(big, x0, x, t)["output"], vb[True])
    assert not torch.allclose(vb[True], vb[False])
    *_, last = d.p_sample_loop_progressive(big, (2, 1, 2, 2), noise=x, generator=_g(0))
    assert last["pred_xstart"].abs().max() <= 1.0
    # the sizes of the process it was respaced from (the official SpacedDiffusion's attributes)
    spaced = create_diffusion("5", noise_schedule=COSINE, diffusion_steps=50)
    assert spaced.original_num_steps == 50 and spaced.use_timesteps == set(spaced.timestep_map) and len(spaced.timestep_map) == 5
    # a one-step process has no posterior variance to clip (t = 0 only), a two-step one both entries
    assert create_diffusion("1", noise_schedule=COSINE, diffusion_steps=50).posterior_log_variance_clipped.shape == (0,)
    two = create_diffusion("2", noise_schedule=COSINE, diffusion_steps=50)
    np.testing.assert_array_equal(two.posterior_log_variance_clipped, np.log(two.posterior_variance[[1, 1]]))


def test_the_process_keeps_betas_in_0_1_and_the_objective_its_defaults():
    for bad in ([0.1, 0.0], [0.5, 1.5]):  # a step that adds no noise; abar below 0
        with pytest.raises(AssertionError):
            GaussianDiffusion(np.array(bad))
    with np.errstate(divide="ignore"):
        assert GaussianDiffusion(np.array([0.5, 1.0])).betas[-1] == 1.0  # all signal gone at the end: allowed
    # the schedules' names: "cosine" is Nichol & Dhariwal's squaredcos_cap_v2; linear and quadratic need T > 20
    np.testing.assert_array_equal(get_named_beta_schedule("cosine", 30), get_named_beta_schedule("squaredcos_cap_v2", 30))
    for name in ("linear", "quadratic"):
        assert get_named_beta_schedule(name, 21)[-1] < 1
        with pytest.raises(DitlabError, match=f"the {name} schedule needs diffusion_steps > 20"):
            get_named_beta_schedule(name, 20)
    # the objective's own defaults: fixed large variance without a learned sigma, the plain MSE
    assert GaussianObjective(diffusion_steps=50, learn_sigma=False).diffusion.var_type == "fixed_large"
    assert GaussianObjective(diffusion_steps=50).diffusion.loss_type == "mse"


def test_loops_draw_x_T_from_the_generator_take_plain_functions_and_tuple_outputs(capsys):
    d = create_diffusion("4", noise_schedule=COSINE, diffusion_steps=20)
    stub = _Stub()

    def function_model(x, t, y):  # a plain function (no parameters to take a device from), returning a tuple
        return stub(x, t, y), "extra"

    kw = {"model_kwargs": {"y": torch.tensor([0, 2])}}
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        g = _g(3)
        noise = torch.randn(2, 1, 2, 2, generator=g)  # x_T first, then the steps' noise, from one generator
        want = loop(_Stub(), (2, 1, 2, 2), noise=noise, generator=g, **kw)
        torch.manual_seed(0)
        assert torch.equal(loop(function_model, (2, 1, 2, 2), generator=_g(3), **kw), want)
        shown = loop(_Stub(), (2, 1, 2, 2), generator=_g(3), progress=True, **kw)  # a progress bar changes nothing
        assert torch.equal(shown, want) and capsys.readouterr().err != ""
        assert loop(_Stub(), (2, 1, 2, 2), **kw).shape == (2, 1, 2, 2)  # no noise, no generator: the global RNG
