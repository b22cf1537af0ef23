"""Sample-quality statistics on feature vectors: FID/sFID, Inception Score, precision/recall.

Everything here works on plain feature arrays, so the same code serves Inception pool3
features (FID), Inception spatial features (sFID) and the MNIST classifier's features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditlab.errors import DitlabError


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D,D] (float64) of features [N,D]."""
    f = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2:
        raise DitlabError(f"features must be [N, D], got shape {f.shape}")
    if len(f) < 2:
        raise DitlabError(f"need at least 2 samples for a covariance, got {len(f)}")
    if not np.isfinite(f).all():
        raise DitlabError("features contain NaN or Inf (check the images for NaNs)")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed from eigenvalues: S1 S2 is similar to the symmetric PSD
    matrix A = S1^(1/2) S2 S1^(1/2), so its square root's trace is sum(sqrt(eig(A))). This
    avoids scipy.linalg.sqrtm's complex round-off and its failure on singular covariances
    (fewer samples than dimensions); tiny negative eigenvalues from round-off are clipped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise DitlabError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    for a in (mu1, mu2, s1, s2):
        if not np.isfinite(a).all():
            raise DitlabError("feature statistics contain NaN or Inf")
    return FrechetReference(mu1, s1).distance_to_stats(mu2, s2)


class FrechetReference:
    """Fréchet distances of many feature sets to one fixed reference N(mu, sigma), e.g. the bootstrap
    resamples of one sample set. The reference's square root R = sigma^(1/2) is computed once; then
    tr((S1 sigma)^(1/2)) = sum(sqrt(eig(R S1 R))), and with fewer samples n than dimensions d the
    nonzero eigenvalues of R S1 R = Y^T Y (Y = centred features @ R / sqrt(n - 1)) are those of the
    n x n matrix Y Y^T: exact, and far cheaper than the d x d route for 2048-d Inception features."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.atleast_1d(np.asarray(mu, np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, np.float64))
        if sigma.shape != (len(self.mu), len(self.mu)) or not (np.isfinite(self.mu).all() and np.isfinite(sigma).all()):
            raise DitlabError(f"reference statistics are not finite or do not match: mu {self.mu.shape}, sigma {sigma.shape}")
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.trace = float(np.trace(sigma))

    def distance(self, features: np.ndarray | torch.Tensor) -> float:
        f = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.mu) or len(f) < 2:
            raise DitlabError(f"features must be [N >= 2, {len(self.mu)}], got shape {f.shape}")
        if not np.isfinite(f).all():
            raise DitlabError("features contain NaN or Inf (check the images for NaNs)")
        mu1 = f.mean(0)
        y = (f - mu1) / np.sqrt(len(f) - 1)  # S1 = y^T y
        if len(f) >= f.shape[1]:
            return self.distance_to_stats(mu1, y.T @ y)
        z = y @ self.root
        return self._combine(mu1, float((y * y).sum()), np.linalg.eigvalsh(z @ z.T))

    def distance_to_stats(self, mu1: np.ndarray, sigma1: np.ndarray) -> float:
        """The distance to N(mu1, sigma1), by the d x d route."""
        a = self.root @ sigma1 @ self.root
        return self._combine(mu1, float(np.trace(sigma1)), np.linalg.eigvalsh((a + a.T) / 2))

    def _combine(self, mu1: np.ndarray, trace1: float, eig: np.ndarray) -> float:
        """|mu1 - mu|^2 + tr S1 + tr sigma - 2 sum(sqrt(eig)); tiny negative eigenvalues from round-off are clipped."""
        diff = mu1 - self.mu
        return float(diff @ diff + trace1 + self.trace - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over
    `splits` equal parts, p(y) estimated within each part (as in the original TF code)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if len(logits) < splits:
        raise DitlabError(f"Inception Score needs at least {splits} samples, got {len(logits)}")
    p = torch.softmax(logits, dim=1)
    scores = []
    for part in torch.tensor_split(p, splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(py.clamp_min(1e-30)))).sum(1)
        scores.append(torch.exp(kl.mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in x, itself excluded."""
    if len(x) <= k:
        raise DitlabError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(x)}")
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the smallest (0) is the point itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], centres)
        inside.append((d <= radii[None, :]).any(1))
    return torch.cat(inside).float().mean().item()


def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: fraction of generated samples inside the real manifold (the union of balls
    around each real feature reaching its k-th nearest real neighbour); recall: the converse.
    """
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DitlabError(f"precision/recall needs [N,D] features of equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise DitlabError("features contain NaN or Inf")
    precision = _coverage(fake, real, _kth_neighbour_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _kth_neighbour_radii(fake, k, chunk), chunk)
    return precision, recall


# ----------------------------------------------------------------------------- reference files


def save_stats(path: str | Path, **stats: np.ndarray) -> None:
    """Write reference statistics (mu, sigma[, mu_s, sigma_s]) as .npz."""
    np.savez(path, **{k: np.asarray(v) for k, v in stats.items()})


def read_reference(path: str | Path) -> dict[str, np.ndarray]:
    """Read a reference .npz: stored statistics (mu, sigma, and ADM's mu_s, sigma_s for sFID)
    and/or reference images (`arr_0`, as in ADM's reference batches)."""
    path = Path(path)
    if not path.exists():
        raise DitlabError(f"reference file {path} not found")
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise DitlabError(f"cannot read reference {path} as .npz ({type(e).__name__})") from None
    if not ({"mu", "sigma"} <= data.keys() or "arr_0" in data):
        raise DitlabError(f"{path} has neither mu/sigma statistics nor arr_0 images (keys: {sorted(data)})")
    return data
