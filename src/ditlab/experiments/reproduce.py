"""`ditlab reproduce` and `ditlab report`: run the findings of the research notes and write their pages.

    ditlab reproduce                         # every finding, profile cpu, into reports/cpu
    ditlab reproduce 6 11 --profile smoke    # two findings end to end in a minute
    ditlab reproduce --plan                  # one command per unit, for a scheduler
    ditlab reproduce --shard 3/8             # units with index % 8 == 3 (e.g. a Slurm array task)
    ditlab report --out reports/cpu          # pages + REPORT.md from the results present

Finished units are reused (also from committed results files), a killed one resumes from its
last checkpoint. `--jobs N` runs N shards side by side on this machine (one per GPU when there
are several), then writes the reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ditlab.errors import DitlabError
from ditlab.experiments.pages import write_finding, write_index
from ditlab.experiments.specs import PROFILES, check_finding, load_findings, load_suite, select
from ditlab.experiments.suite import Scorer, needs_work, plan, read_record, run_unit
from ditlab.io import save_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="*", help="finding ids (default: all)")
    p.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the profile's)")
    p.add_argument("--out", default=None, help="results folder (default reports/<profile>)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default $DITLAB_DATA/<source>)")
    p.add_argument("--jobs", type=int, default=1, help="shards run side by side on this machine")
    p.add_argument("--shard", default=None, help="i/n: run only units whose index %% n == i (0 <= i < n)")
    p.add_argument("--unit", default=None, help="run only the unit with this key (see --plan)")
    p.add_argument("--plan", action="store_true", help="print one command per unit and exit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores / jobs)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--no-report", action="store_true", help="run units only; write pages later with `ditlab report`")
    p.add_argument("--findings", default=None, help="folder of finding specs (default: the packaged ones)")


def setup(args: argparse.Namespace):
    folder = Path(args.findings) if args.findings else None
    recipes, profiles = load_suite(folder)
    if args.profile not in profiles:
        raise DitlabError(f"unknown profile '{args.profile}' (choose {', '.join(profiles)})")
    profile = profiles[args.profile]
    findings = load_findings(folder)
    chosen = select(findings, list(args.ids))
    for f in chosen:
        check_finding(f, recipes, profiles)
    seeds = args.seeds if args.seeds is not None else profile.seeds
    if seeds < 1:
        raise DitlabError(f"--seeds must be at least 1, got {seeds}")
    out = Path(args.out) if args.out else Path("reports") / profile.name
    units, arm_runs = plan(chosen, profile, recipes, seeds, out, args.data_dir)
    return profile, chosen, seeds, out, units, arm_runs, list(findings)


def _shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise DitlabError(f"--shard takes i/n, e.g. 0/4, not '{spec}'") from None
    if not (n >= 1 and 0 <= i < n):
        raise DitlabError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def _command(args: argparse.Namespace, out: Path, seeds: int, extra: list[str]) -> list[str]:
    cmd = ["ditlab", "reproduce", *args.ids, "--profile", args.profile, "--seeds", str(seeds), "--out", str(out)]
    for flag, value in (("--data-dir", args.data_dir), ("--findings", args.findings)):
        if value:
            cmd += [flag, value]
    return cmd + extra


def write_reports(profile, findings, units, arm_runs, out: Path, order: list[str]) -> Path:
    """Pages of `findings`; REPORT.md over every finding with a page in OUT (in spec order)."""
    reference = None
    if (out / "reference.json").is_file():
        reference = json.loads((out / "reference.json").read_text())
    for f in findings:
        write_finding(f, profile, arm_runs, units, out, reference)
    summaries = [json.loads(p.read_text()) for i in order if (p := out / f"finding_{i}" / "results.json").is_file()]
    return write_index(summaries, out, profile)


def run(args: argparse.Namespace) -> int:
    profile, findings, seeds, out, units, arm_runs, order = setup(args)
    i, n = _shard(args.shard)
    keys = list(units)  # plan order: finding by finding, so verdicts arrive early
    if args.unit is not None:
        if args.unit not in units:
            raise DitlabError(f"no unit '{args.unit}' in this plan (see --plan)")
        keys = [args.unit]
    keys = [k for j, k in enumerate(keys) if j % n == i]
    todo = [k for k in keys if needs_work(units[k], read_record(out, k))]
    if args.plan:
        for k in todo:
            print(" ".join(_command(args, out, seeds, ["--unit", k, "--no-report"])))
        print(" ".join(["ditlab", "report", *args.ids, "--profile", args.profile, "--seeds", str(seeds), "--out", str(out)]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        save_text(out / ".gitignore", "runs/\nlog.txt\n")  # checkpoints stay out of git; results files go in
    save_text(out / "suite.json", json.dumps({"profile": profile.name, "seeds": seeds}) + "\n")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{len(units)} units for {len(findings)} finding(s), profile {profile.name}, {seeds} seed(s); "
          f"{len(todo)} to run{f' in shard {i}/{n}' if n > 1 else ''} -> {out}", flush=True)
    if args.jobs > 1 and todo:
        _run_jobs(args, out, seeds, device)
    else:
        threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
        torch.set_num_threads(threads)
        _run_units([units[k] for k in todo], out, profile, device)
    if args.no_report:
        return 0
    index = write_reports(profile, findings, units, arm_runs, out, order)
    print(f"wrote {index}")
    return 0


def _run_units(units, out: Path, profile, device: str) -> None:
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    scorers: dict[tuple, Scorer] = {}

    def scorer_for(cfg) -> Scorer:
        key = (cfg.data.source, cfg.data.path)
        if key not in scorers:
            scorers[key] = Scorer.build(cfg, profile.eval["reference"], profile.eval["samples"])
            save_text(out / "reference.json", json.dumps({"data": cfg.data.source, **scorers[key].floor}) + "\n")
        return scorers[key]

    try:
        for j, unit in enumerate(units):
            log(f"unit {j + 1}/{len(units)}: {unit.key}")
            run_unit(unit, out, scorer_for, log, device)
    finally:
        logf.close()


def _run_jobs(args: argparse.Namespace, out: Path, seeds: int, device: str) -> None:
    """`--jobs N`: N shards as child processes, each with its share of the cores (or its own GPU)."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    procs = []
    for i in range(args.jobs):
        extra = ["--shard", f"{i}/{args.jobs}", "--no-report", "--threads", str(threads)]
        extra += ["--device", f"cuda:{i % gpus}"] if gpus else ["--device", device]
        cmd = [sys.executable, "-m", "ditlab.cli", *_command(args, out, seeds, extra)[1:]]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise DitlabError(f"{len(failed)} of {args.jobs} jobs failed (see {out / 'log.txt'}); rerun to resume")
