"""Measure the objectives on MNIST: DDPM vs flow matching vs shortcut models.

    python -m ditlab.experiments.objectives --out runs/objectives --steps 1000 --eval-every 250

Trains the same small DiT with the same optimizer (AdamW, lr warm-up, gradient clipping, EMA
with warm-up, batch 32) three times through `ditlab.train.Trainer`, once per objective:
  ddpm      the official DiT Gaussian diffusion (linear schedule, eps + learned sigma), DDIM sampling
  flow      flow matching (velocity, logit-normal t), Euler sampling
  shortcut  shortcut model (1/4 self-consistency rows, base grid 128), sampled with 4 steps
Every `--eval-every` steps the EMA weights draw `--eval-samples` class-conditional digits (labels
0..9 cycled, fixed seed, same NFE for ddpm and flow) and the MNIST evaluator CNN gives
  acc   the share of samples classified as their label
  fid   the Fréchet distance of its 128-d features to real MNIST test digits (few samples: biased
        upwards, comparable only at equal sample counts)
At the end the shortcut model is also sampled with 1, 2, 4, 8 and 128 steps. The report
(`OUT/report.md`, `OUT/results.json`) has the curves and the steps each objective needed to
reach accuracy thresholds. A finished run in OUT/<objective> of the same length is reused, and a
shorter one is resumed up to the new --steps (the evaluation then covers all its checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ditlab.config import Config, ObjectiveConfig, load_config
from ditlab.data.mnist import load_embedded_mnist
from ditlab.errors import DitlabError
from ditlab.eval.classifier import classifier_outputs, default_data_dir, load_classifier, load_split
from ditlab.eval.fid import fid_from_features
from ditlab.io import save_grid
from ditlab.runs import Run, latest_checkpoint, load_run
from ditlab.sampling import generate
from ditlab.train.trainer import Trainer

# The base configs ship inside the package (configs/ at the repository root links to them),
# so a wheel install finds them too.
CONFIGS = resources.files("ditlab") / "configs"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9)


def build_config(kind: str, args: argparse.Namespace) -> Config:
    """The run config of one objective: everything but the objective is shared."""
    base = {"ddpm": "mnist_flow.yaml", "flow": "mnist_flow.yaml", "shortcut": "mnist_shortcut.yaml"}[kind]
    path = CONFIGS / base
    if not path.is_file():  # never fall back to defaults silently: they are another experiment
        raise DitlabError(f"the packaged config {base} is missing from {CONFIGS}; reinstall ditlab")
    cfg = load_config(Path(str(path)))
    if kind == "ddpm":  # the official DiT objective
        cfg.objective, cfg.model.learn_sigma = ObjectiveConfig(kind="gaussian"), True
        cfg.sample.sampler = "ddim"
    elif kind == "flow":
        cfg.objective.kind, cfg.objective.time_sampling = "flow", "logit_normal"
    else:
        cfg.objective.kind = "shortcut"
    m = cfg.model
    m.name, m.hidden_size, m.depth, m.num_heads, m.input_size = "DiT-S/4", args.hidden, args.depth, args.heads, 28
    cfg.data.source, cfg.data.path = args.data, getattr(args, "data_path", None)
    t = cfg.train
    t.out_dir, t.steps, t.seed = str(Path(args.out) / kind), args.steps, args.seed
    t.ckpt_every, t.keep_last, t.log_every = args.eval_every, 10_000, max(1, args.eval_every // 5)
    t.ema_decay, t.ema_warmup, t.tensorboard, t.progress = 0.999, True, False, False
    t.sample_every = 0
    cfg.optim.lr, cfg.optim.batch_size, cfg.optim.warmup_steps, cfg.optim.grad_clip = args.lr, args.batch_size, min(200, args.steps // 5), 1.0
    cfg.sample.num_samples, cfg.sample.steps = 10, args.sample_steps if kind != "shortcut" else 4
    return cfg


def real_features(clf, n: int, data: str) -> np.ndarray:
    """Evaluator features of n real test digits (the embedded 5k sample when no MNIST dir)."""
    try:
        x, _ = load_split(default_data_dir("mnist"), "test")
    except DitlabError:
        x = load_embedded_mnist()[0]  # [-1, 1] floats
    return classifier_outputs(clf, x[:n])[1].numpy()


def score(run: Run, clf, real: np.ndarray, *, sampler: str, steps: int, n: int, cfg_scale: float) -> dict:
    labels = np.arange(n) % 10
    t0 = time.time()
    images, labels = generate(run, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=0, batch_size=n)
    logits, feats = classifier_outputs(clf, images)
    acc = float((logits.argmax(1).numpy() == labels).mean())
    return {"acc": acc, "fid": fid_from_features(feats.numpy(), real), "nfe": run.objective.last_nfe,
            "sample_s": time.time() - t0, "images": images}


def steps_to_reach(curve: list[dict], key: str, threshold: float, higher: bool = True) -> int | None:
    for row in curve:
        if (row[key] >= threshold) if higher else (row[key] <= threshold):
            return row["step"]
    return None


def train_one(kind: str, args, log) -> dict:
    """Train one objective, or reuse a finished run of the same length in OUT/kind."""
    cfg = build_config(kind, args)
    done = Path(cfg.train.out_dir) / "train_result.json"
    before = json.loads(done.read_text()) if done.is_file() else None
    if before and before["step"] == args.steps:
        log(f"[{kind}] reusing the finished run in {cfg.train.out_dir}")
        return before
    resume = latest_checkpoint(cfg.train.out_dir) is not None  # a longer --steps extends the run
    log(f"[{kind}] training {'on ' if resume else ''}to step {cfg.train.steps} -> {cfg.train.out_dir}")
    r = Trainer(cfg, resume=resume, device="cpu").train()
    earlier = before["train_s"] if (resume and before) else 0.0
    info = {"step": r.step, "train_s": earlier + r.elapsed_s, "img_per_s": r.images_per_s, "last_loss": r.last_loss}
    done.write_text(json.dumps(info))
    log(f"[{kind}] trained {r.step} steps in {info['train_s']:.0f} s ({r.images_per_s:.0f} img/s), last loss {r.last_loss:.4f}")
    return info


def eval_one(kind: str, args, trained: dict, clf, real: np.ndarray, log) -> dict:
    cfg = build_config(kind, args)
    sampler = {"ddpm": "ddim", "flow": "euler", "shortcut": "shortcut"}[kind]
    steps = 4 if kind == "shortcut" else args.sample_steps
    curve = []
    step_dirs = sorted((Path(cfg.train.out_dir) / "checkpoints").glob("step_*"))
    for step_dir in step_dirs:
        run = load_run(step_dir)
        s = score(run, clf, real, sampler=sampler, steps=steps, n=args.eval_samples, cfg_scale=args.cfg_scale)
        step = int(step_dir.name.split("_")[1])
        curve.append({"step": step, "acc": s["acc"], "fid": s["fid"], "nfe": s["nfe"]})
        log(f"[{kind}] step {step}: acc {s['acc']:.3f} fid {s['fid']:.1f} ({sampler} {steps} steps, nfe {s['nfe']}, {s['sample_s']:.0f}s)")
    save_grid(Path(args.out) / f"{kind}_{sampler}{steps}.png", s["images"][:100], 10)
    out = {"kind": kind, "sampler": sampler, "sample_steps": steps, "train_s": trained["train_s"],
           "img_per_s": trained["img_per_s"], "curve": curve}
    if kind == "shortcut":
        out["by_steps"] = []
        for k in args.shortcut_steps:
            n = args.eval_samples if k <= 8 else min(args.eval_samples, args.long_samples)
            s = score(run, clf, real, sampler="shortcut", steps=k, n=n, cfg_scale=args.cfg_scale)
            out["by_steps"].append({"steps": k, "samples": n, "acc": s["acc"], "fid": s["fid"]})
            save_grid(Path(args.out) / f"shortcut_{k}steps.png", s["images"][:100], 10)
            log(f"[shortcut] {k} steps: acc {s['acc']:.3f} fid {s['fid']:.1f}")
    return out


def report(results: dict, args, clf_meta: dict) -> str:
    lines = [
        "# Objectives on MNIST: DDPM vs flow matching vs shortcut",
        "",
        f"Model DiT-S/4 with hidden {args.hidden}, depth {args.depth}, heads {args.heads} (patch 4, 49 tokens); "
        f"data `{args.data}`; batch {args.batch_size}, lr {args.lr:g} (AdamW, warm-up, grad clip 1, EMA 0.999 with warm-up); "
        f"{args.steps} steps per objective, seed {args.seed}, CPU (torch threads {torch.get_num_threads()}).",
        f"Evaluation: {args.eval_samples} samples (labels 0..9 cycled) from the EMA weights, guidance {args.cfg_scale:g}; "
        f"acc = evaluator CNN (test accuracy {clf_meta.get('test_accuracy', '?')}) agrees with the label; "
        f"fid = Fréchet distance of the evaluator's 128-d features to {args.real_samples} real test digits "
        f"(biased upwards at this sample count; compare within the table only).",
        "",
    ]
    kinds = [k for k in ("ddpm", "flow", "shortcut") if k in results]
    head = "| step | " + " | ".join(f"{k} acc | {k} fid" for k in kinds) + " |"
    lines += [f"Samplers: " + ", ".join(f"{k}: {results[k]['sampler']} {results[k]['sample_steps']} steps (NFE {results[k]['curve'][-1]['nfe']})" for k in kinds), "",
              head, "|" + "---|" * (1 + 2 * len(kinds))]
    steps = sorted({r["step"] for k in kinds for r in results[k]["curve"]})
    for st in steps:
        cells = []
        for k in kinds:
            row = next((r for r in results[k]["curve"] if r["step"] == st), None)
            cells += [f"{row['acc']:.3f}", f"{row['fid']:.1f}"] if row else ["", ""]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += ["", "Training steps to first reach an accuracy (— = not within the budget):", "",
              "| accuracy | " + " | ".join(kinds) + " |", "|" + "---|" * (1 + len(kinds))]
    for th in THRESHOLDS:
        lines.append(f"| >= {th:.0%} | " + " | ".join(str(steps_to_reach(results[k]["curve"], "acc", th) or "—") for k in kinds) + " |")
    if "ddpm" in results and "flow" in results:
        target = results["ddpm"]["curve"][-1]
        lines += ["", f"DDPM's final scores (step {target['step']}): acc {target['acc']:.3f}, fid {target['fid']:.1f}. "
                  f"Flow matching reached that accuracy at step {steps_to_reach(results['flow']['curve'], 'acc', target['acc']) or '—'} "
                  f"and that fid at step {steps_to_reach(results['flow']['curve'], 'fid', target['fid'], higher=False) or '—'}."]
    if "shortcut" in results:
        lines += ["", f"Shortcut model after {results['shortcut']['curve'][-1]['step']} steps, by sampling steps (NFE = steps; a guided call is one forward of the doubled batch):", "",
                  "| sampling steps | samples | acc | fid |", "|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['samples']} | {r['acc']:.3f} | {r['fid']:.1f} |" for r in results["shortcut"]["by_steps"]]
    lines += ["", "Training time: " + ", ".join(f"{k} {results[k]['train_s']:.0f} s ({results[k]['img_per_s']:.0f} img/s)" for k in kinds), ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (runs, report.md, results.json, sample grids)")
    p.add_argument("--objectives", default="ddpm,flow,shortcut", help="comma-separated subset of ddpm,flow,shortcut")
    p.add_argument("--steps", type=int, default=1000, help="training steps per objective")
    p.add_argument("--eval-every", type=int, default=250, help="evaluate a checkpoint every N steps")
    p.add_argument("--eval-samples", type=int, default=200, help="samples per evaluation")
    p.add_argument("--real-samples", type=int, default=2000, help="real test digits for the fid reference")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM / Euler steps for ddpm and flow")
    p.add_argument("--shortcut-steps", default="1,2,4,8,128", help="shortcut sampling steps at the end")
    p.add_argument("--long-samples", type=int, default=100, help="samples for shortcut runs of more than 8 steps")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--data", default=None, help="data.source (default: mnist when $DITLAB_DATA/mnist exists, else mnist-embedded)")
    p.add_argument("--classifier", default=None, help="evaluator weights (default: the shipped MNIST classifier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, skip the evaluation")


def run(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.objectives.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("ddpm", "flow", "shortcut")]
    if bad or not kinds:
        raise DitlabError(f"unknown objectives {bad} (choose from ddpm, flow, shortcut)")
    args.shortcut_steps = [int(s) for s in args.shortcut_steps.split(",")]
    if args.steps < 1 or args.eval_every < 1 or args.eval_samples < 10:
        raise DitlabError("need --steps >= 1, --eval-every >= 1 and --eval-samples >= 10")
    args.data_path = None
    if args.data in (None, "mnist"):
        try:
            args.data_path = str(default_data_dir("mnist"))
            args.data = "mnist"
        except DitlabError:
            if args.data == "mnist":
                raise
            args.data = "mnist-embedded"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t0 = time.time()
    trained = {kind: train_one(kind, args, log) for kind in kinds}
    if args.train_only:
        return 0
    clf = load_classifier("mnist", args.classifier)
    real = real_features(clf, args.real_samples, args.data)
    results = {}
    for kind in kinds:
        results[kind] = eval_one(kind, args, trained[kind], clf, real, log)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results, args, getattr(clf, "metadata", {}))
    text += f"Total wall time {time.time() - t0:.0f} s.\n"
    (out / "report.md").write_text(text)
    log(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditlab.experiments.objectives", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DitlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.exit(main())
