"""`ditlab eval` wiring on feature sets whose metrics are known in closed form.

Identical samples and reference give FID 0 and precision = recall = 1 however the metrics are
wired (samples against themselves, the reference against itself, precision and recall swapped).
Here every image carries an index in its first pixel, and a fake feature extractor (standing in
for the Inception network, or for the MNIST evaluator CNN) returns the feature vector stored for
that index. So the features of each file are chosen by the test:

- FID / sFID: two Gaussian sets whose empirical mean and covariance are exactly the chosen
  (mu, diag(var)) (whitened, then scaled); for commuting covariances the Frechet distance is
  |mu1 - mu2|^2 + sum_i (sqrt(var1_i) - sqrt(var2_i))^2.
- precision / recall: two far-apart clusters A and B. Samples that are copies of the reference's
  A points lie inside the reference manifold (precision 1) but cover only its A half (recall 1/2);
  samples A + B against a reference A give precision 1/2 and recall 1. The test checks that the
  clusters are far apart compared with every k-NN radius, so these values are exact.
- Inception Score: one-hot logits over 3 classes, each split holding equally many of each: IS = 3.

Tolerance of the Inception path: features pass through float32 (relative error u), which moves
each mean by u M and each covariance entry by about 4 u M^2 (M the largest |feature|); the FID
sums O(D^2) such terms, each with a coefficient of order 1 for these well-conditioned
covariances, so it moves by at most 32 D^2 u M^2. The classifier path stays in float64.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch
from torch import nn

from ditlab.cli import main

U32 = float(np.finfo(np.float32).eps) / 2


def exact_gaussian(n: int, mu, var, seed: int) -> np.ndarray:
    """n points in len(mu) dims whose sample mean is mu and sample covariance diag(var), exactly."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
    return np.asarray(mu) + z * np.sqrt(var)


def frechet_diagonal(mu1, var1, mu2, var2) -> float:
    mu1, var1, mu2, var2 = map(np.asarray, (mu1, var1, mu2, var2))
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum())


