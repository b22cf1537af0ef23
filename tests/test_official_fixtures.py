"""ditlab's DiT and Gaussian diffusion against recorded outputs of the official facebookresearch/DiT code.

`tests/fixtures/official_dit.safetensors` holds seeded inputs, weights and the official
outputs, written by `benchmarks/make_official_fixtures.py` (its docstring says how to
regenerate it). Every recorded case is replayed here on ditlab through the same case runner,
so no official checkout (and no timm) is needed.

Tolerances. Both implementations do the same float32 operations in the same order, so on the
recording machine the differences are exactly 0. On another CPU (or torch build) the kernels may
differ: vectorised vs scalar transcendental functions (Sleef vs libm, <= 1 ulp), FMA vs separate
multiply-add, a different summation order in matmul/conv reductions. So each comparison allows
`ULPS` units in the last place per operation, growing like sqrt(n) for a chain of n rounded
operations (independent rounding errors add like a random walk), relative to the largest magnitude
of the expected tensor, times the amplification `amp` that the formulas themselves apply to an
error of the model output:
  - x_0 from a predicted eps multiplies it by sqrt(1 / abar_t), at most `kappa` = sqrt(1 / abar_T-1)
    (360 for the 50-step linear schedule, 160 for the 1000-step one, 1000 for the 50-step
    cosine one); the same bound covers the other ill-conditioned spot, the discretised decoder
    likelihood at t = 0;
  - classifier-free guidance u + s (c - u) multiplies errors by |s| + |1 - s|.
The schedules are float64 numpy on both sides: there the tolerance is ULPS float64 ulps per step
of the T-step cumulative product. Integer results (timestep sets) must be equal.
Checked when the fixture was made: with torch's scalar kernels (ATEN_CPU_CAPABILITY=default),
other MKL/oneDNN code paths or two threads, the largest difference used 34% of its tolerance (the
normal samples of the initialisation); multiplying every model output by 1 + 8 ulps of noise
used at most 7%. A real regression (a wrong coefficient, timestep, clipping, channel split, RNG
order) moves the results by orders of magnitude more than these bounds.

The DiT cases run twice: on the model as constructed (PyTorch's products, MKL on CPU) and with its
linear layers in oneDNN (`models/onednn.py`, what `build_model` gives on CPU), which only sums
the same products in another order and so must meet the same tolerances.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ditlab.diffusion import create_diffusion
from ditlab.models import DiT, DiT_models
from ditlab.models.onednn import onednn_available, use_onednn_linear

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "official_dit.safetensors"


def _load_runner():
    """The case runner the fixture was recorded with (benchmarks/make_official_fixtures.py)."""
    path = ROOT / "benchmarks" / "make_official_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_official_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
with safe_open(str(FIXTURE), "pt") as f:
    META: dict = json.loads(f.metadata()["fixture"])
TENSORS: dict[str, torch.Tensor] = load_file(str(FIXTURE))
for _alias, _target in META["aliases"].items():  # repeated outputs are stored once
    TENSORS[_alias] = TENSORS[_target]
CASES: list[dict] = META["cases"]
DITLAB = runner.Implementation(DiT=DiT, DiT_models=DiT_models, create_diffusion=create_diffusion)


def _with_onednn(build):
    def make(*args, **kwargs):
        model = build(*args, **kwargs)
        use_onednn_linear(model)
        return model
    return make


DITLAB_ONEDNN = runner.Implementation(DiT=_with_onednn(DiT), DiT_models={k: _with_onednn(v) for k, v in DiT_models.items()},
                                      create_diffusion=create_diffusion)

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
ULPS = 4  # per rounded operation; kernel differences between CPUs are 1-2 ulps per operation
TINY_MODEL_TERMS = 27  # the fixture denoiser's longest reduction: a 3x3 conv over 3 channels
# A normal sample is u -> sqrt(-2 log u1) cos(2 pi u2) * std + mean: about six rounded operations,
# whose vectorised and scalar versions differ (seen: 3-4 ulps between torch's AVX2 and scalar paths).
RNG_TERMS = 6


def _expected(case: dict) -> dict[str, torch.Tensor]:
    return {k: TENSORS[f"out/{case['id']}/{k}"] for k in case["outputs"]}


def _cases(*kinds: str) -> list:
    return [pytest.param(c, id=c["id"]) for c in CASES if c["kind"] in kinds]


def _dit_cases(*kinds: str) -> list:
    """(case, implementation): cases that run a DiT once per way of computing its linear layers."""
    params = []
    for c in CASES:
        if c["kind"] in kinds:
            params.append(pytest.param(c, DITLAB, id=c["id"]))
            if "dit" in c or c["kind"] == "dit_call":
                params.append(pytest.param(c, DITLAB_ONEDNN, id=f"{c['id']}-onednn",
                                           marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN")))
    return params


def _f32_tol(expected: torch.Tensor, terms: float = 1.0, amp: float = 1.0) -> float:
    """ULPS float32 ulps, growing like sqrt(terms), amplified by amp, of the tensor's magnitude."""
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return ULPS * EPS32 * math.sqrt(terms) * amp * scale


