"""Record the OFFICIAL facebookresearch/DiT outputs on seeded inputs into one fixture file.

`tests/test_official_fixtures.py` replays every recorded case on ditlab and compares, so the
parity with the official DiT model and Gaussian diffusion is checked in CI without an official
checkout. The live side-by-side scripts (`check_official_dit.py`, `check_official_diffusion.py`)
stay the way to compare against a checkout directly.

Regenerate the fixture (after changing a case here, or to record against another official
revision) with a facebookresearch/DiT checkout, timm installed without its dependencies and the
torchvision stand-in on the path (see benchmarks/README.md):

    pip install --no-deps --target /tmp/timm_pkg timm
    PYTHONPATH=/tmp/timm_pkg:$PWD/benchmarks/stubs \\
        python benchmarks/make_official_fixtures.py /path/to/DiT [--out tests/fixtures/official_dit.safetensors]

then run `python -m pytest -q tests/test_official_fixtures.py` and commit the file.

File layout (safetensors): `in/...` inputs, `weights/<model>/...` model weights, `out/<case>/<key>`
the official outputs; the metadata entry "fixture" is a JSON string with the models and one
record per case (kind, create_diffusion / DiT kwargs, method, arguments, global seed). Arguments
refer to tensors as {"$tensor": key}, to a model as {"$model": name[, "method": ...]} and to a
fixed function as {"$fn": name}. The case runner below is shared by both sides: this script
runs it on the official code, the test on ditlab, so both make exactly the same calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

FIXTURE_FORMAT = 1
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                           "official_dit.safetensors")


# --------------------------------------------------------------------------- shared by both sides

class FixtureModel(nn.Module):
    """A fixed conv standing in for a denoiser in the diffusion cases (DiT-like I/O: x, t, y).

    Its output depends on x, the (original, unrespaced) timestep and the label, so a wrong
    timestep map or dropped model_kwargs changes the numbers. Its weights live in the fixture.
    """

    def __init__(self, channels: int, out_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        tt = torch.sin(t.float() / 97.0).view(-1, 1, 1, 1)
        out = self.conv(x) * (1 + tt) + self.emb(y).view(x.shape[0], -1, 1, 1) * tt
        if out.shape[1] > x.shape[1]:  # learned-sigma channels: keep v in [-1, 1] as a trained model does
            out = torch.cat([out[:, : x.shape[1]], torch.tanh(out[:, x.shape[1]:])], dim=1)
        return out


def cond_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """A fixed stand-in for a classifier gradient; depends on t and y so both must arrive mapped/passed."""
    return -0.5 * x + 0.1 * torch.cos(t.float() / 7.0).view(-1, 1, 1, 1) + 0.05 * y.float().view(-1, 1, 1, 1)


def denoised_fn(x0: Tensor) -> Tensor:
    """A fixed post-processing of the x_0 prediction (applied before clipping)."""
    return 0.9 * x0 + 0.05


FUNCTIONS: dict[str, Callable] = {"cond_fn": cond_fn, "denoised_fn": denoised_fn}


@dataclass
class Implementation:
    """The public entry points a case needs, from the official code or from ditlab."""

    DiT: Callable[..., nn.Module]
    DiT_models: dict[str, Callable[..., nn.Module]]
    create_diffusion: Callable[..., Any]


def build_model(name: str, spec: dict, tensors: dict[str, Tensor], impl: Implementation) -> nn.Module:
    """A fixture model with the recorded weights.

    DiT weights are stored without `pos_embed`, so each implementation keeps the fixed sin-cos
    table it computes itself and the forward cases check that table too.
    """
    if spec["kind"] == "tiny":
        model = FixtureModel(spec["channels"], spec["out_channels"], spec["num_classes"])
    else:
        model = impl.DiT(**spec["config"])
    prefix = f"weights/{name}/"
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    state = model.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise KeyError(f"model {name}: fixture weights not in the state_dict: {unknown[:5]}")
    state.update(weights)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _resolve(value: Any, tensors: dict[str, Tensor], models: dict[str, nn.Module]) -> Any:
    if isinstance(value, dict):
        if "$tensor" in value:
            return tensors[value["$tensor"]].clone()  # a copy: an in-place op must not leak into later cases
        if "$fn" in value:
            return FUNCTIONS[value["$fn"]]
        if "$model" in value:
            model = models[value["$model"]]
            return getattr(model, value["method"]) if "method" in value else model
        return {k: _resolve(v, tensors, models) for k, v in value.items()}
    return value


def flatten_outputs(out: Any) -> dict[str, Tensor]:
    """A method's result as {key: tensor}: dict keys, tuple positions, or "out" (None entries dropped)."""
    if torch.is_tensor(out):
        return {"out": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(out, (tuple, list)):
        return {str(i): v for i, v in enumerate(out)}
    raise TypeError(f"cannot flatten a {type(out).__name__}")


def _checksums(state: dict[str, Tensor]) -> Tensor:
    """[n_tensors, 4] float64 in state_dict order: number of values, sum, sum of squares and a
    position-weighted sum (which a permutation of the values changes)."""
    rows = []
    for v in state.values():
        v = v.detach().double().flatten()
        w = torch.linspace(-1.0, 1.0, len(v), dtype=torch.float64) if len(v) > 1 else torch.ones(1, dtype=torch.float64)
        n = torch.tensor(float(len(v)), dtype=torch.float64)
        rows.append(torch.stack([n, v.sum(), (v * v).sum(), (v * w).sum()]))
    return torch.stack(rows)


DIFFUSION_ATTRS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
                   "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                   "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                   "posterior_mean_coef1", "posterior_mean_coef2")


