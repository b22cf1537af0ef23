"""`ditlab quickstart`: train class-conditional MNIST on the embedded 5,000-image sample, then sample.

Needs no dataset download (the 5,000 digits ship with ditlab) and fits 10 minutes on
2 CPU cores: ~7.8 minutes of training (train.time_budget_s), then 100 EMA samples (10 per
class, one class per row) written as a PNG grid and an ADM-style .npz. Re-running on an --out that
holds checkpoints needs --resume (to continue it) or another --out.

The guidance scale follows how far training got: the grid uses the smallest of GUIDANCE_CHOICES
whose 100-sample probe (another seed) the shipped MNIST classifier recognises at >= 99%. A model
that trained long (an idle machine) needs little guidance, and little guidance keeps the digits
diverse; one that trained briefly (a busy machine) needs more to draw the right digit. An explicit
`sample.cfg_scale=...` override fixes the scale instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ditlab.commands.train import resume_and_overrides
from ditlab.config import Config, load_config, save_config
from ditlab.errors import DitlabError
from ditlab.eval.classifier import class_accuracy
from ditlab.io import save_grid, save_npz
from ditlab.runs import Run, latest_checkpoint, release_run_dir
from ditlab.sampling import generate
from ditlab.train.stop import signal_name
from ditlab.train.trainer import Trainer

# benchmarks/RESULTS.md, 1,000 samples: after ~4,800 steps guidance 2 keeps 99% class accuracy, after
# ~3,000 guidance 3 keeps 98-99%, after ~2,300 only 5 comes near (96.5%). 2.5 catches a model at the
# edge of 2 (a 100-sample probe at a true 99.1% fails about one time in four), before 3 costs recall.
GUIDANCE_CHOICES = (2.0, 2.5, 3.0, 5.0)
PROBE_ACCURACY = 0.99


def quickstart_config_path() -> Path:
    return Path(str(resources.files("ditlab") / "configs" / "quickstart.yaml"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the quickstart config")
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--budget", type=float, default=None, help="training time budget in seconds (default: 470)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="continue the run in --out from its latest checkpoint (or from CKPT)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads, over OMP_NUM_THREADS (default: OMP_NUM_THREADS when set, else all cores, "
                             "or 1 when other processes already load them, re-checked during training as the load changes)")


def busy_cores(interval: float = 0.5) -> float:
    """Cores that other processes keep busy right now, from two reads of /proc/stat.

    The load average would also count a `pip install` that just finished (it decays over a
    minute), which is why the README's install-and-run line would otherwise start on 1 thread.
    Where /proc/stat is missing (macOS), fall back to the 1-minute load average.
    """
    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def pick_threads(requested: int | None) -> int:
    """All cores on an idle machine; 1 on a busy one, where 2 threads of small ops mostly wait on each other
    (measured here: 5.8 s/step with 2 threads vs 0.24 s/step with 1 at a load average of 6 on 2 cores)."""
    if requested is not None:
        if requested < 1:
            raise DitlabError(f"--threads must be >= 1, got {requested}")
        return requested
    cores = os.cpu_count() or 1
    return cores if busy_cores() < 0.5 * cores else 1


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    args.resume, args.overrides = resume_and_overrides(args.resume, list(args.overrides))
    overrides = [f"train.out_dir={args.out}", *args.overrides]
    if args.budget is not None:
        if args.budget <= 0:
            raise DitlabError(f"--budget must be positive seconds, got {args.budget}")
        overrides.append(f"train.time_budget_s={args.budget}")
    cfg = load_config(quickstart_config_path(), overrides)
    adapt_threads = False  # a count the user chose stays; one picked here follows the load (train/threads.py)
    if args.threads is not None:  # an explicit --threads wins over OMP_NUM_THREADS, and is checked either way
        torch.set_num_threads(pick_threads(args.threads))
    elif args.device != "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(pick_threads(None))
        adapt_threads = True
    latest = latest_checkpoint(cfg.train.out_dir) if not args.resume else None
    if latest is not None:
        raise DitlabError(f"{cfg.train.out_dir} already holds checkpoints (latest {latest.name}); "
                          "use --resume to continue it or another --out")
    try:
        return _train_and_sample(args, cfg, t0, adapt_threads)
    finally:
        release_run_dir(cfg.train.out_dir)


def _train_and_sample(args: argparse.Namespace, cfg: Config, t0: float, adapt_threads: bool = False) -> int:
    trainer = Trainer(cfg, resume=args.resume, device=args.device, adapt_threads=adapt_threads)
    if trainer.raw.num_classes == 0:
        raise DitlabError("quickstart draws one row per class: model.num_classes must be > 0")
    budget = cfg.train.time_budget_s
    limit = f"for up to {budget:.0f} s" if budget is not None else f"until step {cfg.train.steps}"
    print(f"quickstart: training {cfg.model.name} (hidden {cfg.model.hidden_size}, depth {cfg.model.depth}, "
          f"patch {cfg.model.patch_size}) with the {cfg.objective.kind} objective on {len(trainer.dataset)} "
          f"{cfg.data.source} images {limit} on {torch.get_num_threads()} CPU thread(s)"
          f"{' (following the load)' if trainer.thread_tuner else ''} ...", flush=True)
    result = trainer.train(final_samples=False)  # the class grid below replaces the run's last grid
    if trainer.thread_tuner and trainer.thread_tuner.changes:
        moves = ", ".join(f"{old}->{new}" for _, old, new, _ in trainer.thread_tuner.changes)
        print(f"CPU threads changed with the load during training: {moves} (now {torch.get_num_threads()})", flush=True)
    if result.signal is not None:  # stopped early: no samples, exit as the signal would (128 + its number)
        saved = result.checkpoint or latest_checkpoint(cfg.train.out_dir)
        budget = ["--budget", f"{args.budget:g}"] if args.budget is not None else []
        again = shlex.join(["ditlab", "quickstart", "--out", str(args.out), *budget, *args.overrides, "--resume"])
        print(f"stopped by {signal_name(result.signal)} at step {result.step}: checkpoint {saved}; "
              f"continue with: {again}", flush=True)
        return 128 + result.signal

    k = trainer.raw.num_classes
    y = np.arange(k).repeat(10)  # row i of the grid = class i
    run = trainer.ema_run()
    t1 = time.time()
    classified = cfg.data.source in ("mnist-embedded", "mnist") and cfg.model.in_channels == 1 \
        and cfg.model.input_size == 28
    fixed = any(o.startswith("sample.cfg_scale=") for o in args.overrides)
    scale = cfg.sample.cfg_scale if fixed or not classified else choose_guidance(run, y, cfg.sample.seed + 1)
    cfg.sample.cfg_scale = scale
    pixels, _ = generate(run, y, cfg_scale=scale)
    out = Path(cfg.train.out_dir)
    grid = save_grid(out / "quickstart_grid.png", pixels, nrow=10)
    npz = save_npz(out / "quickstart_samples.npz", pixels, y)
    save_config(cfg, out / "config.yaml")
    sample_s = time.time() - t1

    accuracy = None
    if classified:
        try:
            accuracy = class_accuracy(pixels, y, dataset="mnist")
        except (DitlabError, ImportError) as e:  # classifier weights missing: report, don't fail
            print(f"(class accuracy not measured: {e})")
    total = time.time() - t0
    print(f"trained {result.step} steps in {result.elapsed_s:.0f} s ({result.images_per_s:.0f} img/s, "
          f"final loss {result.last_loss:.4f}); sampled at guidance {scale:g} in {sample_s:.0f} s; total {total:.0f} s")
    if accuracy is not None:
        print(f"MNIST classifier recognises {100 * accuracy:.1f}% of the samples as their intended class")
    print(f"class grid (row = digit): {grid}")
    print(f"samples (.npz, arr_0 uint8 NHWC + labels): {npz}")
    print(f"checkpoint: {result.checkpoint or latest_checkpoint(out)}  "
          f"(resample: ditlab sample --ckpt {out} --cfg-scale {scale:g})")
    return 0


def choose_guidance(run: Run, labels: np.ndarray, seed: int) -> float:
    """The smallest of GUIDANCE_CHOICES whose probe samples the MNIST classifier recognises at
    >= PROBE_ACCURACY (the largest, unprobed, when none before it does; the config's scale when
    the classifier is missing)."""
    for scale in GUIDANCE_CHOICES[:-1]:
        probe, _ = generate(run, labels, cfg_scale=scale, seed=seed)
        try:
            accuracy = class_accuracy(probe, labels, dataset="mnist")
        except (DitlabError, ImportError):
            return run.cfg.sample.cfg_scale
        print(f"guidance {scale:g}: the classifier recognises {100 * accuracy:.0f}% of {len(labels)} probe samples",
              flush=True)
        if accuracy >= PROBE_ACCURACY:
            return scale
    return GUIDANCE_CHOICES[-1]
