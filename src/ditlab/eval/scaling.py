"""Power-law fits y = a * x^b (FID or loss vs Gflops or training compute), as in DiT's Figure 8/9.

    ditlab scaling --csv runs.csv --x gflops --y fid --out plot.png [--group model]   (ditlab.commands.scaling)

The fit is linear least squares in log-log space (log y = log a + b log x), which weights the
relative errors of every point alike; R^2 and Pearson's r are reported in log space, where the fit
is made. The exponent's 95% confidence interval is a percentile bootstrap: the points (or, with
`groups`, whole groups of points such as the seeds of one grid point) are resampled with
replacement from a fixed seed, and resamples with fewer than 2 distinct x are skipped. A fit needs
at least 3 distinct x values: through 2 points a line always fits exactly and says nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ditlab.errors import DitlabError
from ditlab.io import figure, save_figure


@dataclass
class PowerLaw:
    a: float  # prefactor
    b: float  # exponent
    r2: float  # coefficient of determination of the log-log fit
    n: int  # number of points
    b_stderr: float  # standard error of the exponent (least-squares formula)
    r: float = float("nan")  # Pearson correlation of log x and log y
    b_lo: float = float("nan")  # bootstrap confidence interval of the exponent ...
    b_hi: float = float("nan")
    ci: float = 0.95  # ... at this level
    resamples: int = 0  # bootstrap resamples used (degenerate ones skipped)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(x, dtype=np.float64) ** self.b


MIN_DISTINCT_X = 3


def _check(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise DitlabError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DitlabError("power-law fit: x or y contains NaN or Inf")
    if (x <= 0).any() or (y <= 0).any():
        raise DitlabError("power-law fit needs positive x and y (it is a fit in log space)")
    distinct = len(np.unique(x))
    if distinct < MIN_DISTINCT_X:
        raise DitlabError(f"power-law fit needs at least {MIN_DISTINCT_X} distinct x values, got {distinct} "
                          f"({len(x)} points)")
    return x, y


def _slopes(lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Least-squares slopes of each row of lx, ly ([resamples, n]); NaN where x has one value.

    The slope is sum(dx * ly) / sum(dx^2) with dx = lx - mean(lx): as sum(dx) = 0, centring ly
    as well would change nothing."""
    dx = lx - lx.mean(axis=1, keepdims=True)
    ok = np.ptp(lx, axis=1) > 0
    slopes = np.full(len(lx), np.nan)
    slopes[ok] = (dx[ok] * ly[ok]).sum(axis=1) / (dx[ok] * dx[ok]).sum(axis=1)
    return slopes


def bootstrap_exponent(x, y, *, groups=None, resamples: int = 2000, seed: int = 0,
                       ci: float = 0.95) -> tuple[float, float, int]:
    """(low, high, resamples used): the percentile bootstrap CI of the log-log slope.

    Without `groups` the points are resampled with replacement; with `groups` (one label per
    point) whole groups are, so that e.g. the seeds of one grid point stay together. Resamples
    with fewer than 2 distinct x are skipped; without any left (or with resamples=0) the interval
    is (NaN, NaN).
    """
    if resamples < 0 or not 0 < ci < 1:
        raise DitlabError(f"bootstrap needs resamples >= 0 and a level ci in (0, 1), got {resamples} and {ci}")
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, len(lx), size=(resamples, len(lx)))
        slopes = _slopes(lx[idx], ly[idx])
    else:
        labels = np.asarray(groups)
        if labels.shape != lx.shape:
            raise DitlabError(f"groups must have one label per point, got {labels.shape} for {lx.shape[0]} points")
        members = [np.flatnonzero(labels == g) for g in np.unique(labels)]
        slopes = np.full(resamples, np.nan)
        for i, pick in enumerate(rng.integers(0, len(members), size=(resamples, len(members)))):
            idx = np.concatenate([members[j] for j in pick])
            slopes[i] = _slopes(lx[idx][None], ly[idx][None])[0]
    slopes = slopes[np.isfinite(slopes)]
    if not len(slopes):
        return float("nan"), float("nan"), 0
    tail = (1 - ci) / 2 * 100
    lo, hi = np.percentile(slopes, [tail, 100 - tail])
    return float(lo), float(hi), len(slopes)


def fit_power_law(x, y, *, groups=None, resamples: int = 2000, seed: int = 0, ci: float = 0.95) -> PowerLaw:
    """Least-squares fit of log y = log a + b log x (x, y > 0, at least 3 distinct x), with a
    bootstrap CI of b (`bootstrap_exponent`; `resamples=0` skips it) and Pearson's r."""
    x, y = _check(x, y)
    r = stats.linregress(np.log(x), np.log(y))
    lo, hi, used = bootstrap_exponent(x, y, groups=groups, resamples=resamples, seed=seed, ci=ci)
    return PowerLaw(a=float(np.exp(r.intercept)), b=float(r.slope), r2=float(r.rvalue**2), n=len(x),
                    b_stderr=float(r.stderr), r=float(r.rvalue), b_lo=lo, b_hi=hi, ci=ci, resamples=used)


def fit_grouped(x, y, groups, **kwargs) -> PowerLaw:
    """`fit_power_law` of repeated measurements (e.g. several seeds per grid point, `groups` naming
    each point's grid point): the fit uses every point, the bootstrap resamples whole groups."""
    return fit_power_law(x, y, groups=groups, **kwargs)


def read_csv(path: str | Path, x: str, y: str, group: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{group value (or 'all'): (x values, y values)} from a CSV with a header row."""
    path = Path(path)
    if not path.exists():
        raise DitlabError(f"CSV file {path} not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DitlabError(f"{path} has no data rows")
    for col in (x, y) + ((group,) if group else ()):
        if col not in rows[0]:
            raise DitlabError(f"{path} has no column '{col}' (columns: {', '.join(rows[0])})")
    groups: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows, start=2):
        try:
            point = (float(row[x]), float(row[y]))
        except (TypeError, ValueError):
            raise DitlabError(f"{path} line {i}: non-numeric {x}={row[x]!r} or {y}={row[y]!r}") from None
        groups.setdefault(row[group] if group else "all", []).append(point)
    return {k: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for k, v in groups.items()}


def plot_fits(data: dict[str, tuple[np.ndarray, np.ndarray]], fits: dict[str, PowerLaw], out: str | Path,
              xlabel: str, ylabel: str) -> None:
    """Log-log scatter of each group with its fitted line, written as PNG."""
    with figure(figsize=(5, 4)) as (fig, ax):
        for name, (x, y) in data.items():
            line = ax.plot(x, y, "o", label=None)[0]
            if name in fits:
                f = fits[name]
                xs = np.geomspace(x.min(), x.max(), 50)
                ax.plot(xs, f(xs), "-", color=line.get_color(),
                        label=f"{name}: {f.a:.3g}·x^{f.b:.3f} (R²={f.r2:.3f})")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, out, dpi=120)
