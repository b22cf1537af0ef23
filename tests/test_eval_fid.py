"""FID / IS / precision-recall against closed forms, scipy and torchmetrics."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ditlab.errors import DitlabError
from ditlab.eval.fid import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    precision_recall,
    read_reference,
    save_stats,
)


def test_frechet_closed_form_diagonal():
    # Diagonal Gaussians: FID = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)


def test_frechet_matches_scipy_sqrtm_full_covariance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = x @ x.T + 0.1 * np.eye(8), y @ y.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_robust_when_singular():
    # Fewer samples than dimensions: rank-deficient covariances, where sqrtm is unreliable.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 64))
    d = fid_from_features(a, a.copy())
    assert abs(d) < 1e-4  # vs a trace of ~65; scipy's sqrtm leaves a complex residue here
    assert np.isfinite(fid_from_features(a, rng.normal(size=(10, 64)) + 1))


def test_fid_matches_torchmetrics_with_same_features():
    torchmetrics_image = pytest.importorskip("torchmetrics.image.fid")
    torch.manual_seed(0)
    proj = torch.nn.Linear(3 * 8 * 8, 32)

    class Feat(torch.nn.Module):  # torchmetrics accepts any feature extractor module
        num_features = 32

        def forward(self, x):
            return proj(x.float().flatten(1))

    real = torch.rand(200, 3, 8, 8)
    fake = torch.rand(200, 3, 8, 8) ** 2
    tm = torchmetrics_image.FrechetInceptionDistance(feature=Feat())
    tm.update(real, real=True)
    tm.update(fake, real=False)
    with torch.no_grad():
        ours = fid_from_features(proj(real.flatten(1)), proj(fake.flatten(1)))
    assert ours == pytest.approx(tm.compute().item(), rel=1e-4)


def test_feature_stats_errors():
    with pytest.raises(DitlabError, match="at least 2"):
        feature_stats(np.zeros((1, 4)))
    with pytest.raises(DitlabError, match="NaN"):
        feature_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_inception_score_known_values():
    # Confident, evenly spread predictions over C classes give IS = C; identical ones give 1.
    c, n = 5, 100
    logits = torch.full((n, 1008), -50.0)
    logits[torch.arange(n), torch.arange(n) % c] = 50.0
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(c, rel=1e-6) and std < 1e-6
    assert inception_score(torch.zeros(20, 1008))[0] == pytest.approx(1.0)


def test_precision_recall_hand_computed_1d():
    # Real {0..4}, k=3: radii 3,2,2,2,3 -> real manifold [-3, 7]; -3 sits on the boundary.
    real = np.arange(5.0)[:, None]
    fake = np.array([-5, -3, 0, 6.5, 7.5, 100.0])[:, None]
    p, r = precision_recall(real, fake, k=3)
    assert p == pytest.approx(3 / 6)
    assert r == pytest.approx(1.0)  # the outlier at 100 gets a huge ball: the known weakness


def test_precision_recall_mode_dropping():
    # Generator covers only one of two far-apart real clusters: precision 1, recall 1/2.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    real = np.concatenate([a, a + 100])
    fake = a + 0.01 * rng.normal(size=a.shape)
    p, r = precision_recall(real, fake, k=3)
    assert p == 1.0 and r == pytest.approx(0.5)
    with pytest.raises(DitlabError, match="more than 3"):
        precision_recall(real, fake[:3])


def test_reference_roundtrip(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)
    save_stats(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    ref = read_reference(tmp_path / "ref.npz")
    assert np.array_equal(ref["sigma"], sigma)
    np.savez(tmp_path / "bad.npz", x=np.zeros(2))
    with pytest.raises(DitlabError, match="neither"):
        read_reference(tmp_path / "bad.npz")


@pytest.mark.parametrize("n", [50, 5])  # more samples than dimensions (d x d route), fewer (n x n Gram route)
def test_frechet_reference_equals_the_sqrtm_formula(n):
    """Distances to a fixed reference equal |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2),
    with scipy's sqrtm as the independent reference."""
    from ditlab.eval.fid import FrechetReference, feature_stats

    rng = np.random.default_rng(0)
    d = 12
    ref = rng.normal(size=(60, d)) @ rng.normal(size=(d, d))
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
    mu2, s2 = feature_stats(ref)
    mu1, s1 = feature_stats(feats)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    got = FrechetReference(mu2, s2).distance(feats)
    # float64 throughout; sqrtm of a singular product (n < d) is accurate to about sqrt(eps) of its scale
    eps = np.finfo(np.float64).eps
    tol = 1e-9 * abs(expected) if n > d else d * np.sqrt(eps * np.linalg.norm(s1 @ s2, 2))
    assert got == pytest.approx(expected, abs=tol)
    assert FrechetReference(mu1, s1).distance(feats) == pytest.approx(0.0, abs=d * np.sqrt(eps * np.linalg.norm(s1, 2) ** 2))