def run_case(case: dict, fixture: dict, tensors: dict[str, Tensor], impl: Implementation) -> dict[str, Tensor]:
    """Run one recorded case on `impl` and return its outputs as {key: tensor}.

    A case with "seed" sets torch's global seed right before the call: the official samplers
    draw their noise from the global RNG, so equal seeds give both sides the same noise.
    """
    kind = case["kind"]
    if kind == "rng":  # no implementation involved: the global RNG stream every seeded case relies on
        torch.manual_seed(case["seed"])
        return {"randn": torch.randn(case["shape"]), "rand": torch.rand(case["shape"][0])}
    if kind == "dit_init":
        torch.manual_seed(case["seed"])
        # A named config (DiT_models) or the DiT class with explicit sizes.
        model = impl.DiT_models[case["name"]](**case["config"]) if case.get("name") else impl.DiT(**case["config"])
        state = model.state_dict()
        return {"checksums": _checksums(state)} if case["store"] == "checksums" else dict(state)
    if kind == "diffusion_attrs":
        d = impl.create_diffusion(**fixture["diffusions"][case["diffusion"]])
        out = {name: torch.as_tensor(np.asarray(getattr(d, name), dtype=np.float64)) for name in DIFFUSION_ATTRS}
        out["timestep_map"] = torch.as_tensor(np.asarray(d.timestep_map, dtype=np.int64))
        out["num_timesteps"] = torch.tensor([d.num_timesteps], dtype=torch.int64)
        return out
    if kind == "respacing":
        d = impl.create_diffusion(case["respacing"], diffusion_steps=case["diffusion_steps"])
        return {"timestep_map": torch.as_tensor(np.asarray(d.timestep_map, dtype=np.int64))}

    models = {name: build_model(name, fixture["models"][name], tensors, impl) for name in case.get("models", [])}
    args = _resolve(case["args"], tensors, models)
    if kind == "dit_call":
        model = models[case["model"]].train(case.get("train", False))
        target = getattr(model, case["method"])
    elif kind == "diffusion_call":
        target = getattr(impl.create_diffusion(**fixture["diffusions"][case["diffusion"]]), case["method"])
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    seeded = case.get("seed") is not None
    if seeded:
        torch.manual_seed(case["seed"])
    if case.get("grad"):  # the loss and its parameter gradients (the hybrid loss stops the mean's gradient in vb)
        out = flatten_outputs(target(**args))
        model = models[case["grad"]]
        model.zero_grad()
        out["loss"].mean().backward()
        out = {k: v.detach() for k, v in out.items()}
        out.update({f"grad/{k}": p.grad.clone() for k, p in model.named_parameters()})
    else:
        with torch.no_grad():
            out = flatten_outputs(target(**args))
    if seeded:
        # How far the call advanced the global RNG: the official code draws noise it does not
        # use (DDIM at eta = 0), and later draws depend on that.
        out["rng_after"] = torch.rand(8)
    return out


