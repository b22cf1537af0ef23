"""Gaussian diffusion (DDPM/IDDPM/DDIM) with the official DiT semantics.

`create_diffusion` takes the arguments of facebookresearch/DiT's `diffusion.create_diffusion`
and returns an object with the same methods, giving the same numbers for the same inputs and
noise: float64 schedules, float32 per-step coefficients, the IDDPM learned-range variance and
hybrid loss, timestep respacing, DDPM and DDIM samplers. The sampling loops also accept a
`generator`, so a seed fixes every sample (without one they draw from torch's global RNG in
the same order as the official code).

Notation (Ho et al. 2020): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),
abar_t = prod_{s<=t} (1 - beta_s); the model predicts eps (or x_0) and, with a learned sigma,
an interpolation v in [-1, 1] between log beta_t and log beta~_t (Nichol & Dhariwal 2021).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ditlab.errors import DitlabError
from ditlab.objectives.base import Objective, mean_flat, randn_like
from ditlab.objectives.guidance import check_guidance, check_interval, guided_forward, scale_at

# ---------------------------------------------------------------------------------------------
# Noise schedules and respacing
# ---------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous abar(t), t in [0, 1]: beta_i = 1 - abar((i+1)/T) / abar(i/T)."""
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)])


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """float64 betas of a named schedule, as in the official code."""
    # Ho et al.'s 1e-4..0.02 over 1000 steps, rescaled so other step counts give a similar process.
    scale = 1000 / num_steps
    beta_start, beta_end = scale * 1e-4, scale * 0.02
    if name in ("linear", "quadratic") and beta_end >= 1:
        # beta = 1 destroys the signal in one step (abar = 0, infinite x0 coefficients).
        raise DitlabError(f"the {name} schedule needs diffusion_steps > 20 (got {num_steps}: the last beta would be {beta_end:g})")
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if name == "quadratic":
        # "quad" of the original DDPM code: betas linear in sqrt(beta) between the same (scaled)
        # endpoints, i.e. betas = linspace(sqrt(b0), sqrt(b1), T) ** 2 (diffusers: "scaled_linear").
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    if name in ("squaredcos_cap_v2", "cosine"):
        # Nichol & Dhariwal's cosine schedule, abar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008.
        return betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise DitlabError(f"unknown noise_schedule '{name}' (choose linear, squaredcos_cap_v2 or quadratic)")


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """The original timesteps a respaced process keeps.

    "ddimN": the DDIM paper's striding range(0, T, stride), N steps exactly.
    "a,b,c" (or a list): split 0..T-1 into len(counts) equal sections and take counts[i]
    evenly spaced (rounded) steps from section i; "250" is the one-section case.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            if not section_counts[len("ddim"):].isdigit():
                raise DitlabError(f"bad DDIM respacing '{section_counts}' (use e.g. 'ddim50')")
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise DitlabError(f"cannot take exactly {want} DDIM steps from {num_timesteps} with an integer stride")
        try:
            section_counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise DitlabError(f"bad timestep respacing '{section_counts}' (use e.g. '250', 'ddim50' or '10,10,10')") from None
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise DitlabError(f"cannot divide a section of {size} timesteps into {count} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated (not j * stride): the rounding must match the official sets
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _take(arr: np.ndarray, t: Tensor, x: Tensor) -> Tensor:
    """arr[t] as float32, broadcastable against x ([B, 1, 1, ...]).

    Like the official `_extract_into_tensor`, the coefficients are float64 numpy and become
    float32 after indexing; every formula below then runs in float32 in the official order.
    """
    out = torch.from_numpy(arr).to(t.device)[t].float()
    return out.view(-1, *([1] * (x.ndim - 1))).expand(x.shape)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor | float, logvar2: Tensor | float) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    ref = mean1 if torch.is_tensor(mean1) else logvar1
    logvar1, logvar2 = (v if torch.is_tensor(v) else torch.tensor(v).to(ref) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation of Phi used by the DDPM/IDDPM code (kept for identical numbers).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of 8-bit data (x in [-1, 1], bins of width 2/255) under N(means, e^(2 log_scales)), in nats.

    The outermost bins extend to -inf / +inf.
    """
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


# ---------------------------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------------------------

MEAN_TYPES = ("epsilon", "start_x")  # what the model's first C channels predict
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


