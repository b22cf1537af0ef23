"""`ditlab scaling`: fit and plot power laws y = a * x^b (DiT Fig. 8/9), with a bootstrap 95%
confidence interval of each exponent, from a CSV of runs or from a findings suite folder.

    ditlab scaling --csv runs.csv --x gflops --y fid [--group model] [--out plot.png]
    ditlab scaling --suite reports/cpu [--finding 19] [--out plot.png]

With --suite, each finding's results.json (written by `ditlab reproduce` / `ditlab report`) gives
one point per DiT arm and seed: the arm's forward Gflops (one image, the DiT paper's convention)
and its metric at the end of training; U-Net arms and unfinished seeds are left out. The
bootstrap resamples whole arms (the seeds of one grid point together). Without --finding, every
finding with at least three distinct Gflops is fitted.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ditlab.errors import DitlabError
from ditlab.eval.scaling import MIN_DISTINCT_X, fit_power_law, plot_fits, read_csv
from ditlab.io import check_writable, save_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", default=None, help="CSV with a header row, one run per row")
    parser.add_argument("--suite", default=None, help="a findings suite folder (e.g. reports/cpu) instead of --csv")
    parser.add_argument("--finding", action="append", default=None,
                        help="with --suite: the finding id to fit (repeatable; default: every finding that can be fitted)")
    parser.add_argument("--x", default=None, help="x column (e.g. gflops, train_compute; default gflops). "
                        "With --suite x is always the forward Gflops")
    parser.add_argument("--y", default="fid", help="y column (e.g. fid, loss); with --suite: fid or acc")
    parser.add_argument("--group", default=None, help="fit one power law per value of this column (--csv)")
    parser.add_argument("--out", default=None, help="PNG plot path")
    parser.add_argument("--json", default=None, help="write the fits as JSON here")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the exponent's CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DitlabError(f"cannot read {path}: {e}") from None


def read_suite(folder: str | Path, finding: str, metric: str = "fid") -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(forward Gflops, metric at the end of training, arm of each point, notes) of one finding's DiT arms."""
    out = Path(folder)
    path = out / f"finding_{finding}" / "results.json"
    if not path.is_file():
        raise DitlabError(f"{path} not found: run `ditlab reproduce {finding} --out {out}` (or `ditlab report`) first")
    summary = _read_json(path)
    x, y, arms, notes = [], [], [], []
    for arm, row in summary.get("arms", {}).items():
        for seed, s in row.get("seeds", {}).items():
            record = out / "units" / f"{s['unit']}.json"
            model = _read_json(record).get("config", {}).get("model", {}).get("name") if record.is_file() else None
            points, train = s.get("points") or {}, s.get("train") or {}
            if model == "unet":
                notes.append(f"{arm}: a U-Net, not a grid point")
                break
            end = points.get(str(summary["steps"]))
            if not end or "fwd_gflops" not in train:
                notes.append(f"{arm} seed {seed}: not finished")
                continue
            if metric not in end:
                raise DitlabError(f"{path}: arm {arm} has no metric '{metric}' (has {', '.join(sorted(end))})")
            x.append(float(train["fwd_gflops"]))
            y.append(float(end[metric]))
            arms.append(arm)
    return np.array(x), np.array(y), arms, notes


def _suite_fits(args: argparse.Namespace):
    out = Path(args.suite)
    if not out.is_dir():
        raise DitlabError(f"suite folder {out} not found")
    if args.y not in ("fid", "acc"):
        raise DitlabError(f"with --suite, --y is fid or acc, not '{args.y}'")
    ids = args.finding or sorted(p.name.removeprefix("finding_") for p in out.glob("finding_*") if (p / "results.json").is_file())
    if not ids:
        raise DitlabError(f"{out} holds no findings' results (finding_*/results.json)")
    data, fits = {}, {}
    for i in ids:
        x, y, arms, notes = read_suite(out, i, args.y)
        for note in notes:
            print(f"finding {i}: {note}")
        name = f"finding {i}"
        data[name] = (x, y)
        if len(np.unique(x)) >= MIN_DISTINCT_X:
            fits[name] = fit_power_law(x, y, groups=arms if len(set(arms)) < len(arms) else None,
                                       resamples=args.resamples, seed=args.seed)
        elif args.finding:
            raise DitlabError(f"finding {i}: {len(np.unique(x))} distinct Gflops among its finished DiT arms "
                              f"(a fit needs {MIN_DISTINCT_X})")
    return data, fits, "gflops", args.y


def run(args: argparse.Namespace) -> int:
    if (args.csv is None) == (args.suite is None):
        raise DitlabError("give one of --csv FILE and --suite FOLDER")
    if args.resamples < 1:
        raise DitlabError(f"--resamples must be >= 1, got {args.resamples}")
    for path in (args.out, args.json):
        if path:
            check_writable(path)  # before the fits, not after them
    if args.suite is not None:
        data, fits, x_name, y_name = _suite_fits(args)
    else:
        x_name, y_name = args.x or "gflops", args.y
        data = read_csv(args.csv, x_name, y_name, args.group)
        fits = {name: fit_power_law(x, y, resamples=args.resamples, seed=args.seed)
                for name, (x, y) in data.items() if len(np.unique(x)) >= MIN_DISTINCT_X}
    if not fits:
        raise DitlabError(f"no group has {MIN_DISTINCT_X} distinct {x_name} values to fit a power law "
                          f"(got {max(len(np.unique(x)) for x, _ in data.values())})")
    print(f"fit: {y_name} = a * {x_name}^b (least squares in log-log space; b's 95% CI: bootstrap, "
          f"{args.resamples} resamples, seed {args.seed})")
    print(f"{'group':<16} {'n':>3} {'a':>10} {'b':>9} {'95% CI of b':>21} {'±b':>7} {'r':>7} {'R^2':>6}")
    for name, f in fits.items():
        interval = f"[{f.b_lo:.4f}, {f.b_hi:.4f}]"
        print(f"{name:<16} {f.n:>3} {f.a:>10.4g} {f.b:>9.4f} {interval:>21} {f.b_stderr:>7.4f} {f.r:>7.3f} {f.r2:>6.3f}")
    for name, (x, _) in data.items():
        if name not in fits:
            print(f"{name:<16} skipped: {len(np.unique(x))} distinct {x_name} values (a fit needs {MIN_DISTINCT_X})")
    if args.out:
        plot_fits(data, fits, args.out, "forward Gflops per image" if args.suite else x_name, y_name)
        print(f"wrote {args.out}")
    if args.json:
        save_text(args.json, json.dumps({k: asdict(v) for k, v in fits.items()}, indent=2) + "\n")
    return 0