# --------------------------------------------------------------------------- the recorded cases

# Tiny DiTs: 4 and 3 (and 1) channels, learned sigma on and off, patch 2 and 4, mlp_ratio != 4,
# label dropout on (null row) and off (no null row).
DIT_CONFIGS: dict[str, dict] = {
    "dit_c4_sigma": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2,
                         num_classes=10),
    "dit_c3_sigma": dict(input_size=8, patch_size=4, in_channels=3, hidden_size=24, depth=1, num_heads=3,
                         mlp_ratio=2.0, num_classes=6, class_dropout_prob=0.5),
    "dit_c1_nosigma": dict(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                           num_classes=3, class_dropout_prob=0.0, learn_sigma=False),
}

# name -> official create_diffusion kwargs; a small T keeps the recorded loops short. "loops":
# also record the sampling loops and the bpd loop; "extras": also the cond_fn / denoised_fn /
# drawn-noise variants of the single-step methods.
DIFFUSION_CONFIGS: dict[str, dict] = {
    "hybrid_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50}, extras=True),
    "fixed_large_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50, "learn_sigma": False},
                            extras=True),
    "fixed_small_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50, "learn_sigma": False,
                                       "sigma_small": True}),
    "predict_xstart_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50, "predict_xstart": True},
                               extras=True),
    "rescaled_mse_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50,
                                        "rescale_learned_sigmas": True}),
    "use_kl_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50, "use_kl": True}),
    "use_kl_fixed_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50, "use_kl": True,
                                        "learn_sigma": False}),
    "cosine_T50": dict(diffusion={"timestep_respacing": "", "diffusion_steps": 50,
                                  "noise_schedule": "squaredcos_cap_v2"}),
    "respaced_10_of_50": dict(diffusion={"timestep_respacing": "10", "diffusion_steps": 50}, loops=True, extras=True),
    "respaced_10_of_50_fixed": dict(diffusion={"timestep_respacing": "10", "diffusion_steps": 50, "learn_sigma": False},
                                    loops=True),
    "ddim10_cosine_T50": dict(diffusion={"timestep_respacing": "ddim10", "diffusion_steps": 50,
                                         "noise_schedule": "squaredcos_cap_v2"}, loops=True),
    "sections_3_4_3_xstart_small": dict(diffusion={"timestep_respacing": "3,4,3", "diffusion_steps": 50,
                                                   "predict_xstart": True, "learn_sigma": False, "sigma_small": True},
                                        loops=True),
    "sections_10_15_20_of_1000": dict(diffusion={"timestep_respacing": "10,15,20"}),
}

