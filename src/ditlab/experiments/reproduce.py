"""`ditlab reproduce` and `ditlab report`: run the findings of the research notes and write their pages.

    ditlab reproduce                         # every finding, profile cpu, into reports/cpu
    ditlab reproduce 6 11 --profile smoke    # two findings end to end in a minute
    ditlab reproduce --plan                  # one command per unit, for a scheduler
    ditlab reproduce --shard 3/8             # units with index % 8 == 3 (e.g. a Slurm array task)
    ditlab report --out reports/cpu          # pages + REPORT.md from the results present

Finished units are reused (also from committed results files), a killed one resumes from its
last checkpoint. `--jobs N` runs N workers side by side on this machine (one per GPU when there
are several) that each take the next unit no other process has claimed, then writes the reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no claims; run one process per results folder there
    fcntl = None

from ditlab.errors import DitlabError
from ditlab.experiments.pages import write_finding, write_index
from ditlab.experiments.specs import PROFILES, Finding, Profile, check_finding, load_findings, load_suite, select
from ditlab.experiments.suite import ArmRun, SampleScorer, TextScorer, Unit, build_scorer, needs_work, plan, read_record, record_path, run_unit
from ditlab.io import save_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="*", help="finding ids (default: all)")
    p.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the profile's)")
    p.add_argument("--out", default=None, help="results folder (default reports/<profile>)")
    p.add_argument("--data-dir", default=None, help="datasets' root, holding mnist/, fashion-mnist/, text/ (default $DITLAB_DATA)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes side by side on this machine, each taking the next unclaimed unit")
    p.add_argument("--shard", default=None, help="i/n: run only units whose index %% n == i (0 <= i < n)")
    p.add_argument("--unit", default=None, help="run only the unit with this key (see --plan)")
    p.add_argument("--plan", action="store_true", help="print one command per unit and exit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores / jobs)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--no-report", action="store_true", help="run units only; write pages later with `ditlab report`")
    p.add_argument("--findings", default=None, help="folder of finding specs (default: the packaged ones)")


@dataclass
class Suite:
    """What a `reproduce`/`report` invocation works on: the specs, the profile, the results folder."""

    recipes: dict
    profile: Profile
    findings: dict[str, Finding]  # every spec, in file order
    chosen: list[Finding]  # the ones named on the command line (all when none)
    seeds: int
    out: Path

    def plan(self, findings: list[Finding]) -> tuple[dict[str, Unit], list[ArmRun]]:
        return plan(findings, self.profile, self.recipes, self.seeds, self.out)


def setup(args: argparse.Namespace) -> Suite:
    folder = Path(args.findings) if args.findings else None
    recipes, profiles = load_suite(folder)
    if args.profile not in profiles:
        raise DitlabError(f"unknown profile '{args.profile}' (choose {', '.join(profiles)})")
    findings = load_findings(folder)
    chosen = select(findings, list(args.ids))
    for f in findings.values():
        check_finding(f, recipes, profiles)
    seeds = args.seeds if args.seeds is not None else profiles[args.profile].seeds
    if seeds < 1:
        raise DitlabError(f"--seeds must be at least 1, got {seeds}")
    out = Path(args.out) if args.out else Path("reports") / args.profile
    if args.data_dir:  # the datasets' root, as $DITLAB_DATA: <dir>/mnist, <dir>/fashion-mnist, <dir>/text/...
        os.environ["DITLAB_DATA"] = str(Path(args.data_dir).expanduser().resolve())
    return Suite(recipes, profiles[args.profile], findings, chosen, seeds, out)


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


def write_reports(suite: Suite, ids: list[str]) -> Path:
    """Pages of the findings named by ids, or of every finding with any results in OUT (some arms
    of a finding are often another's: its page then shows them, pending the rest); REPORT.md over
    the whole suite: with ids, the other findings' rows come from the pages already in OUT, so
    reporting one finding never drops the others from the table; a finding without a page is "not run"."""
    findings = [suite.findings[i] for i in ids] if ids else list(suite.findings.values())
    units, arm_runs = suite.plan(findings)
    started = {a.finding for a in arm_runs if record_path(suite.out, a.unit).is_file()} if not ids else set(ids)
    for f in findings:  # the page of results no longer planned (a changed spec or profile) would pass for current
        if f.id not in started:
            shutil.rmtree(suite.out / f"finding_{f.id}", ignore_errors=True)
    references = {}  # data source -> real-data floor of the metrics
    for path in suite.out.glob("reference*.json"):
        floor = json.loads(path.read_text())
        references[floor["data"]] = floor
    written = {f.id: write_finding(f, suite.profile, arm_runs, units, suite.out, references)
               for f in findings if f.id in started}
    summaries = [written.get(f.id) or _page_summary(suite.out, f) for f in suite.findings.values()]
    return write_index(summaries, suite.out, suite.profile)


def _page_summary(out: Path, finding: Finding) -> dict:
    """The summary a finding's page was written with (its results.json), or "not run" without one."""
    path = out / f"finding_{finding.id}" / "results.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DitlabError(f"{path} is not a results file ({e}): run `ditlab report --out {out}` to rewrite every page") from None
    return {"id": finding.id, "claim": finding.claim, "verdict": "not run"}


def run(args: argparse.Namespace) -> int:
    suite = setup(args)
    profile, findings, seeds, out = suite.profile, suite.chosen, suite.seeds, suite.out
    units, arm_runs = suite.plan(findings)
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
    index = write_reports(suite, [])
    print(f"wrote {index}")
    return 0


def _run_units(units, out: Path, profile, device: str) -> None:
    logf = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    scorers: dict[tuple, SampleScorer | TextScorer] = {}

    def scorer_for(cfg) -> SampleScorer | TextScorer:
        key = (cfg.data.source, cfg.data.path)
        if key not in scorers:
            scorers[key] = build_scorer(cfg, profile.eval, device)
            if scorers[key].floor:
                save_text(out / f"reference_{cfg.data.source}.json", json.dumps(scorers[key].floor) + "\n")
        return scorers[key]

    try:
        pending, done = list(units), 0
        for _ in range(2):  # a second pass takes up the units that a stopped process left
            skipped = []
            for unit in pending:
                if not needs_work(unit, read_record(out, unit.key)):
                    continue  # finished by another process meanwhile
                claim = _claim(out, unit.key)
                if claim is None:
                    skipped.append(unit)
                    continue
                try:
                    done += 1
                    log(f"unit {done}/{len(units)}: {unit.key}")
                    run_unit(unit, out, scorer_for, log, device)
                finally:
                    claim.close()
            pending = skipped
        if pending:
            log(f"{len(pending)} unit(s) left to the other process(es) working on them")
    finally:
        logf.close()


def _claim(out: Path, key: str):
    """Claim a unit for this process: an exclusive lock on OUT/runs/<key>.claim, held until the
    returned file is closed or the process ends. None when another process holds it: processes on
    one results folder (the workers of --jobs, or commands started by hand) share out its units."""
    path = out / "runs" / f"{key}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
    return f


def _run_jobs(args: argparse.Namespace, out: Path, seeds: int, device: str) -> None:
    """`--jobs N`: N workers as child processes, each with its share of the cores (or its own GPU),
    taking the next unclaimed unit as they go (so one long unit does not hold up a fixed share)."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    procs = []
    for i in range(args.jobs):
        extra = ["--no-report", "--threads", str(threads)]
        for flag, value in (("--shard", args.shard), ("--unit", args.unit)):
            if value:
                extra += [flag, value]
        extra += ["--device", f"cuda:{i % gpus}"] if gpus else ["--device", device]
        cmd = [sys.executable, "-m", "ditlab.cli", *_command(args, out, seeds, extra)[1:]]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise DitlabError(f"{len(failed)} of {args.jobs} jobs failed (see {out / 'log.txt'}); rerun to resume")