def _check(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != official {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != official {expected.dtype}"
    actual, expected = actual.detach().double(), expected.double()
    finite = expected.isfinite()
    assert torch.equal(actual.isfinite(), finite), f"{what}: inf/nan at other places than in the official output"
    assert torch.equal(actual[~finite].nan_to_num(), expected[~finite].nan_to_num()), f"{what}: other inf/nan values"
    diff = (actual - expected).abs()[finite]
    err = diff.max().item() if diff.numel() else 0.0
    assert err <= tol, f"{what}: max |ditlab - official| = {err:.3e} > tolerance {tol:.3e}"


def _check_keys(actual: dict, expected: dict, case: dict) -> None:
    missing = sorted(set(expected) - set(actual))
    assert not missing, f"{case['id']}: outputs missing from ditlab's result: {missing}"


def _check_rng_after(actual: dict, expected: dict, case: dict) -> None:
    """Seeded cases record torch.rand(8) drawn right after the call: ditlab must advance the
    global RNG exactly as far as the official code (uniform samples: no transform to differ in)."""
    if "rng_after" in expected:
        _check(actual["rng_after"], expected["rng_after"], _f32_tol(expected["rng_after"]), f"{case['id']} rng_after")


def _dit_terms(cfg: dict) -> int:
    """Rounded operations on the longest path of a DiT forward: the longest reduction (the
    256-frequency timestep embedding, the MLP, attention over the tokens, the patch projection)
    for each block plus the embedding and final layers."""
    tokens = (cfg["input_size"] // cfg["patch_size"]) ** 2
    longest = max(256, int(cfg["hidden_size"] * cfg.get("mlp_ratio", 4.0)), tokens,
                  cfg["patch_size"] ** 2 * cfg["in_channels"])
    return (cfg["depth"] + 2) * longest


def _cfg_amp(scale: float) -> float:
    return abs(scale) + abs(1 - scale)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_own_rng():
    # The tensors are tiny: with several threads, synchronising them costs far more than the work
    # (10 ms instead of 0.1 ms per conv on a busy 2-core machine). One thread is also how the
    # fixture was recorded, so on that machine the comparison is exact. The seeded cases reset
    # torch's global RNG; fork_rng hands the other test modules back the state they had.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- cases


@pytest.mark.parametrize("case", _cases("rng"))
def test_global_rng_stream_is_the_recorded_one(case):
    # Every seeded case below relies on this; a failure here means the platform's RNG, not ditlab.
    actual = runner.run_case(case, META, TENSORS, DITLAB)
    for key, exp in _expected(case).items():
        _check(actual[key], exp, _f32_tol(exp, RNG_TERMS), f"{case['id']} {key}")


@pytest.mark.parametrize("case", _cases("dit_init"))
def test_seeded_initialisation(case):
    actual = runner.run_case(case, META, TENSORS, DITLAB)
    expected = _expected(case)
    if case["store"] == "checksums":  # rows in state_dict order: numel, sum, sum of squares, weighted sum
        got, exp = actual["checksums"], expected["checksums"]
        assert got.shape == exp.shape, f"{case['id']}: {got.shape[0]} state_dict entries, official {exp.shape[0]}"
        for i, (g_row, e_row) in enumerate(zip(got.tolist(), exp.tolist())):
            assert g_row[0] == e_row[0], f"{case['id']} entry {i}: {g_row[0]:.0f} values, official {e_row[0]:.0f}"
            # Each init value may be r = ULPS sqrt(RNG_TERMS) ulps off: the sums by at most
            # r eps sum|v| <= r eps sqrt(n sum v^2), the sum of squares by 2 r eps sum v^2.
            n, sq = e_row[0], e_row[2]
            r = ULPS * math.sqrt(RNG_TERMS) * EPS32
            tol_sum = r * math.sqrt(n * sq)
            for col, tol, label in ((1, tol_sum, "sum"), (2, 2 * r * sq, "sum of squares"),
                                    (3, tol_sum, "weighted sum")):
                err = abs(g_row[col] - e_row[col])
                assert err <= tol, f"{case['id']} entry {i}: {label} differs by {err:.3e} > {tol:.3e}"
        return
    assert list(actual) == list(expected), f"{case['id']}: state_dict keys differ from the official ones"
    for key, exp in expected.items():
        # The initialisers transform one random number per value (normal or uniform samples).
        _check(actual[key], exp, _f32_tol(exp, RNG_TERMS), f"{case['id']} {key}")


@pytest.mark.parametrize("case, impl", _dit_cases("dit_call"))
def test_dit(case, impl):
    actual = runner.run_case(case, META, TENSORS, impl)
    expected = _expected(case)
    _check_keys(actual, expected, case)
    _check_rng_after(actual, expected, case)
    cfg = META["models"][case["model"]]["config"]
    terms = _dit_terms(cfg)
    got, exp = actual["out"], expected["out"]
    if case["method"] != "forward_with_cfg":
        _check(got, exp, _f32_tol(exp, terms), case["id"])
        return
    # ditlab guides all in_channels prediction channels; the official code the first 3 (4-channel
    # latents keep channel 4 unguided, 1-channel images guide the sigma channel). Where the two
    # conventions agree, compare with the official output directly ...
    C, scale = cfg["in_channels"], case["cfg_scale"]
    amp = _cfg_amp(scale)
    assert got.shape == exp.shape, f"{case['id']}: shape {tuple(got.shape)} != official {tuple(exp.shape)}"
    agree = [i for i in range(exp.shape[1]) if (i < 3) == (i < C)]
    _check(got[:, agree], exp[:, agree], _f32_tol(exp[:, agree], terms, amp), f"{case['id']} channels {agree}")
    # ... and everywhere with ditlab's convention applied to the official forward of the doubled batch.
    doubled = TENSORS[f"out/{case['companion']}/out"]
    cond, uncond = doubled[:, :C].chunk(2)
    guided = uncond + scale * (cond - uncond)
    reference = torch.cat([torch.cat([guided, guided]), doubled[:, C:]], dim=1)
    _check(got, reference, _f32_tol(reference, terms, amp), f"{case['id']} (ditlab's all-channel guidance)")


def _attrs_case(diffusion: str) -> dict:
    return next(c for c in CASES if c["kind"] == "diffusion_attrs" and c["diffusion"] == diffusion)


@pytest.mark.parametrize("case", _cases("diffusion_attrs"))
def test_diffusion_schedule(case):
    actual = runner.run_case(case, META, TENSORS, DITLAB)
    expected = _expected(case)
    _check_keys(actual, expected, case)
    steps = META["diffusions"][case["diffusion"]].get("diffusion_steps", 1000)
    for key, exp in expected.items():
        if exp.dtype == torch.int64:
            assert torch.equal(actual[key], exp), f"{case['id']} {key}: {actual[key].tolist()} != {exp.tolist()}"
        else:  # float64 on both sides: ULPS float64 ulps per step of the cumulative product
            finite = exp[exp.isfinite()]
            _check(actual[key], exp, ULPS * EPS64 * steps * finite.abs().max().item(), f"{case['id']} {key}")


@pytest.mark.parametrize("case, impl", _dit_cases("diffusion_call"))
def test_diffusion(case, impl):
    actual = runner.run_case(case, META, TENSORS, impl)
    expected = _expected(case)
    _check_keys(actual, expected, case)
    if not case["models"]:  # q_*: float32 coefficients times the inputs, no model, no amplification
        terms, amp = 1.0, 1.0
    else:
        attrs = _expected(_attrs_case(case["diffusion"]))
        kappa = attrs["sqrt_recip_alphas_cumprod"].max().item()
        steps = attrs["num_timesteps"].item() if case.get("loop") else 1
        if "dit" in case:  # the official sample.py loop: DiT.forward_with_cfg at every step
            terms = steps * _dit_terms(META["models"][case["dit"]]["config"])
            amp = kappa * _cfg_amp(case["cfg_scale"])
        else:
            terms, amp = steps * TINY_MODEL_TERMS, kappa
    _check_rng_after(actual, expected, case)
    x = TENSORS["in/diffusion/x_start"]
    for key, exp in expected.items():
        if key == "rng_after":
            continue
        # A weight gradient sums over every position of the batch as well.
        n = terms * (x.numel() // x.shape[1]) if key.startswith("grad/") else terms
        _check(actual[key], exp, _f32_tol(exp, n, amp), f"{case['id']} {key}")


@pytest.mark.parametrize("case", _cases("respacing"))
def test_respaced_timesteps(case):
    if "raises" in case:  # the official code raises ValueError; ditlab its one-line user error
        with pytest.raises(Exception):
            runner.run_case(case, META, TENSORS, DITLAB)
        return
    actual = runner.run_case(case, META, TENSORS, DITLAB)["timestep_map"]
    expected = _expected(case)["timestep_map"]
    assert actual.tolist() == expected.tolist()


def test_fixture_covers_every_kind():
    # Guards against a regenerated fixture that silently lost a section.
    kinds = {c["kind"] for c in CASES}
    assert kinds == {"rng", "dit_init", "dit_call", "diffusion_attrs", "diffusion_call", "respacing"}
    methods = {c["method"] for c in CASES if c["kind"] == "diffusion_call"}
    assert methods >= {"q_mean_variance", "q_sample", "q_posterior_mean_variance", "p_mean_variance", "p_sample",
                       "ddim_sample", "ddim_reverse_sample", "training_losses", "p_sample_loop", "ddim_sample_loop",
                       "calc_bpd_loop"}
