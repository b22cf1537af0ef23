"""eval/fid.py on the inputs it meets in practice: float32 features and statistics (Inception
features are float32; reference files may be), edge sizes, and malformed input.

Float64 matters where the FID cancels: tr S1 + tr S2 - 2 tr sqrt(S1 S2) of identical statistics
is 0, and computed in float64 it is 0 up to a few float64 ulps of the traces; in float32 the
same cancellation leaves an error of float32 ulps of the traces, 2^29 times larger. The bound
used, 64 D eps64 (tr S1 + tr S2), allows 64 D rounded operations of that size (eigen-solver and
matrix products over D dimensions).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditlab.errors import DitlabError
from ditlab.eval.fid import feature_stats, fid_from_features, frechet_distance, inception_score, precision_recall

EPS64 = float(np.finfo(np.float64).eps)


def spread_features(n: int = 400, d: int = 32, seed: int = 0) -> np.ndarray:
    """float32 features with a large offset and eigenvalues from 1 to 1e4 (Inception-like scales)."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, 2, d)
    return (300.0 + rng.standard_normal((n, d)) * scales).astype(np.float32)


def f64_bound(*sigmas: np.ndarray) -> float:
    d = sigmas[0].shape[0]
    return 64 * d * EPS64 * sum(float(np.trace(np.asarray(s, np.float64))) for s in sigmas)


def test_float32_features_are_reduced_in_float64():
    a = spread_features()
    mu, sigma = feature_stats(a)
    assert mu.dtype == sigma.dtype == np.float64
    ref = np.asarray(a, np.float64)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-12, atol=1e-12 * float(np.abs(sigma).max()))
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-14)
    same = fid_from_features(a, a.copy())
    assert abs(same) <= f64_bound(sigma, sigma)
    # Torch tensors take the same path.
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(a.copy())) == same


def test_float32_statistics_are_compared_in_float64():
    mu, sigma = feature_stats(spread_features(seed=1))
    mu32, sigma32 = mu.astype(np.float32), sigma.astype(np.float32)
    # Identical statistics, each side given in float32: the distance is 0 to float64 precision.
    assert abs(frechet_distance(mu32, sigma32, mu32, sigma32)) <= f64_bound(sigma32, sigma32)
    assert abs(frechet_distance(mu32, sigma32, mu32.astype(np.float64), sigma32.astype(np.float64))) <= f64_bound(sigma32, sigma32)
    assert abs(frechet_distance(mu32.astype(np.float64), sigma32.astype(np.float64), mu32, sigma32)) <= f64_bound(sigma32, sigma32)


def test_statistics_that_do_not_match_are_refused():
    mu, sigma = np.zeros(3), np.eye(3)
    for args in [(mu, sigma, np.zeros(4), np.eye(3)),  # only the means differ in size
                 (mu, sigma, mu, np.eye(4)),  # only the covariances differ
                 (mu, np.eye(4), mu, np.eye(4))]:  # the covariances do not fit the means
        with pytest.raises(DitlabError, match="statistics do not match"):
            frechet_distance(*args)


def test_inception_score_closed_form_in_float64():
    # Two classes, logits [L, 0] for half the images and [0, L] for the other half, each split
    # balanced: p(y|x) = (s, 1 - s) with s = 1 / (1 + e^-L), p(y) = (1/2, 1/2), and
    # IS = exp(s log 2s + (1 - s) log 2(1 - s)). The logits come as float32 (as the Inception's).
    L, n = 3.0, 40
    logits = torch.zeros(n, 2, dtype=torch.float32)
    logits[0::2, 0] = L
    logits[1::2, 1] = L
    s = 1 / (1 + math.exp(-L))
    expected = math.exp(s * math.log(2 * s) + (1 - s) * math.log(2 * (1 - s)))
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(expected, rel=1e-13) and std <= 1e-13
    # As many images as splits: one image per split, where p(y) = p(y|x): IS = 1.
    assert inception_score(logits[:10], splits=10) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    with pytest.raises(DitlabError, match="at least 10"):
        inception_score(logits[:9], splits=10)


def test_precision_recall_refuses_malformed_features():
    good = np.zeros((5, 3))
    for real, fake in [(good, np.zeros((5, 2))), (np.zeros(5), good), (good, np.zeros(5))]:
        with pytest.raises(DitlabError, match="equal D"):
            precision_recall(real, fake)
    for real, fake in [(good, np.full((5, 3), np.nan)), (np.full((5, 3), np.inf), good)]:
        with pytest.raises(DitlabError, match="NaN or Inf"):
            precision_recall(real, fake)
