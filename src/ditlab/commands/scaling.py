"""`ditlab scaling`: fit and plot power laws y = a * x^b from a CSV of runs (DiT Fig. 8/9)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ditlab.errors import DitlabError
from ditlab.eval.scaling import fit_power_law, plot_fits, read_csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="CSV with a header row, one run per row")
    parser.add_argument("--x", default="gflops", help="x column (e.g. gflops, train_compute)")
    parser.add_argument("--y", default="fid", help="y column (e.g. fid, loss)")
    parser.add_argument("--group", default=None, help="fit one power law per value of this column")
    parser.add_argument("--out", default=None, help="PNG plot path")
    parser.add_argument("--json", default=None, help="write the fits as JSON here")


def run(args: argparse.Namespace) -> int:
    data = read_csv(args.csv, args.x, args.y, args.group)
    fits = {name: fit_power_law(x, y) for name, (x, y) in data.items() if len(np.unique(x)) >= 2}
    if not fits:
        raise DitlabError(f"no group has 2 distinct {args.x} values to fit")
    print(f"fit: {args.y} = a * {args.x}^b (least squares in log-log space)")
    print(f"{'group':<16} {'n':>3} {'a':>10} {'b':>9} {'±b':>7} {'R^2':>6}")
    for name, f in fits.items():
        print(f"{name:<16} {f.n:>3} {f.a:>10.4g} {f.b:>9.4f} {f.b_stderr:>7.4f} {f.r2:>6.3f}")
    if args.out:
        plot_fits(data, fits, args.out, args.x, args.y)
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: asdict(v) for k, v in fits.items()}, indent=2))
    return 0
