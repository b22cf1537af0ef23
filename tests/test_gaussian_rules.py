"""Rules of the Gaussian objective that the recorded official outputs do not reach: the config's
options reaching the process, the timestep draw, the loss-second-moment importance sampler,
classifier guidance (cond_fn) and DDIM inversion. Each against a closed form or a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditlab.config import load_config
from ditlab.objectives import build_objective
from ditlab.objectives.gaussian import GaussianObjective, LossSecondMomentResampler, create_diffusion


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
    # seeded by the generator alone
    torch.manual_seed(5)
    again, _ = r.sample(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


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
    # the DDIM steps (both directions) use the guided score
    for step in (d.ddim_sample, d.ddim_reverse_sample):
        with_grad = step(model, x, t, clip_denoised=False, cond_fn=cond_fn)
        with_eps = step(_const_model(eps_guided), x, t, clip_denoised=False)
        torch.testing.assert_close(with_grad["sample"], with_eps["sample"], rtol=1e-5, atol=1e-5)


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
