"""Evaluator numbers for the README: test accuracy and the classifier-FID / P-R floors.

    OMP_NUM_THREADS=1 python benchmarks/eval_floors.py --data /work/shared/data --n 1000 5000 10000

The floor of a metric at N samples is its value for N real *training* images against the test
set: what a perfect generator would score with N samples (FID is biased upwards at small N).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ditlab.eval.classifier import classifier_outputs, load_classifier, load_split
from ditlab.eval.fid import fid_from_features, precision_recall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="/work/shared/data")
    p.add_argument("--n", type=int, nargs="+", default=[1000, 5000, 10000])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    args = p.parse_args()
    print("| dataset | test acc | N | cls-FID floor | precision floor | recall floor |")
    print("|---|---|---|---|---|---|")
    for ds in args.datasets:
        t0 = time.time()
        model = load_classifier(ds)
        xtr, _ = load_split(Path(args.data) / ds, "train")
        xte, yte = load_split(Path(args.data) / ds, "test")
        logits, test_feats = classifier_outputs(model, xte)
        acc = (logits.argmax(1).numpy() == yte).mean()
        rng = np.random.default_rng(0)
        for n in args.n:
            _, real = classifier_outputs(model, xtr[rng.choice(len(xtr), n, replace=False)])
            sub = test_feats[rng.permutation(len(test_feats))[:n]]
            prec, rec = precision_recall(sub, real)
            print(f"| {ds} | {acc:.4f} | {n} | {fid_from_features(real, test_feats):.3f} | {prec:.3f} | {rec:.3f} |")
        print(f"<!-- {ds}: {time.time() - t0:.0f}s -->")


if __name__ == "__main__":
    main()