def clusters(seed: int = 0, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Two clusters of n 2-D points, 60 apart."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 2))
    b = rng.standard_normal((n, 2)) + [60.0, 0.0]
    return a, b


def assert_far_apart(a: np.ndarray, b: np.ndarray, k: int = 3) -> None:
    """Every point's k-NN radius (within its own set, or A + B) is below the A-B gap."""
    gap = scipy.spatial.distance.cdist(a, b).min()
    for s in (a, b, np.concatenate([a, b])):
        d = np.sort(scipy.spatial.distance.cdist(s, s), axis=1)
        assert d[:, k].max() < gap / 2


def index_images(indices, size: int = 8, channels: int = 3) -> np.ndarray:
    """uint8 [N, size, size, channels] images whose first pixel spells the index (high, low byte)."""
    indices = np.asarray(indices)
    img = np.zeros((len(indices), size, size, channels), np.uint8)
    flat = img.reshape(len(indices), -1)
    flat[:, 0], flat[:, 1] = indices // 256, indices % 256  # channels 0 and 1 (RGB) or pixels 0 and 1 (grey)
    return img


class TableInception(nn.Module):
    """The Inception stand-in: looks up the features stored for the index in each image."""

    def __init__(self, pool3: np.ndarray, spatial: np.ndarray, logits: np.ndarray):
        super().__init__()
        self.register_buffer("pool3", torch.as_tensor(pool3))
        self.register_buffer("spatial", torch.as_tensor(spatial))
        self.register_buffer("logits", torch.as_tensor(logits))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # x: [B, 3, H, W] in [0, 1]
        levels = torch.round(x[:, :2, 0, 0] * 255).long()
        i = levels[:, 0] * 256 + levels[:, 1]
        return {"pool3": self.pool3[i], "spatial": self.spatial[i], "logits": self.logits[i]}


# Sample set S (indices 0..59) and reference set R (60..139) for FID, sFID and IS.
N_S, N_R = 60, 80
MU_S, VAR_S = [0.0, 1.0, -1.0, 2.0], [1.0, 2.0, 0.5, 3.0]
MU_R, VAR_R = [1.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.5, 1.0]
SMU_S, SVAR_S = [0.5, 0.0, 0.0], [1.0, 4.0, 1.0]
SMU_R, SVAR_R = [0.0, 0.0, 3.0], [1.0, 1.0, 2.0]


@pytest.fixture
def inception_files(tmp_path, monkeypatch):
    import ditlab.commands.eval as eval_command

    pool3 = np.concatenate([exact_gaussian(N_S, MU_S, VAR_S, 1), exact_gaussian(N_R, MU_R, VAR_R, 2)])
    spatial = np.concatenate([exact_gaussian(N_S, SMU_S, SVAR_S, 3), exact_gaussian(N_R, SMU_R, SVAR_R, 4)])
    logits = np.zeros((N_S + N_R, 1008))
    logits[np.arange(N_S + N_R), np.arange(N_S + N_R) % 3] = 30.0  # one-hot-like over classes 0, 1, 2
    a, b = clusters()
    assert_far_apart(a, b)
    # P/R sets live in a second table block (indices 140..179: A then B), padded to 4 dims.
    pr = np.concatenate([a, b])
    pr4 = np.concatenate([pr, np.zeros((len(pr), 2))], axis=1)
    pool3 = np.concatenate([pool3, pr4])
    spatial = np.concatenate([spatial, np.zeros((len(pr), 3))])
    logits = np.concatenate([logits, np.zeros((len(pr), 1008))])
    fake = TableInception(pool3, spatial, logits)
    monkeypatch.setattr(eval_command, "load_inception", lambda path: fake.eval())
    start = N_S + N_R
    files = {
        "samples": np.arange(N_S), "ref": np.arange(N_S, N_S + N_R),
        "A": np.arange(start, start + len(a)), "AB": np.arange(start, start + len(pr)),
    }
    paths = {}
    for name, idx in files.items():
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], arr_0=index_images(idx))
    scale = max(np.abs(pool3).max(), np.abs(spatial).max())
    return paths, scale


def _eval(tmp_path, *args) -> dict:
    out = tmp_path / "metrics.json"
    assert main(["eval", "--inception", "fake.pth", "--no-progress", "--out", str(out), *map(str, args)]) == 0
    return json.loads(out.read_text())["metrics"]


def test_fid_sfid_and_is_against_closed_forms(inception_files, tmp_path):
    paths, scale = inception_files
    m = _eval(tmp_path, "--samples", paths["samples"], "--ref", paths["ref"], "--metrics", "fid,sfid,is")
    fid = frechet_diagonal(MU_S, VAR_S, MU_R, VAR_R)
    sfid = frechet_diagonal(SMU_S, SVAR_S, SMU_R, SVAR_R)
    assert fid > 5 and sfid > 5 and abs(fid - sfid) > 1  # far from 0 and from each other
    assert m["fid"] == pytest.approx(fid, abs=32 * 4**2 * U32 * scale**2)
    assert m["sfid"] == pytest.approx(sfid, abs=32 * 3**2 * U32 * scale**2)
    assert m["is"] == pytest.approx(3.0, rel=1e-9) and m["is_std"] == pytest.approx(0.0, abs=1e-9)


def test_saved_reference_statistics_give_the_same_fid(inception_files, tmp_path):
    paths, scale = inception_files
    stats = tmp_path / "ref_stats.npz"
    assert main(["eval", "--samples", str(paths["ref"]), "--inception", "fake.pth", "--save-ref", str(stats),
                 "--no-progress"]) == 0
    with np.load(stats) as f:
        np.testing.assert_allclose(f["mu"], MU_R, atol=8 * U32 * scale)
        np.testing.assert_allclose(f["sigma"], np.diag(VAR_R), atol=8 * U32 * scale**2)
        np.testing.assert_allclose(f["mu_s"], SMU_R, atol=8 * U32 * scale)
    m = _eval(tmp_path, "--samples", paths["samples"], "--ref", stats, "--metrics", "fid,sfid")
    assert m["fid"] == pytest.approx(frechet_diagonal(MU_S, VAR_S, MU_R, VAR_R), abs=32 * 16 * U32 * scale**2)
    assert m["sfid"] == pytest.approx(frechet_diagonal(SMU_S, SVAR_S, SMU_R, SVAR_R), abs=32 * 9 * U32 * scale**2)


