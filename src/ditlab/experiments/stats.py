"""Statistics of a finding: effects with confidence intervals over seeds, and a plain verdict.

A finding compares arms (configurations), each run with several seeds and scored by a metric
whose direction is known (class accuracy: higher is better; FID: lower is better). Per arm the
seed values give a mean and a spread; a metric measured on N samples also carries sampling
error (binomial for an accuracy), which the seed spread contains but cannot show with one or two
seeds. The variance of an arm's mean is therefore

    var_mean = max(s^2, mean sampling variance) / n        s^2: the seeds' sample variance

and the difference of two arms gets a Welch t-interval (Welch-Satterthwaite degrees of freedom;
with one seed per arm, the normal quantile on the sampling variance alone).

Two arms measured on the same models (one trained model per seed, sampled two ways: steps,
guidance, or two points of one training run) are paired: the seed-to-seed spread of model
quality is common to both and cancels in the per-seed differences d_i = A_i - B_i. Their
difference gets the paired t-interval, n - 1 degrees of freedom, on

    var_mean = max(s_d^2, mean (sqrt(var_A,i) - sqrt(var_B,i))^2) / n

whose floor is the smallest sampling variance a difference of two measurements can have
(correlation 1); treating such arms as independent would count the model's spread twice.

Claims and verdicts (the effect is oriented so that positive means "A is better"):
- `better` (A better than B): reproduces when the CI of the effect lies above 0, contradicts when
  it lies below 0 (B is significantly better), inconclusive otherwise. No difference at all is
  therefore inconclusive: absence of evidence is not a contradiction.
- `equivalent` (A ≈ B within ±margin): reproduces when the CI lies inside [-margin, margin];
  contradicts when it lies wholly outside that band (a difference larger than the margin);
  inconclusive otherwise.
- `noninferior` (A not worse than B by more than the margin): reproduces when the CI lies above
  -margin, contradicts when it lies wholly below -margin, inconclusive otherwise.
- `ordering` (A > B > C ...): every adjacent pair is a `better` claim; reproduces when all pairs
  do, contradicts when any pair contradicts, inconclusive otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from ditlab.errors import DitlabError

CLAIMS = ("better", "equivalent", "noninferior", "ordering")
VERDICTS = ("reproduces", "contradicts", "inconclusive")


@dataclass
class ArmStats:
    """One arm's metric over seeds."""

    mean: float
    var_mean: float  # variance of the mean (seed spread, floored by sampling error)
    n: int  # seeds
    values: list[float]
    sampling_var: list[float] | None = None  # per seed, in the order of values
    models: list[str] | None = None  # per seed, the trained model measured: equal lists pair two arms

    @property
    def se(self) -> float:
        return math.sqrt(self.var_mean)


@dataclass
class Effect:
    """A - B oriented so that positive means A is better, with its confidence interval."""

    a: str
    b: str
    estimate: float
    low: float
    high: float
    df: float
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    claim: str
    verdict: str  # reproduces | contradicts | inconclusive
    effects: list[Effect]
    margin: float | None = None

    def as_dict(self) -> dict:
        return {"claim": self.claim, "verdict": self.verdict, "margin": self.margin,
                "effects": [e.as_dict() for e in self.effects]}


def binomial_variance(p: float, n: int) -> float:
    """Sampling variance of an accuracy p measured on n samples: p(1-p)/n with p pulled half a
    sample towards 1/2 (the Jeffreys estimate), so that 0% and 100% still carry their uncertainty."""
    if n < 1:
        raise DitlabError(f"an accuracy needs at least one sample, got n={n}")
    p = (p * n + 0.5) / (n + 1)
    return p * (1.0 - p) / n


def arm_stats(values: Sequence[float], sampling_var: Sequence[float] | None = None,
              models: Sequence[str] | None = None) -> ArmStats:
    """Mean over seeds and the variance of that mean (see the module docstring). `models` names the
    trained model behind each value; two arms with the same list are compared paired."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise DitlabError(f"an arm needs finite metric values, got {list(values)}")
    n = int(v.size)
    spread = float(v.var(ddof=1)) if n > 1 else 0.0
    per_seed_var = [float(x) for x in sampling_var] if sampling_var is not None and len(sampling_var) else None
    floor = float(np.mean(per_seed_var)) if per_seed_var else 0.0
    if n == 1 and floor == 0.0:
        raise DitlabError("one seed and no sampling variance: the uncertainty of this arm is unknown")
    for name, per_seed in (("sampling variances", sampling_var), ("models", models)):
        if per_seed is not None and len(per_seed) not in (0, n):
            raise DitlabError(f"an arm of {n} seeds got {len(per_seed)} {name}")
    return ArmStats(float(v.mean()), max(spread, floor) / n, n, [float(x) for x in v], per_seed_var,
                    list(models) if models is not None else None)


def mean_interval(values: Sequence[float], sampling_var: Sequence[float] | None = None,
                  confidence: float = 0.95) -> tuple[float, float]:
    """An arm's mean and the half-width of its confidence interval (t over seeds; normal for one seed)."""
    s = arm_stats(values, sampling_var)
    q = stats.t.ppf(0.5 + confidence / 2, s.n - 1) if s.n > 1 else stats.norm.ppf(0.5 + confidence / 2)
    return s.mean, float(q * s.se)