# (respacing, diffusion_steps): the kept timestep sets. "21" of 1000 and "25" of 50 are sets where
# accumulating the fractional stride (as the official code does) and multiplying it out round
# differently; the last two are impossible (the official code raises ValueError).
RESPACINGS = [("10", 1000), ("250", 1000), ("ddim10", 1000), ("ddim25", 1000), ("ddim50", 1000), ("10,15,20", 1000),
              ("1,2,3", 1000), ("10,10,10", 1000), ("21", 1000), ("7", 50), ("25", 50), ("ddim10", 50), ("ddim7", 50),
              ("3,4,3", 50), ("1,1", 50), ("50", 50), ("ddim11", 50), ("30,30", 50)]


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter random values (the zero-initialised adaLN/output layers too).

    Weights get std 1/sqrt(fan_in), so every pre-activation is of order 1: with small weights
    the network would be nearly linear, and a wrong nonlinearity (exact vs tanh GELU, say)
    would change the outputs by less than float32 noise. Vectors (biases) get std 0.1. The DiT
    output layer gets a third of that: its learned-sigma channels v then stay mostly inside
    [-1, 1], as a trained model's do.

    The values are rounded to float16 (they stay float32 parameters): the fixture stores them
    as float16, half the bytes, and both sides still load exactly the same float32 numbers.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
                if name.startswith("final_layer.linear."):
                    std /= 3
                p.copy_((torch.randn(p.shape, generator=generator) * std).half().float())


