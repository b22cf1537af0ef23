"""Flow matching with the linear interpolant (rectified flow, as in SiT), plus FasterDiT options.

Time convention (used by `shortcut.py` too): t in [0, 1], **t = 0 is data, t = 1 is noise**:

    x_t = (1 - t) * x0 + t * eps,        eps ~ N(0, I)
    v   = dx_t/dt = eps - x0              (the velocity target)

Sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) down to t = 0. The model is called
as `model(x_t, 1000 * t, y)` so float t lands in the DiT timestep-embedding range of 0..1000.

The network may predict the velocity (default), the noise eps or the data x0; the samplers
convert the latter two to a velocity with the interpolant:
    noise:  v = (eps_hat - x_t) / (1 - t)        data:  v = (x_t - x0_hat) / t
Those divisions blow up at one end, so noise prediction uses t in [0, 1 - T_EPS] and data
prediction t in [T_EPS, 1], in training and in sampling (SiT trims its interval the same way).

FasterDiT (Yao et al. 2024) switches, each independent:
- `cosine_loss_weight`: adds w * (1 - cos(pred, target)) per sample, the direction of the
  velocity (of the predicted quantity, for noise/data prediction) beside its MSE.
- `time_sampling="lognormal"`: FasterDiT's "lognorm" time sampling, which is SD3's
  "rf/lognorm(m, s)": t = sigmoid(n), n ~ N(m, s) — a log-normal law on the noise-to-signal
  ratio t/(1-t). It is the same law as `logit_normal`; both names are accepted.
- `data_std_target`: x0 is multiplied by data_std_target / data_std before training, and
  samples divided by it afterwards. Give `data_std`, or leave it None: then the std of the first
  training batch (deterministic for a seed; averaged over ranks) is measured once and kept in
  the objective's state, which every checkpoint saves and `load_run` / resume restore.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.errors import DitlabError
from ditlab.objectives.base import Objective, mean_flat, randn_like
from ditlab.objectives.guidance import check_guidance, check_interval, guided_forward, scale_at

T_EPS = 1e-3  # trimmed end of the time interval for noise/data prediction
PREDICTIONS = ("velocity", "noise", "data")
TIME_SAMPLINGS = ("uniform", "logit_normal", "lognormal")


def sample_time(
    n: int, kind: str, mean: float = 0.0, std: float = 1.0, *, device=None, generator: torch.Generator | None = None
) -> Tensor:
    """n training times in (0, 1): uniform, or logit-normal / "lognorm" (sigmoid of N(mean, std))."""
    where = generator.device if generator is not None else device
    if kind == "uniform":
        return torch.rand(n, device=where, generator=generator).to(device)
    if kind in ("logit_normal", "lognormal"):
        return torch.sigmoid(mean + std * torch.randn(n, device=where, generator=generator)).to(device)
    raise DitlabError(f"unknown objective.time_sampling '{kind}' (choose {', '.join(TIME_SAMPLINGS)})")


class FlowObjective(Objective):
    """Linear-interpolant flow matching: `loss` for training, `sample` with euler | heun | dopri5."""

    name = "flow matching"
    samplers = ("euler", "heun", "dopri5")
    default_steps = 250  # SiT's sample.py default

    def __init__(
        self,
        prediction: str = "velocity",
        time_sampling: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        cosine_loss_weight: float = 0.0,
        data_std_target: float | None = None,
        data_std: float | None = None,
        guidance_interval: tuple[float, float] | list[float] | None = None,
    ):
        if prediction not in PREDICTIONS:
            raise DitlabError(f"unknown objective.prediction '{prediction}' (choose {', '.join(PREDICTIONS)})")
        if time_sampling not in TIME_SAMPLINGS:
            raise DitlabError(f"unknown objective.time_sampling '{time_sampling}' (choose {', '.join(TIME_SAMPLINGS)})")
        if time_std <= 0:
            raise DitlabError(f"objective.time_std must be > 0, got {time_std}")
        if cosine_loss_weight < 0:
            raise DitlabError(f"objective.cosine_loss_weight must be >= 0, got {cosine_loss_weight}")
        if data_std_target is not None and data_std_target <= 0:
            raise DitlabError(f"objective.data_std_target must be > 0, got {data_std_target}")
        if data_std is not None and data_std <= 0:
            raise DitlabError(f"objective.data_std must be > 0, got {data_std}")
        self.prediction = prediction
        self.time_sampling = time_sampling
        self.time_mean = time_mean
        self.time_std = time_std
        self.cosine_loss_weight = cosine_loss_weight
        self.data_std_target = data_std_target
        self.data_std = data_std
        self.guidance_interval = check_interval(guidance_interval)
        # The usable time interval: the conversion to velocity divides by (1 - t) or t.
        self.t_min = T_EPS if prediction == "data" else 0.0
        self.t_max = 1.0 - T_EPS if prediction == "noise" else 1.0

    @classmethod
    def from_config(cls, cfg) -> "FlowObjective":
        o = cfg.objective
        return cls(
            prediction=o.prediction,
            time_sampling=o.time_sampling,
            time_mean=o.time_mean,
            time_std=o.time_std,
            cosine_loss_weight=o.cosine_loss_weight,
            data_std_target=o.data_std_target,
            data_std=o.data_std,
            guidance_interval=cfg.sample.guidance_interval,
        )

    def check_sampling(self, sampler: str, steps: int | None) -> None:
        if sampler == "dopri5" and sampler in self.samplers:
            return  # adaptive: `steps` is ignored
        super().check_sampling(sampler, steps)

    def state_dict(self) -> dict:
        """The data std measured on the first batch (needed to sample a std-scaled model)."""
        return {"data_std": self.data_std} if self.data_std_target is not None and self.data_std is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data_std") is not None:
            self.data_std = float(state["data_std"])

    # ---- data std scaling (FasterDiT) -------------------------------------------------------

    @property
    def data_scale(self) -> float:
        """Factor applied to x0 before training (1.0 when std scaling is off)."""
        if self.data_std_target is None:
            return 1.0
        if self.data_std is None:
            raise DitlabError("objective.data_std_target is set but objective.data_std is unknown: set objective.data_std")
        return self.data_std_target / self.data_std

    def _maybe_measure_std(self, x0: Tensor) -> None:
        if self.data_std_target is None or self.data_std is not None:
            return
        var = x0.detach().float().var()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(var)  # every rank must scale by the same factor
            var /= torch.distributed.get_world_size()
        std = float(var.sqrt())
        if not std > 0:
            raise DitlabError("cannot measure objective.data_std: the first batch has zero std")
        self.data_std = std

    # ---- training -----------------------------------------------------------------------------

    def model_time(self, t: Tensor) -> Tensor:
        """Map t in [0, 1] to the model's timestep input (DiT embeds 0..1000)."""
        return t * 1000.0

    def interpolate(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - tb) * x0 + tb * eps

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        return {"velocity": eps - x0, "noise": eps, "data": x0}[self.prediction]

    def loss(self, model: nn.Module, x0: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self._maybe_measure_std(x0)
        x0 = x0 * self.data_scale
        n = x0.shape[0]
        u = sample_time(n, self.time_sampling, self.time_mean, self.time_std, device=x0.device, generator=generator)
        t = self.t_min + (self.t_max - self.t_min) * u
        eps = randn_like(x0, generator)
        x_t = self.interpolate(x0, eps, t)
        out = model(x_t, self.model_time(t), y)[:, : x0.shape[1]]
        target = self.target(x0, eps)
        mse = mean_flat((out.float() - target) ** 2)
        terms = {"mse": mse.mean()}
        loss = mse
        if self.cosine_loss_weight > 0:
            cos = 1 - F.cosine_similarity(out.float().flatten(1), target.flatten(1), dim=1)
            loss = loss + self.cosine_loss_weight * cos
            terms["cos"] = cos.mean()
        return {"loss": loss.mean(), **{k: v.detach() for k, v in terms.items()}}

    # ---- sampling -----------------------------------------------------------------------------

    def velocity(self, model: nn.Module, x: Tensor, t: float, y: Tensor, cfg_scale: float,
                 interval: tuple[float, float] | None = None) -> Tensor:
        """v(x, t) from one (guided) model call; t is a python float shared by the batch."""
        scale = scale_at(cfg_scale, t, interval)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        out = guided_forward(model, x, self.model_time(tt), y, scale)[:, : x.shape[1]]
        if self.prediction == "velocity":
            return out
        if self.prediction == "noise":
            return (out - x) / (1 - t)
        return (x - out) / t

    def sample(
        self,
        model: nn.Module,
        noise: Tensor,
        y: Tensor,
        *,
        sampler: str = "euler",
        steps: int = 50,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] | list[float] | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
        generator: torch.Generator | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        **options,
    ) -> Tensor:
        """Integrate from noise (t = 1) to data (t = 0).

        NFE (model calls, stored in `self.last_nfe`; a guided call is one batched call):
        euler = steps; heun = 2 * steps - 1 (the last step, which ends at t = 0, is a plain Euler
        step as in Karras et al. 2022); dopri5 = adaptive (`steps` is ignored; rtol/atol apply).
        `clip_denoised` clips the final samples (the last step's x0 estimate) to [-1, 1] after
        undoing the data std scaling: use it for pixel-space models only.
        """
        if options:
            raise DitlabError(f"flow sampling got unknown options: {', '.join(sorted(options))}")
        self.check_sampling(sampler, steps)
        check_guidance(model, cfg_scale)
        interval = self.guidance_interval if guidance_interval is None else check_interval(guidance_interval)
        scale = self.data_scale
        self.last_nfe = 0

        def f(x: Tensor, t: float) -> Tensor:
            self.last_nfe += 1
            return self.velocity(model, x, t, y, cfg_scale, interval)

        x = noise
        with torch.no_grad():
            if sampler == "dopri5":
                x = self._dopri5(f, x, rtol, atol)
            else:
                ts = torch.linspace(self.t_max, self.t_min, steps + 1, dtype=torch.float64).tolist()
                it = range(steps)
                if progress:
                    from tqdm.auto import tqdm

                    it = tqdm(it, desc=f"{sampler} {steps} steps")
                for i in it:
                    t, t_next = ts[i], ts[i + 1]
                    v = f(x, t)
                    x_euler = x + (t_next - t) * v
                    if sampler == "heun" and i < steps - 1:
                        x = x + (t_next - t) * 0.5 * (v + f(x_euler, t_next))
                    else:
                        x = x_euler
        x = x / scale
        return x.clamp(-1, 1) if clip_denoised else x

    def _dopri5(self, f, x: Tensor, rtol: float, atol: float) -> Tensor:
        from torchdiffeq import odeint

        ts = torch.tensor([self.t_max, self.t_min], dtype=torch.float64)
        # torchdiffeq hands t as a 0-dim tensor; the model sees it as a float.
        out = odeint(lambda t, z: f(z, float(t)), x, ts.to(x.device, x.dtype), method="dopri5", rtol=rtol, atol=atol)
        return out[-1]