def paired(a: ArmStats, b: ArmStats) -> bool:
    """Whether A and B were measured on the same trained models, seed by seed (and more than one)."""
    return a.models is not None and a.models == b.models and a.n > 1


def effect(a: ArmStats, b: ArmStats, *, higher_is_better: bool, names: tuple[str, str] = ("A", "B"),
           confidence: float = 0.95) -> Effect:
    """Interval of mean(A) - mean(B), sign flipped when lower is better: paired when A and B share
    their models, Welch otherwise (see the module docstring)."""
    sign = 1.0 if higher_is_better else -1.0
    if paired(a, b):
        return _paired_effect(a, b, sign, names, confidence)
    diff = sign * (a.mean - b.mean)
    var = a.var_mean + b.var_mean
    if var == 0.0:
        return Effect(names[0], names[1], diff, diff, diff, math.inf, confidence)
    parts = [(x.var_mean, x.n) for x in (a, b) if x.n > 1]
    if len(parts) == 2:  # Welch-Satterthwaite
        df = var**2 / sum(vm**2 / (n - 1) for vm, n in parts)
        q = float(stats.t.ppf(0.5 + confidence / 2, df))
    else:  # a single-seed arm: its variance is the sampling variance, known rather than estimated
        df = math.inf
        q = float(stats.norm.ppf(0.5 + confidence / 2))
    half = q * math.sqrt(var)
    return Effect(names[0], names[1], diff, diff - half, diff + half, df, confidence)


def _paired_effect(a: ArmStats, b: ArmStats, sign: float, names: tuple[str, str], confidence: float) -> Effect:
    d = sign * (np.asarray(a.values) - np.asarray(b.values))
    sd_a, sd_b = (np.sqrt(x.sampling_var or [0.0] * x.n) for x in (a, b))  # none given: measured exactly
    floor = float(np.mean((sd_a - sd_b) ** 2))
    var = max(float(d.var(ddof=1)), floor) / a.n
    diff = float(d.mean())
    if var == 0.0:
        return Effect(names[0], names[1], diff, diff, diff, math.inf, confidence)
    df = float(a.n - 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(var)
    return Effect(names[0], names[1], diff, diff - half, diff + half, df, confidence)


def judge_better(e: Effect) -> str:
    if e.low > 0:
        return "reproduces"
    if e.high < 0:
        return "contradicts"
    return "inconclusive"


def judge_equivalent(e: Effect, margin: float) -> str:
    if margin <= 0:
        raise DitlabError(f"an equivalence claim needs a positive margin, got {margin}")
    if -margin <= e.low and e.high <= margin:
        return "reproduces"
    if e.low > margin or e.high < -margin:
        return "contradicts"
    return "inconclusive"


def judge_noninferior(e: Effect, margin: float) -> str:
    if margin <= 0:
        raise DitlabError(f"a non-inferiority claim needs a positive margin, got {margin}")
    if e.low > -margin:
        return "reproduces"
    if e.high < -margin:
        return "contradicts"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """All parts reproduce: reproduces; any part contradicts: contradicts; else inconclusive."""
    if verdicts and all(v == "reproduces" for v in verdicts):
        return "reproduces"
    if any(v == "contradicts" for v in verdicts):
        return "contradicts"
    return "inconclusive"


def verdict(claim: str, arms: dict[str, ArmStats], order: Sequence[str], *, higher_is_better: bool,
            margin: float | None = None, confidence: float = 0.95) -> Verdict:
    """The verdict of `claim` over arms named in `order` (best first for `better`/`ordering`)."""
    if claim not in CLAIMS:
        raise DitlabError(f"unknown claim '{claim}' (choose {', '.join(CLAIMS)})")
    missing = [name for name in order if name not in arms]
    if missing:
        raise DitlabError(f"the claim names arms without results: {', '.join(missing)}")
    if len(order) < 2 or (claim != "ordering" and len(order) != 2):
        raise DitlabError(f"a '{claim}' claim compares {'two' if claim != 'ordering' else 'two or more'} arms, got {list(order)}")
    effects = [effect(arms[x], arms[y], higher_is_better=higher_is_better, names=(x, y), confidence=confidence)
               for x, y in zip(order, order[1:])]
    if claim in ("equivalent", "noninferior"):
        if margin is None:
            raise DitlabError(f"an {claim} claim needs a margin")
        judge = judge_equivalent if claim == "equivalent" else judge_noninferior
        return Verdict(claim, judge(effects[0], margin), effects, margin)
    return Verdict(claim, combine([judge_better(e) for e in effects]), effects)  # no margin in a better/ordering claim
