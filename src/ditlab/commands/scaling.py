"""`ditlab scaling`: fit and plot power laws y = a * x^b from a CSV of runs (DiT Fig. 8/9), with a
bootstrap 95% confidence interval of each exponent."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ditlab.errors import DitlabError
from ditlab.eval.scaling import MIN_DISTINCT_X, fit_power_law, plot_fits, read_csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="CSV with a header row, one run per row")
    parser.add_argument("--x", default="gflops", help="x column (e.g. gflops, train_compute)")
    parser.add_argument("--y", default="fid", help="y column (e.g. fid, loss)")
    parser.add_argument("--group", default=None, help="fit one power law per value of this column")
    parser.add_argument("--out", default=None, help="PNG plot path")
    parser.add_argument("--json", default=None, help="write the fits as JSON here")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the exponent's CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run(args: argparse.Namespace) -> int:
    data = read_csv(args.csv, args.x, args.y, args.group)
    if args.resamples < 1:
        raise DitlabError(f"--resamples must be >= 1, got {args.resamples}")
    fits = {name: fit_power_law(x, y, resamples=args.resamples, seed=args.seed)
            for name, (x, y) in data.items() if len(np.unique(x)) >= MIN_DISTINCT_X}
    if not fits:
        raise DitlabError(f"no group has {MIN_DISTINCT_X} distinct {args.x} values to fit a power law "
                          f"(got {max(len(np.unique(x)) for x, _ in data.values())})")
    print(f"fit: {args.y} = a * {args.x}^b (least squares in log-log space; b's 95% CI: bootstrap, "
          f"{args.resamples} resamples, seed {args.seed})")
    print(f"{'group':<16} {'n':>3} {'a':>10} {'b':>9} {'95% CI of b':>21} {'±b':>7} {'r':>7} {'R^2':>6}")
    for name, f in fits.items():
        interval = f"[{f.b_lo:.4f}, {f.b_hi:.4f}]"
        print(f"{name:<16} {f.n:>3} {f.a:>10.4g} {f.b:>9.4f} {interval:>21} {f.b_stderr:>7.4f} {f.r:>7.3f} {f.r2:>6.3f}")
    for name, (x, _) in data.items():
        if name not in fits:
            print(f"{name:<16} skipped: {len(np.unique(x))} distinct {args.x} values (a fit needs {MIN_DISTINCT_X})")
    if args.out:
        plot_fits(data, fits, args.out, args.x, args.y)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: asdict(v) for k, v in fits.items()}, indent=2))
    return 0
