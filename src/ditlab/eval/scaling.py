"""Power-law fits y = a * x^b (FID or loss vs Gflops or training compute), as in DiT's Figure 8/9.

    ditlab scaling --csv runs.csv --x gflops --y fid --out plot.png [--group model]   (ditlab.commands.scaling)

The fit is linear least squares in log-log space (log y = log a + b log x), which weights the
relative errors of every point alike; R^2 is reported in log space, where the fit is made.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ditlab.errors import DitlabError


@dataclass
class PowerLaw:
    a: float  # prefactor
    b: float  # exponent
    r2: float  # coefficient of determination of the log-log fit
    n: int  # number of points
    b_stderr: float  # standard error of the exponent

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(x, dtype=np.float64) ** self.b


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares fit of log y = log a + b log x (x, y > 0, at least 2 distinct x)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise DitlabError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DitlabError("power-law fit: x or y contains NaN or Inf")
    if (x <= 0).any() or (y <= 0).any():
        raise DitlabError("power-law fit needs positive x and y (it is a fit in log space)")
    if len(np.unique(x)) < 2:
        raise DitlabError(f"power-law fit needs at least 2 distinct x values, got {len(np.unique(x))}")
    r = stats.linregress(np.log(x), np.log(y))
    stderr = float(r.stderr) if len(x) > 2 else float("nan")
    return PowerLaw(a=float(np.exp(r.intercept)), b=float(r.slope), r2=float(r.rvalue**2), n=len(x), b_stderr=stderr)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, (x, y) in data.items():
        line = ax.plot(x, y, "o", label=None)[0]
        if name in fits:
            f = fits[name]
            xs = np.geomspace(x.min(), x.max(), 50)
            ax.plot(xs, f(xs), "-", color=line.get_color(),
                    label=f"{name}: {f.a:.3g}·x^{f.b:.3f} (R²={f.r2:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
