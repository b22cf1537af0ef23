"""The statistics behind a finding's verdict: intervals against closed forms and simulation,
and the verdict rules on synthetic arms with a known difference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ditlab.errors import DitlabError
from ditlab.experiments.stats import (Effect, arm_stats, binomial_variance, combine, effect, judge_better, judge_equivalent,
                                      judge_noninferior, mean_interval, verdict)


def arms(**values):
    return {name: arm_stats(v) for name, v in values.items()}


def test_welch_interval_matches_the_closed_form():
    a, b = [0.91, 0.93, 0.90, 0.94], [0.85, 0.88, 0.86]
    e = effect(arm_stats(a), arm_stats(b), higher_is_better=True)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert e.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert (e.low, e.high, e.df) == pytest.approx((e.estimate - half, e.estimate + half, df))


def test_two_seeds_and_the_degenerate_cases():
    two = arm_stats([1.0, 3.0])
    assert (two.mean, two.var_mean, two.n, two.values) == (2.0, 1.0, 2, [1.0, 3.0])  # s^2 = 2 over 2 seeds
    e = effect(two, arm_stats([0.0, 0.5]), higher_is_better=True)
    assert e.df == pytest.approx((1.0 + 0.0625) ** 2 / (1.0 + 0.0625**2))  # Welch with n - 1 = 1 on each side
    assert e.high - e.estimate == pytest.approx(stats.t.ppf(0.975, e.df) * math.sqrt(1.0625))
    # one seed on a side: the normal quantile, infinite degrees of freedom
    one = effect(two, arm_stats([0.5], [0.25]), higher_is_better=True)
    assert one.df == math.inf and one.high - one.estimate == pytest.approx(stats.norm.ppf(0.975) * math.sqrt(1.0 + 0.25))
    # no spread and no sampling error on either side: the difference is exact
    exact = effect(arm_stats([2.0, 2.0]), arm_stats([1.5, 1.5]), higher_is_better=False, names=("X", "Y"), confidence=0.9)
    assert exact.as_dict() == {"a": "X", "b": "Y", "estimate": -0.5, "low": -0.5, "high": -0.5, "df": math.inf,
                               "confidence": 0.9}


def test_lower_is_better_flips_the_sign():
    fid = effect(arm_stats([2.0, 2.2, 2.1]), arm_stats([5.0, 5.3, 4.9]), higher_is_better=False)
    assert fid.estimate == pytest.approx(5.0667 - 2.1, abs=1e-3) and fid.low > 0


def test_one_seed_uses_the_sampling_error_and_the_normal_quantile():
    va, vb = binomial_variance(0.9, 1000), binomial_variance(0.8, 1000)
    e = effect(arm_stats([0.9], [va]), arm_stats([0.8], [vb]), higher_is_better=True)
    half = stats.norm.ppf(0.975) * math.sqrt(va + vb)
    assert (e.low, e.high) == pytest.approx((0.1 - half, 0.1 + half))
    # the sampling error floors a seed spread that happens to be smaller
    tight = arm_stats([0.9, 0.9 + 1e-6], [0.09 / 100] * 2)
    assert tight.var_mean == pytest.approx(0.09 / 100 / 2)


def test_the_interval_covers_the_truth_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    reps, hits = 2000, 0
    for _ in range(reps):
        e = effect(arm_stats(rng.normal(0.5, 1.0, 3)), arm_stats(rng.normal(0.0, 1.5, 4)), higher_is_better=True)
        hits += e.low <= 0.5 <= e.high
    se = math.sqrt(0.95 * 0.05 / reps)
    assert abs(hits / reps - 0.95) < 4 * se  # Welch's interval is near-exact for normal data


def test_arms_sampled_from_the_same_models_are_compared_paired():
    # three trained models (FID 20, 30, 40), each sampled two ways: B is worse by 1-1.5 in every model
    models = ["m0", "m1", "m2"]
    a, b = [20.0, 30.0, 40.0], [21.0, 31.5, 40.9]
    e = effect(arm_stats(a, models=models), arm_stats(b, models=models), higher_is_better=False, names=("A", "B"))
    d = np.subtract(b, a)  # lower is better: positive means A is better
    half = stats.t.ppf(0.975, 2) * math.sqrt(np.var(d, ddof=1) / 3)
    assert (e.estimate, e.low, e.high, e.df) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half, 2.0))
    assert (e.a, e.b, e.confidence) == ("A", "B", 0.95) and judge_better(e) == "reproduces"
    # the same numbers as independent arms: the models' spread hides the difference
    welch = effect(arm_stats(a), arm_stats(b), higher_is_better=False, names=("A", "B"))
    assert judge_better(welch) == "inconclusive" and welch.df > 2
    # other models, no models named, or a single model: not paired
    assert effect(arm_stats(a, models=models), arm_stats(b, models=["n0", "n1", "n2"]), higher_is_better=False,
                  names=("A", "B")) == welch
    assert effect(arm_stats(a, models=models), arm_stats(b), higher_is_better=False, names=("A", "B")) == welch
    one = effect(arm_stats([20.0], [0.04], ["m0"]), arm_stats([21.0], [0.01], ["m0"]), higher_is_better=False)
    assert one.df == math.inf and one.high - one.estimate == pytest.approx(stats.norm.ppf(0.975) * math.sqrt(0.05))


def test_a_paired_difference_is_floored_by_the_least_sampling_variance_it_can_have():
    # the same difference in every model: no spread, so the floor (sd_A - sd_B)^2 = (0.2 - 0.1)^2 sets the interval
    models = ["m0", "m1", "m2"]
    a = arm_stats([20.0, 30.0, 40.0], [0.04] * 3, models)
    b = arm_stats([21.0, 31.0, 41.0], [0.01] * 3, models)
    e = effect(a, b, higher_is_better=False)
    assert e.estimate == pytest.approx(1.0)
    assert e.high - e.estimate == pytest.approx(stats.t.ppf(0.975, 2) * math.sqrt(0.01 / 3))
    # a side without sampling variances counts as measured exactly: the floor is the other side's variance
    half_b = arm_stats([21.0, 31.0, 41.0], models=models)
    assert effect(a, half_b, higher_is_better=False).high - 1.0 == pytest.approx(stats.t.ppf(0.975, 2) * math.sqrt(0.04 / 3))
    # equal sampling variances allow a difference measured exactly
    exact = effect(arm_stats([20.0, 30.0], [0.04] * 2, models[:2]), arm_stats([21.0, 31.0], [0.04] * 2, models[:2]),
                   higher_is_better=False, names=("X", "Y"), confidence=0.9)
    assert exact.as_dict() == {"a": "X", "b": "Y", "estimate": 1.0, "low": 1.0, "high": 1.0, "df": math.inf,
                               "confidence": 0.9}


def test_the_paired_interval_covers_the_truth_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    reps, hits = 2000, 0
    for _ in range(reps):
        model = rng.normal(0.0, 5.0, 3)  # each model's quality, shared by both ways of sampling it
        a, b = model + rng.normal(0.5, 0.3, 3), model + rng.normal(0.0, 0.3, 3)
        e = effect(arm_stats(a, models=["x", "y", "z"]), arm_stats(b, models=["x", "y", "z"]), higher_is_better=True)
        hits += e.low <= 0.5 <= e.high
    se = math.sqrt(0.95 * 0.05 / reps)
    assert abs(hits / reps - 0.95) < 4 * se  # the paired t-interval is exact for normal differences


def test_an_arms_interval_for_the_plots():
    # several seeds: the t quantile with n - 1 degrees of freedom on the standard error of the mean
    values = [10.0, 12.0, 17.0]
    mean, half = mean_interval(values)
    assert mean == pytest.approx(13.0)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * math.sqrt(np.var(values, ddof=1) / 3))
    assert mean_interval(values, confidence=0.5)[1] == pytest.approx(stats.t.ppf(0.75, 2) * math.sqrt(13.0 / 3))
    # the sampling variance floors a seed spread that is smaller
    assert mean_interval([5.0, 5.0], [0.5, 1.5])[1] == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(1.0 / 2))
    # one seed: the normal quantile on its sampling variance alone
    assert mean_interval([0.9], [0.04]) == pytest.approx((0.9, stats.norm.ppf(0.975) * 0.2))


def test_verdicts_on_synthetic_arms():
    rng = np.random.default_rng(1)
    better = arms(A=0.90 + 0.01 * rng.standard_normal(5), B=0.80 + 0.01 * rng.standard_normal(5))
    assert verdict("better", better, ["A", "B"], higher_is_better=True).verdict == "reproduces"
    assert verdict("better", better, ["B", "A"], higher_is_better=True).verdict == "contradicts"
    same = arms(A=[0.80, 0.82, 0.81], B=[0.81, 0.80, 0.82])
    assert verdict("better", same, ["A", "B"], higher_is_better=True).verdict == "inconclusive"
    assert verdict("equivalent", same, ["A", "B"], higher_is_better=True, margin=0.05).verdict == "reproduces"
    assert verdict("equivalent", better, ["A", "B"], higher_is_better=True, margin=0.02).verdict == "contradicts"
    noisy = arms(A=[0.5, 0.9, 0.7], B=[0.6, 0.8, 0.4])
    assert verdict("equivalent", noisy, ["A", "B"], higher_is_better=True, margin=0.05).verdict == "inconclusive"


def test_noninferiority_on_synthetic_arms():
    # FID, lower is better: "A is not worse than B by more than 1.0"
    fid = lambda **v: {k: arm_stats(x) for k, x in v.items()}
    same = fid(A=[10.1, 9.9, 10.0], B=[10.0, 10.1, 9.9])
    assert verdict("noninferior", same, ["A", "B"], higher_is_better=False, margin=1.0).verdict == "reproduces"
    far_worse = fid(A=[14.0, 14.2, 13.9], B=[10.0, 10.1, 9.9])
    v = verdict("noninferior", far_worse, ["A", "B"], higher_is_better=False, margin=1.0)
    assert v.verdict == "contradicts" and v.effects[0].estimate == pytest.approx(np.mean([10.0, 10.1, 9.9]) - np.mean([14.0, 14.2, 13.9]))
    much_better = fid(A=[6.0, 6.1, 5.9], B=[10.0, 10.1, 9.9])
    assert verdict("noninferior", much_better, ["A", "B"], higher_is_better=False, margin=1.0).verdict == "reproduces"
    # worse by about the margin, with wide intervals: cannot tell
    edge = fid(A=[10.0, 12.0, 11.0], B=[10.0, 10.1, 9.9])
    assert verdict("noninferior", edge, ["A", "B"], higher_is_better=False, margin=1.0).verdict == "inconclusive"
    with pytest.raises(DitlabError, match="positive margin"):
        verdict("noninferior", same, ["A", "B"], higher_is_better=False, margin=0.0)


def test_binomial_variance_and_the_verdict_record():
    assert binomial_variance(0.9, 100) == pytest.approx((90.5 / 101) * (10.5 / 101) / 100)
    # all correct still leaves the uncertainty of 1,000 draws: about (0.5/1001) / 1000
    assert binomial_variance(1.0, 1000) == pytest.approx(0.5 / 1001 * (1000.5 / 1001) / 1000)
    assert arm_stats([1.0], [binomial_variance(1.0, 1000)]).se > 0  # one seed at 100% is judged, not refused
    assert binomial_variance(1.0, 1) == pytest.approx(0.75 * 0.25)  # one sample is enough to be judged
    with pytest.raises(DitlabError, match="at least one sample"):
        binomial_variance(0.5, 0)
    two = arms(A=[0.9, 0.92, 0.91], B=[0.5, 0.52, 0.51])
    d = verdict("equivalent", two, ["A", "B"], higher_is_better=True, margin=0.05).as_dict()
    assert d["claim"] == "equivalent" and d["verdict"] == "contradicts" and d["margin"] == 0.05
    (e,) = d["effects"]
    assert (e["a"], e["b"], e["confidence"]) == ("A", "B", 0.95)
    assert e["estimate"] == pytest.approx(0.4) and e["low"] < 0.4 < e["high"] and e["df"] == pytest.approx(4.0)


def ci(low: float, high: float) -> Effect:
    return Effect("A", "B", (low + high) / 2, low, high, 4.0, 0.95)


def test_an_interval_touching_a_bound_does_not_exclude_it():
    # better: the CI must exclude 0 strictly, either way
    assert [judge_better(ci(lo, hi)) for lo, hi in [(1e-9, 1), (0, 1), (-1, 0), (-1, -1e-9), (-1, 1)]] == [
        "reproduces", "inconclusive", "inconclusive", "contradicts", "inconclusive"]
    # equivalent within +-1: inside the closed band reproduces; contradicting needs the whole CI outside it
    assert [judge_equivalent(ci(lo, hi), 1.0) for lo, hi in [(-1, 0.5), (-0.5, 1), (1, 2), (1 + 1e-9, 2), (-2, -1),
                                                              (-2, -1 - 1e-9), (-2, 0.5), (-0.5, 2)]] == [
        "reproduces", "reproduces", "inconclusive", "contradicts", "inconclusive", "contradicts", "inconclusive", "inconclusive"]
    # not worse than -1: the CI above -1 reproduces, wholly below -1 contradicts, across it is inconclusive
    assert [judge_noninferior(ci(lo, hi), 1.0) for lo, hi in [(-1 + 1e-9, 3), (-1, 3), (-2, -1), (-2, -1 - 1e-9), (-2, 0.5)]] == [
        "reproduces", "inconclusive", "inconclusive", "contradicts", "inconclusive"]
    for judge in (judge_equivalent, judge_noninferior):
        with pytest.raises(DitlabError, match="positive margin"):
            judge(ci(-1, 1), 0.0)


def test_the_verdict_record_keeps_the_claim_and_its_confidence():
    three = arms(A=[0.95, 0.96, 0.94], B=[0.85, 0.86, 0.84], C=[0.70, 0.71, 0.72])
    v = verdict("ordering", three, ["A", "B", "C"], higher_is_better=True, confidence=0.5)
    assert v.claim == "ordering" and v.margin is None and all(e.confidence == 0.5 for e in v.effects)
    wide = verdict("ordering", three, ["A", "B", "C"], higher_is_better=True).effects[0]
    assert v.effects[0].high - v.effects[0].low < (wide.high - wide.low) / 3  # t(0.75, df) vs t(0.975, df)
    with pytest.raises(DitlabError, match="compares two arms"):
        verdict("better", three, ["A", "B", "C"], higher_is_better=True)
    with pytest.raises(DitlabError, match="two or more"):
        verdict("ordering", three, ["A"], higher_is_better=True)


def test_combining_verdicts():
    assert combine(["reproduces", "reproduces"]) == "reproduces"
    assert combine(["reproduces", "inconclusive"]) == "inconclusive"
    assert combine(["reproduces", "contradicts", "inconclusive"]) == "contradicts"
    assert combine([]) == "inconclusive"


def test_ordering_needs_every_adjacent_pair():
    three = arms(A=[0.95, 0.96, 0.94], B=[0.85, 0.86, 0.84], C=[0.70, 0.71, 0.72])
    assert verdict("ordering", three, ["A", "B", "C"], higher_is_better=True).verdict == "reproduces"
    assert verdict("ordering", three, ["A", "C", "B"], higher_is_better=True).verdict == "contradicts"
    tie = arms(A=[0.95, 0.96, 0.94], B=[0.85, 0.86, 0.84], C=[0.84, 0.86, 0.85])
    v = verdict("ordering", tie, ["A", "B", "C"], higher_is_better=True)
    assert v.verdict == "inconclusive" and [e.a for e in v.effects] == ["A", "B"]


def test_bad_input_is_one_line():
    with pytest.raises(DitlabError, match="uncertainty of this arm is unknown"):
        arm_stats([0.5])
    with pytest.raises(DitlabError, match="finite"):
        arm_stats([0.5, float("nan")])
    with pytest.raises(DitlabError, match="2 seeds got 3 models"):
        arm_stats([0.5, 0.6], models=["a", "b", "c"])
    with pytest.raises(DitlabError, match="2 seeds got 1 sampling variances"):
        arm_stats([0.5, 0.6], [0.01])
    good = arms(A=[1.0, 2.0], B=[1.0, 2.0])
    with pytest.raises(DitlabError, match="unknown claim"):
        verdict("worse", good, ["A", "B"], higher_is_better=True)
    with pytest.raises(DitlabError, match="without results: C"):
        verdict("better", good, ["A", "C"], higher_is_better=True)
    with pytest.raises(DitlabError, match="margin"):
        verdict("equivalent", good, ["A", "B"], higher_is_better=True)