def build_fixture(impl: Implementation) -> tuple[dict, dict[str, Tensor]]:
    """The models, inputs and cases (without outputs); `impl` (official) only builds models to
    randomise and the x_t inputs."""
    g = torch.Generator().manual_seed(20240601)
    tensors: dict[str, Tensor] = {}
    models: dict[str, dict] = {}
    diffusions: dict[str, dict] = {}  # name -> official create_diffusion kwargs
    cases: list[dict] = []

    def T(key: str) -> dict:
        return {"$tensor": key}

    # The seeded cases need torch's global RNG to give the same numbers here and where the test
    # runs; this case records them, so a different RNG shows up as such and not as a parity bug.
    cases.append(dict(id="rng/seed=11", kind="rng", seed=11, shape=[4, 3, 4, 4]))

    # -- DiT: seeded initialisation ------------------------------------------------------------
    cases.append(dict(id="dit/init/dit_c1_nosigma", kind="dit_init", config=DIT_CONFIGS["dit_c1_nosigma"], seed=0,
                      store="state_dict"))
    cases.append(dict(id="dit/init/dit_c4_sigma", kind="dit_init", config=DIT_CONFIGS["dit_c4_sigma"], seed=1,
                      store="checksums"))
    # The smallest named config (12 blocks, 33M values: checksums only).
    cases.append(dict(id="dit/init/DiT-S-8", kind="dit_init", name="DiT-S/8",
                      config=dict(input_size=16, in_channels=4, num_classes=10), seed=0, store="checksums"))

    # -- DiT: forward and forward_with_cfg with every parameter random ------------------------------
    for name, cfg in DIT_CONFIGS.items():
        model = impl.DiT(**cfg)
        randomize(model, g)
        models[name] = dict(kind="dit", config=cfg)
        for k, v in model.state_dict().items():
            if k != "pos_embed":
                tensors[f"weights/{name}/{k}"] = v.half()  # exact: randomize rounded them to float16
        C, S, n_cls = cfg["in_channels"], cfg["input_size"], cfg["num_classes"]
        has_null = cfg.get("class_dropout_prob", 0.1) > 0
        B = 4
        tensors[f"in/{name}/x"] = torch.randn(B, C, S, S, generator=g)
        tensors[f"in/{name}/t"] = torch.tensor([0, 999, *torch.randint(1, 999, (B - 2,), generator=g).tolist()])
        y = torch.randint(0, n_cls, (B,), generator=g)
        if has_null:
            y[-1] = n_cls  # the null label
        tensors[f"in/{name}/y"] = y
        # Official CFG batch: [conditional half; unconditional half]; the null label where there is one.
        uncond = torch.full((B // 2,), n_cls) if has_null else torch.arange(B // 2) % n_cls
        tensors[f"in/{name}/y_cfg"] = torch.cat([y[: B // 2], uncond])
        x_half = tensors[f"in/{name}/x"][: B // 2]
        tensors[f"in/{name}/x_doubled"] = torch.cat([x_half, x_half])
        base = dict(kind="dit_call", model=name, models=[name])
        cases.append(dict(base, id=f"dit/{name}/forward", method="forward",
                          args=dict(x=T(f"in/{name}/x"), t=T(f"in/{name}/t"), y=T(f"in/{name}/y"))))
        # forward on the doubled batch that forward_with_cfg evaluates: what ditlab's all-channel
        # guidance is checked against where it deliberately differs from the official first-3-channels one.
        cases.append(dict(base, id=f"dit/{name}/forward_doubled", method="forward",
                          args=dict(x=T(f"in/{name}/x_doubled"), t=T(f"in/{name}/t"), y=T(f"in/{name}/y_cfg"))))
        for scale in (1.5, 4.0):
            cases.append(dict(base, id=f"dit/{name}/forward_with_cfg/scale={scale}", method="forward_with_cfg",
                              companion=f"dit/{name}/forward_doubled", cfg_scale=scale,
                              args=dict(x=T(f"in/{name}/x"), t=T(f"in/{name}/t"), y=T(f"in/{name}/y_cfg"),
                                        cfg_scale=scale)))
        if cfg.get("class_dropout_prob", 0.1) >= 0.5:
            # Training mode: label dropout draws from the global RNG (torch.rand per label).
            cases.append(dict(base, id=f"dit/{name}/forward_train_label_dropout", method="forward", train=True, seed=7,
                              args=dict(x=T(f"in/{name}/x"), t=T(f"in/{name}/t"), y=T(f"in/{name}/y"))))

    # -- Gaussian diffusion ------------------------------------------------------------------------
    B, C, H = 4, 3, 4
    n_cls = 10
    for sigma in (True, False):
        name = "tiny_sigma" if sigma else "tiny_fixed"
        model = FixtureModel(C, 2 * C if sigma else C, n_cls)
        randomize(model, g)
        for k, p in model.named_parameters():
            tensors[f"weights/{name}/{k}"] = p.detach().half()
        models[name] = dict(kind="tiny", channels=C, out_channels=2 * C if sigma else C, num_classes=n_cls)
    tensors["in/diffusion/x_start"] = torch.rand(B, C, H, H, generator=g) * 2 - 1
    tensors["in/diffusion/noise"] = torch.randn(B, C, H, H, generator=g)
    tensors["in/diffusion/x_T"] = torch.randn(B, C, H, H, generator=g)
    tensors["in/diffusion/y"] = torch.tensor([0, 3, 7, n_cls])  # the last one: the null label
    x0, noise, xT = T("in/diffusion/x_start"), T("in/diffusion/noise"), T("in/diffusion/x_T")
    mk = {"y": T("in/diffusion/y")}
    shape = [B, C, H, H]

    for cname, spec in DIFFUSION_CONFIGS.items():
        dkw = diffusions[cname] = spec["diffusion"]
        learn_sigma = dkw.get("learn_sigma", True)
        mname = "tiny_sigma" if learn_sigma else "tiny_fixed"
        M = {"$model": mname}
        d = impl.create_diffusion(**dkw)
        n = d.num_timesteps
        t = torch.tensor([0, 1, n // 2, n - 1])
        tensors[f"in/{cname}/t"] = t
        # x_t from the official q_sample, so the model-calling cases start from recorded inputs.
        tensors[f"in/{cname}/x_t"] = d.q_sample(tensors["in/diffusion/x_start"], t, noise=tensors["in/diffusion/noise"])
        tt, xt = T(f"in/{cname}/t"), T(f"in/{cname}/x_t")
        pre = f"diffusion/{cname}"
        base = dict(kind="diffusion_call", diffusion=cname, models=[mname])

        def add(cid: str, method: str, args: dict, **extra: Any) -> None:
            cases.append(dict(base, id=f"{pre}/{cid}", method=method, args=args, **extra))

        cases.append(dict(id=f"{pre}/attrs", kind="diffusion_attrs", diffusion=cname))
        add("q_mean_variance", "q_mean_variance", dict(x_start=x0, t=tt), models=[])
        add("q_sample", "q_sample", dict(x_start=x0, t=tt, noise=noise), models=[])
        add("q_posterior_mean_variance", "q_posterior_mean_variance", dict(x_start=x0, x_t=xt, t=tt), models=[])
        for clip in (True, False):
            add(f"p_mean_variance/clip={clip}", "p_mean_variance",
                dict(model=M, x=xt, t=tt, clip_denoised=clip, model_kwargs=mk))
        add("p_sample", "p_sample", dict(model=M, x=xt, t=tt, model_kwargs=mk), seed=11)
        for eta in (0.0, 0.5):
            add(f"ddim_sample/eta={eta}", "ddim_sample", dict(model=M, x=xt, t=tt, model_kwargs=mk, eta=eta), seed=13)
        add("ddim_reverse_sample", "ddim_reverse_sample",
            dict(model=M, x=xt, t=tt, clip_denoised=False, model_kwargs=mk))
        add("training_losses", "training_losses", dict(model=M, x_start=x0, t=tt, model_kwargs=mk, noise=noise),
            grad=mname)
        if spec.get("extras"):
            add("p_mean_variance/denoised_fn", "p_mean_variance",
                dict(model=M, x=xt, t=tt, clip_denoised=True, denoised_fn={"$fn": "denoised_fn"}, model_kwargs=mk))
            add("p_sample/cond_fn", "p_sample", dict(model=M, x=xt, t=tt, cond_fn={"$fn": "cond_fn"}, model_kwargs=mk),
                seed=12)
            add("ddim_sample/cond_fn", "ddim_sample",
                dict(model=M, x=xt, t=tt, clip_denoised=False, cond_fn={"$fn": "cond_fn"}, model_kwargs=mk, eta=0.5),
                seed=14)
            add("training_losses/drawn_noise", "training_losses", dict(model=M, x_start=x0, t=tt, model_kwargs=mk),
                seed=15)
        if spec.get("loops"):
            for clip in (True, False):
                add(f"p_sample_loop/clip={clip}", "p_sample_loop",
                    dict(model=M, shape=shape, noise=xT, clip_denoised=clip, model_kwargs=mk), seed=21, loop=True)
                for eta in (0.0, 1.0):
                    add(f"ddim_sample_loop/clip={clip}/eta={eta}", "ddim_sample_loop",
                        dict(model=M, shape=shape, noise=xT, clip_denoised=clip, model_kwargs=mk, eta=eta),
                        seed=22, loop=True)
            # x_T drawn from the global RNG too, and classifier guidance inside the loops.
            add("p_sample_loop/drawn_x_T/cond_fn", "p_sample_loop",
                dict(model=M, shape=shape, cond_fn={"$fn": "cond_fn"}, model_kwargs=mk), seed=23, loop=True)
            add("ddim_sample_loop/drawn_x_T/cond_fn", "ddim_sample_loop",
                dict(model=M, shape=shape, cond_fn={"$fn": "cond_fn"}, model_kwargs=mk, eta=0.5), seed=24, loop=True)
            add("calc_bpd_loop", "calc_bpd_loop", dict(model=M, x_start=x0, model_kwargs=mk), seed=25, loop=True)
    # calc_bpd_loop over a whole 50-step process too (the loops above run on 10-step ones).
    cases.append(dict(id="diffusion/hybrid_T50/calc_bpd_loop", kind="diffusion_call",
                      diffusion="hybrid_T50", models=["tiny_sigma"],
                      method="calc_bpd_loop", seed=26, loop=True,
                      args=dict(model={"$model": "tiny_sigma"}, x_start=x0, clip_denoised=False, model_kwargs=mk)))

    # -- official sample.py's loop: DiT.forward_with_cfg on a [cond; null] batch -------------------
    name = "dit_c3_sigma"
    cfg = DIT_CONFIGS[name]
    z = torch.randn(2, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g)
    tensors["in/pipeline/z"] = torch.cat([z, z])
    tensors["in/pipeline/y"] = torch.tensor([1, 4, cfg["num_classes"], cfg["num_classes"]])
    for respacing, method in (("10", "p_sample_loop"), ("ddim10", "ddim_sample_loop")):
        dname = f"pipeline_{respacing}"
        diffusions[dname] = {"timestep_respacing": respacing}  # the official 1000-step default
        cases.append(dict(id=f"pipeline/{name}/{respacing}", kind="diffusion_call", diffusion=dname,
                          models=[name], method=method, seed=31, loop=True,
                          cfg_scale=4.0, dit=name,
                          args=dict(model={"$model": name, "method": "forward_with_cfg"},
                                    shape=list(tensors["in/pipeline/z"].shape), noise=T("in/pipeline/z"),
                                    clip_denoised=False, model_kwargs={"y": T("in/pipeline/y"), "cfg_scale": 4.0},
                                    device="cpu")))
        cases.append(dict(id=f"pipeline/{name}/{respacing}/attrs", kind="diffusion_attrs", diffusion=dname))

    # -- respaced timestep sets --------------------------------------------------------------------
    for respacing, steps in RESPACINGS:
        cases.append(dict(id=f"respacing/{respacing}/of/{steps}", kind="respacing", respacing=respacing,
                          diffusion_steps=steps))

    return dict(format=FIXTURE_FORMAT, models=models, diffusions=diffusions, cases=cases), tensors


# --------------------------------------------------------------------------- official side

def load_official(checkout: str) -> Implementation:
    """The official models.py (needs timm importable) and diffusion package of a checkout."""
    spec = importlib.util.spec_from_file_location("official_dit_models", os.path.join(checkout, "models.py"))
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    sys.path.insert(0, checkout)
    try:
        from diffusion import create_diffusion  # the official package
    finally:
        sys.path.remove(checkout)
    return Implementation(DiT=models.DiT, DiT_models=models.DiT_models, create_diffusion=create_diffusion)


def _revision(checkout: str) -> str:
    try:
        return subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="path of a facebookresearch/DiT checkout")
    parser.add_argument("--out", default=DEFAULT_OUT, help="fixture to write (default: %(default)s)")
    parser.add_argument("--revision", help="official revision to record (default: git rev-parse HEAD of the checkout)")
    args = parser.parse_args(argv)
    if not (os.path.isfile(os.path.join(args.checkout, "models.py"))
            and os.path.isdir(os.path.join(args.checkout, "diffusion"))):
        print(f"error: {args.checkout} is not a facebookresearch/DiT checkout (models.py, diffusion/)", file=sys.stderr)
        return 2
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # one thread: the reductions run in one fixed order
    official = load_official(args.checkout)
    meta, tensors = build_fixture(official)
    # Many outputs repeat (the variance of every p_mean_variance call at the same t, say): each
    # distinct tensor is stored once and the repeats are recorded as aliases.
    stored: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for case in meta["cases"]:
        try:
            out = run_case(case, meta, tensors, official)
        except ValueError as e:  # impossible respacings: the official code refuses them
            case["raises"] = type(e).__name__
            continue
        case["outputs"] = list(out)
        for k, v in out.items():
            key = f"out/{case['id']}/{k}"
            v = v.detach().clone()  # a copy: loss and mse can be one tensor
            ident = (str(v.dtype), tuple(v.shape), v.numpy().tobytes())
            if ident in stored:
                aliases[key] = stored[ident]
            else:
                stored[ident] = key
                tensors[key] = v
    meta["aliases"] = aliases
    meta["official_revision"] = args.revision or _revision(args.checkout)
    meta["torch"] = torch.__version__
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # Every tensor keeps its dtype: float32 inputs and outputs, float64 schedules and checksums,
    # int64 timesteps and labels, float16 weights.
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out,
              metadata={"fixture": json.dumps(meta, separators=(",", ":"))})
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {len(meta['cases'])} cases, {len(tensors)} tensors, {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