class GaussianDiffusion:
    """A (possibly respaced) discrete Gaussian diffusion process.

    `base_betas` is the full T-step schedule; `use_timesteps` the original steps to keep
    (None = all). A respaced process has its own betas, 1 - abar_k / abar_{k-1} between kept
    steps, but its models still receive the ORIGINAL timestep numbers (`timestep_map`), as the
    official `SpacedDiffusion`/`_WrappedModel` do.
    """

    def __init__(
        self,
        base_betas: np.ndarray,
        *,
        mean_type: str = "epsilon",
        var_type: str = "learned_range",
        loss_type: str = "mse",
        use_timesteps: set[int] | None = None,
    ):
        assert mean_type in MEAN_TYPES and var_type in VAR_TYPES and loss_type in LOSS_TYPES
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        base_betas = np.asarray(base_betas, dtype=np.float64)
        self.original_num_steps = len(base_betas)
        keep = set(range(len(base_betas))) if use_timesteps is None else set(use_timesteps)
        self.use_timesteps = keep
        self.timestep_map = sorted(keep)

        # Betas between kept steps. Computed even when every step is kept (as the official code
        # does), which changes the betas in the last float64 bits.
        kept_abar = np.cumprod(1.0 - base_betas)[self.timestep_map]
        betas = 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t); beta~_0 = 0, so its log is
        # clipped to beta~_1 at t = 0.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) if len(betas) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._map = torch.tensor(self.timestep_map)

    # -- the model ---------------------------------------------------------------------------

    def _model(self, model: Callable, x: Tensor, t: Tensor, model_kwargs: dict | None) -> Tensor:
        """Call the model with ORIGINAL timesteps (respaced index t -> timestep_map[t])."""
        t_orig = self._map.to(device=t.device, dtype=t.dtype)[t]
        out = model(x, t_orig, **(model_kwargs or {}))
        return out[0] if isinstance(out, tuple) else out

    # -- forward process ---------------------------------------------------------------------

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = _take(self.sqrt_alphas_cumprod, t, x_start) * x_start
        return mean, _take(1.0 - self.alphas_cumprod, t, x_start), _take(self.log_one_minus_alphas_cumprod, t, x_start)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return _take(self.sqrt_alphas_cumprod, t, x_start) * x_start + _take(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = _take(self.posterior_mean_coef1, t, x_t) * x_start + _take(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _take(self.posterior_variance, t, x_t), _take(self.posterior_log_variance_clipped, t, x_t)

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return _take(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _take(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (_take(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _take(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # -- reverse process ---------------------------------------------------------------------

    def p_mean_variance(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t): 'mean', 'variance', 'log_variance' and the model's 'pred_xstart'."""
        assert t.shape == (x.shape[0],)
        return self._p_from_output(self._model(model, x, t, model_kwargs), x, t, clip_denoised, denoised_fn)

    def _p_from_output(self, out: Tensor, x: Tensor, t: Tensor, clip_denoised: bool = True, denoised_fn: Callable | None = None) -> dict[str, Tensor]:
        C = x.shape[1]
        if self.var_type == "learned_range":
            assert out.shape == (x.shape[0], 2 * C, *x.shape[2:]), f"learned sigma needs {2 * C} output channels, got {tuple(out.shape)}"
            out, v = out.split(C, dim=1)
            # v in [-1, 1] interpolates the log variance between beta~_t (v=-1) and beta_t (v=+1).
            min_log = _take(self.posterior_log_variance_clipped, t, x)
            max_log = _take(np.log(self.betas), t, x)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.var_type == "fixed_large":
                # beta_t, except beta~_1 at t = 0 for a better decoder likelihood.
                var = np.append(self.posterior_variance[1], self.betas[1:])
                log_var = np.log(var)
            else:
                var, log_var = self.posterior_variance, self.posterior_log_variance_clipped
            variance, log_variance = _take(var, t, x), _take(log_var, t, x)

        def process(x0: Tensor) -> Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        pred_xstart = process(out if self.mean_type == "start_x" else self._predict_xstart_from_eps(x, t, out))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def condition_mean(self, cond_fn: Callable, p_mean_var: dict, x: Tensor, t: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """Classifier guidance on the mean (Sohl-Dickstein et al.): mean + variance * grad log p(y|x)."""
        gradient = self._model(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn: Callable, p_mean_var: dict, x: Tensor, t: Tensor, model_kwargs: dict | None = None) -> dict:
        """Classifier guidance on the score (Song et al.), for DDIM: eps - sqrt(1 - abar) grad log p(y|x)."""
        alpha_bar = _take(self.alphas_cumprod, t, x)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * self._model(cond_fn, x, t, model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def p_sample(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral (DDPM) step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn_like(x, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _take(self.alphas_cumprod, t, x)
        alpha_bar_prev = _take(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = randn_like(x, generator)  # drawn even for eta = 0, to keep the official RNG order
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Callable,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict[str, Tensor]:
        """One step of the deterministic DDIM ODE run forwards, x_t -> x_{t+1} (for inversion)."""
        if eta != 0.0:
            raise DitlabError("ddim_reverse_sample is the deterministic ODE: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _take(self.alphas_cumprod_next, t, x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # -- sampling loops ----------------------------------------------------------------------

    def _loop(self, step: Callable, model, shape, noise, device, progress, generator, **step_kw) -> Iterator[dict]:
        if device is None:  # the model's device (also for a bound method such as model.forward_with_cfg)
            owner = getattr(model, "__self__", model)
            param = next(owner.parameters(), None) if isinstance(owner, nn.Module) else None
            device = param.device if param is not None else torch.device("cpu")
        assert isinstance(shape, (tuple, list))
        if noise is not None:
            img = noise
        elif generator is not None:
            img = torch.randn(*shape, generator=generator, device=generator.device).to(device)
        else:
            img = torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, leave=False)
        for i in indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kw)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                  model_kwargs=None, device=None, progress=False, generator=None) -> Iterator[dict]:
        """Yield p_sample's output at every step, from t = T-1 down to 0."""
        yield from self._loop(self.p_sample, model, shape, noise, device, progress, generator, clip_denoised=clip_denoised,
                              denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs)

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, generator=None) -> Tensor:
        """Ancestral sampling of x_0 from x_T = noise (drawn when None) over all steps of this process."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                    model_kwargs, device, progress, generator):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0, generator=None) -> Iterator[dict]:
        """Yield ddim_sample's output at every step, from t = T-1 down to 0."""
        yield from self._loop(self.ddim_sample, model, shape, noise, device, progress, generator, clip_denoised=clip_denoised,
                              denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, generator=None) -> Tensor:
        """DDIM sampling of x_0 from x_T = noise over all steps of this (usually respaced) process."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, cond_fn,
                                                       model_kwargs, device, progress, eta, generator):
            pass
        return final["sample"]

    # -- likelihood and training ---------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, model_output: Tensor | None = None) -> dict[str, Tensor]:
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL
        -log p(x_0 | x_1) at t = 0. Pass `model_output` to reuse an output already computed.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        if model_output is None:
            model_output = self._model(model, x_t, t, model_kwargs)
        out = self._p_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / np.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start: Tensor, t: Tensor, model_kwargs: dict | None = None,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example losses [B] at timesteps t: 'loss', plus 'mse' and 'vb' for the hybrid loss.

        With a learned sigma (IDDPM), loss = mse(eps) + vb, where the vb term sees the mean
        prediction through a stop-gradient so that it only trains the variance.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, Tensor] = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        out = self._model(model, x_t, t, model_kwargs)
        if self.var_type == "learned_range":
            C = x_t.shape[1]
            assert out.shape == (x_t.shape[0], 2 * C, *x_t.shape[2:]), f"learned sigma needs {2 * C} output channels, got {tuple(out.shape)}"
            out, v = out.split(C, dim=1)
            frozen = torch.cat([out.detach(), v], dim=1)
            terms["vb"] = self._vb_terms_bpd(None, x_start, x_t, t, clip_denoised=False, model_output=frozen)["output"]
            if self.loss_type == "rescaled_mse":
                # The 1/1000 of the original implementation: without it the vb term hurts the mse term.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.mean_type == "start_x" else noise
        assert out.shape == target.shape
        terms["mse"] = mean_flat((target - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension (not trainable)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start: Tensor, clip_denoised: bool = True, model_kwargs: dict | None = None,
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The full variational bound in bits/dim: 'total_bpd', 'prior_bpd' [N]; 'vb', 'xstart_mse', 'mse' [N, T]."""
        vb, xstart_mse, mse = [], [], []
        for i in list(range(self.num_timesteps))[::-1]:
            t = torch.tensor([i] * x_start.shape[0], device=x_start.device)
            noise = randn_like(x_start, generator)
            x_t = self.q_sample(x_start, t, noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((self._predict_eps_from_xstart(x_t, t, out["pred_xstart"]) - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior = self._prior_bpd(x_start)
        return {"total_bpd": vb_t.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb_t,
                "xstart_mse": torch.stack(xstart_mse, dim=1), "mse": torch.stack(mse, dim=1)}


def create_diffusion(
    timestep_respacing: str | list[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The official DiT `create_diffusion`: "" / None = all `diffusion_steps`, else respaced."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    loss_type = "rescaled_kl" if use_kl else "rescaled_mse" if rescale_learned_sigmas else "mse"
    var_type = "learned_range" if learn_sigma else "fixed_small" if sigma_small else "fixed_large"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return GaussianDiffusion(
        betas,
        mean_type="start_x" if predict_xstart else "epsilon",
        var_type=var_type,
        loss_type=loss_type,
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
    )


# ---------------------------------------------------------------------------------------------
# Importance sampling of timesteps (IDDPM sec. 3.3; the official timestep_sampler.py)
# ---------------------------------------------------------------------------------------------


class LossSecondMomentResampler:
    """Draw t with p(t) proportional to sqrt(E[L_t^2]) over the last `history` losses seen at t.

    Until every t has `history` losses, t is uniform. A small `uniform_prob` is mixed in so no
    step starves. Losses are reweighted by 1 / (T p(t)), which keeps the expected objective
    unchanged while lowering its variance (useful for the pure vb loss, use_kl=True).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def weights(self) -> np.ndarray:
        """Unnormalised sampling weights over the T timesteps."""
        if not (self.loss_counts == self.history).all():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(timesteps [B] long, importance weights [B] float) on `device`."""
        w = self.weights()
        p = torch.from_numpy(w / w.sum()).to(generator.device if generator is not None else "cpu")
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), w.float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses; under torch.distributed every rank records all ranks' losses."""
        import torch.distributed as dist

        pairs = list(zip(t.tolist(), losses.detach().float().tolist()))
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pairs)
            pairs = [pair for rank in gathered for pair in rank]
        for ti, loss in pairs:
            if self.loss_counts[ti] == self.history:  # full: shift out the oldest loss
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, self.loss_counts[ti]] = loss
                self.loss_counts[ti] += 1

    def state_dict(self) -> dict:
        return {"loss_history": torch.from_numpy(self.loss_history.copy()), "loss_counts": torch.from_numpy(self.loss_counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.loss_history = state["loss_history"].numpy().astype(np.float64)
        self.loss_counts = state["loss_counts"].numpy().astype(np.int64)


TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


# ---------------------------------------------------------------------------------------------
# The Objective interface (trainer, `ditlab sample`, `ditlab eval`)
# ---------------------------------------------------------------------------------------------


class GaussianObjective(Objective):
    """DDPM training (IDDPM hybrid loss with a learned sigma) and DDPM/DDIM sampling.

    Training uses the full `diffusion_steps` process; sampling builds a respaced process for the
    requested steps: "ddpm" -> respacing str(steps), "ddim" -> "ddim{steps}" (official sample.py
    uses 250 DDPM steps).

    `guidance_interval` = [lo, hi] applies classifier-free guidance only at steps with
    lo <= t / T <= hi, t the original timestep 0..T-1: t / T near 1 is noise, as flow's t = 1.
    """

    name = "Gaussian diffusion"
    samplers = ("ddpm", "ddim")
    default_steps = 250  # the official sample.py

    def __init__(self, *, noise_schedule: str = "linear", diffusion_steps: int = 1000, learn_sigma: bool = True,
                 predict_xstart: bool = False, use_kl: bool = False, sigma_small: bool = False,
                 rescale_learned_sigmas: bool = False, timestep_sampler: str = "uniform",
                 guidance_interval: list[float] | tuple[float, float] | None = None):
        self.options = dict(noise_schedule=noise_schedule, diffusion_steps=diffusion_steps, learn_sigma=learn_sigma,
                            predict_xstart=predict_xstart, use_kl=use_kl, sigma_small=sigma_small,
                            rescale_learned_sigmas=rescale_learned_sigmas)
        self.diffusion = create_diffusion("", **self.options)
        self.default_steps = min(self.default_steps, diffusion_steps)
        self._spaced: dict[str, GaussianDiffusion] = {}
        if timestep_sampler not in TIMESTEP_SAMPLERS:
            raise DitlabError(f"unknown objective.timestep_sampler '{timestep_sampler}' (choose {', '.join(TIMESTEP_SAMPLERS)})")
        self.resampler = LossSecondMomentResampler(diffusion_steps) if timestep_sampler == "loss-second-moment" else None
        self.guidance_interval = check_interval(guidance_interval)  # the default of `sample`

    @classmethod
    def from_config(cls, cfg) -> "GaussianObjective":
        o = cfg.objective
        return cls(noise_schedule=o.noise_schedule, diffusion_steps=o.diffusion_steps, learn_sigma=cfg.model.learn_sigma,
                   predict_xstart=o.predict_xstart, use_kl=o.use_kl, sigma_small=o.sigma_small,
                   rescale_learned_sigmas=o.rescale_learned_sigmas, timestep_sampler=o.timestep_sampler,
                   guidance_interval=cfg.sample.guidance_interval)

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Mean hybrid loss at uniformly (or importance-) drawn timesteps; 'mse' and 'vb' (when learned) are logged extras."""
        if self.resampler is None:
            where = generator.device if generator is not None else x0.device  # draw where the generator lives
            t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=generator, device=where).to(x0.device)
            weights = None
        else:
            t, weights = self.resampler.sample(x0.shape[0], x0.device, generator)
        noise = randn_like(x0, generator)
        terms = self.diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
        if weights is None:
            out = {"loss": terms["loss"].mean()}
        else:
            self.resampler.update(t, terms["loss"])
            out = {"loss": (terms["loss"] * weights).mean()}
        for key in ("mse", "vb"):
            if key in terms:
                out[key] = terms[key].mean().detach()
        return out

    def state_dict(self) -> dict:
        """Training state to checkpoint (the importance sampler's loss history, if any)."""
        return {"resampler": self.resampler.state_dict()} if self.resampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.resampler is not None and "resampler" in state:
            self.resampler.load_state_dict(state["resampler"])

    def check_sampling(self, sampler: str, steps: int | None) -> None:
        super().check_sampling(sampler, steps)
        T = self.options["diffusion_steps"]
        if not 2 <= steps <= T:
            raise DitlabError(f"sampling steps must be between 2 and objective.diffusion_steps={T}, got {steps}")
        space_timesteps(T, f"ddim{steps}" if sampler == "ddim" else str(steps))  # DDIM needs an integer stride

    def spaced(self, sampler: str, steps: int) -> GaussianDiffusion:
        """The respaced process a sampler runs for `steps` steps (cached)."""
        self.check_sampling(sampler, steps)
        respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
        if respacing not in self._spaced:
            self._spaced[respacing] = create_diffusion(respacing, **self.options)
        return self._spaced[respacing]

    def sample(
        self,
        model: nn.Module,
        noise: Tensor,
        y: Tensor,
        *,
        sampler: str = "ddpm",
        steps: int = 250,
        cfg_scale: float = 1.0,
        guidance_interval: list[float] | tuple[float, float] | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        **options,
    ) -> Tensor:
        """x_T = noise -> x_0 with classifier-free guidance on every step, or only on those with
        lo <= t / T <= hi for `guidance_interval` = [lo, hi] (default: the objective's, from
        sample.guidance_interval; t / T near 1 is noise). `eta` is DDIM's (ddim only)."""
        unknown = [k for k, v in options.items() if v is not None]
        if unknown:
            raise DitlabError(f"Gaussian diffusion sampling does not take option(s) {', '.join(unknown)} (it takes eta, guidance_interval)")
        diffusion = self.spaced(sampler, steps)
        if eta and sampler != "ddim":
            raise DitlabError(f"eta={eta} applies to the ddim sampler only, not '{sampler}'")
        check_guidance(model, cfg_scale)
        T = self.options["diffusion_steps"]
        interval = self.guidance_interval if guidance_interval is None else check_interval(guidance_interval)
        self.last_nfe = 0

        def guided(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            self.last_nfe += 1
            # t: the original timestep; every row of a sampling batch shares it
            scale = cfg_scale if interval is None else scale_at(cfg_scale, float(t[0]) / T, interval)
            return guided_forward(model, x, t, y, scale)

        kw = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs={"y": y}, device=noise.device,
                  progress=progress, generator=generator)
        if sampler == "ddim":
            return diffusion.ddim_sample_loop(guided, tuple(noise.shape), eta=eta, **kw)
        return diffusion.p_sample_loop(guided, tuple(noise.shape), **kw)