def test_precision_and_recall_are_not_interchangeable(inception_files, tmp_path):
    paths, _ = inception_files
    # Samples cover only half of the reference: all of them are realistic, half the reference is missed.
    m = _eval(tmp_path, "--samples", paths["A"], "--ref", paths["AB"], "--metrics", "pr")
    assert (m["precision"], m["recall"]) == (1.0, 0.5)
    # Samples spill outside the reference: half are unrealistic, the whole reference is covered.
    m = _eval(tmp_path, "--samples", paths["AB"], "--ref", paths["A"], "--metrics", "pr")
    assert (m["precision"], m["recall"]) == (0.5, 1.0)


class TableClassifier:
    """The MNIST-evaluator stand-in: (logits, features) stored per image index, in float64."""

    def __init__(self, logits: np.ndarray, feats: np.ndarray):
        self.logits, self.feats = torch.as_tensor(logits), torch.as_tensor(feats)

    def outputs(self, model, images, batch_size: int = 500):
        flat = np.asarray(images).reshape(len(images), -1).astype(np.int64)
        i = torch.as_tensor(flat[:, 0] * 256 + flat[:, 1])
        return self.logits[i], self.feats[i]


def test_classifier_metrics_wiring(tmp_path, monkeypatch):
    import ditlab.eval.metrics as M

    # Test set (indices 0..39) = the clusters A + B; the training set is the same 40 images, so the
    # floor (real training images against the test set) is FID 0, precision = recall = 1.
    # Samples (40..79) = the A points twice: precision 1, recall 1/2, FID between known sets.
    a, b = clusters(seed=5)
    assert_far_apart(a, b)
    test_feats = np.concatenate([a, b])
    sample_feats = np.concatenate([a, a])
    feats = np.concatenate([test_feats, sample_feats])
    logits = np.zeros((80, 10))
    logits[np.arange(80), np.arange(80) % 10] = 5.0  # image i is classified as i % 10
    table = TableClassifier(logits, feats)
    test_images = index_images(np.arange(40), size=28, channels=1)[..., 0]
    monkeypatch.setattr(M, "load_classifier", lambda dataset, path=None: nn.Identity())
    monkeypatch.setattr(M, "classifier_outputs", table.outputs)
    monkeypatch.setattr(M, "load_split", lambda root, split: (test_images, np.arange(40) % 10))
    labels = np.arange(40, 80) % 10
    labels[30:] = (labels[30:] + 1) % 10  # the last 10 samples carry a label they are not classified as
    np.savez(tmp_path / "s.npz", arr_0=index_images(np.arange(40, 80), size=28, channels=1), labels=labels)
    out = tmp_path / "m.json"
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--dataset", "mnist", "--data", str(tmp_path),
                 "--metrics", "class_acc,counts,cls_fid,cls_pr", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    m, floor = res["metrics"], res["floor"]
    assert m["class_acc"] == 0.75
    assert [m[f"count_{c}"] for c in range(10)] == [4] * 10
    # FID against an independent formula: scipy's matrix square root of the float64 statistics.
    s1, s2 = np.cov(sample_feats, rowvar=False), np.cov(test_feats, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = sample_feats.mean(0) - test_feats.mean(0)
    expected = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert expected > 100
    assert m["cls_fid"] == pytest.approx(expected, rel=1e-9)
    assert (m["cls_precision"], m["cls_recall"]) == (1.0, 0.5)
    assert floor["cls_fid"] == pytest.approx(0.0, abs=1e-9 * expected)
    assert (floor["cls_precision"], floor["cls_recall"]) == (1.0, 1.0)
