"""Mutation testing of ditlab's core modules with mutmut (not part of CI; see TESTING.md).

    pip install mutmut==3.8.1
    nice -n 10 python tools/mutation.py objectives/flow.py          # one module
    nice -n 10 python tools/mutation.py --all                       # every module in MODULES
    python tools/mutation.py objectives/flow.py --report             # the last run's counts and survivors
    python tools/mutation.py objectives/flow.py --only '*ǁsample__mutmut_1*'   # some mutants (fnmatch on mutmut's names)

Each module is mutated in a scratch copy of the repository (src/, tests/, benchmarks/,
configs/, pyproject.toml) under $DITLAB_MUTATION_DIR (default /tmp/ditlab-mutation/<module>), never in the
work tree, with its own focused test subset so that a run takes minutes: mutmut records which of
those tests call each function, and runs only them, fastest first, against each mutant of it.
The scratch copy keeps mutmut's state: run again to resume, `--fresh` to start over.

mutmut 3 does not mutate decorated functions. In the scratch copy (only there), a function
decorated with `@torch.no_grad()` is undecorated and wrapped after its definition instead
(`name = torch.no_grad()(name)` at the end of the module or class), which behaves the same and
lets mutmut reach `generate`, `EMA.update` and the shortcut targets. Properties and classmethods
stay unmutated (TESTING.md lists them).

Lines that only build a message (error texts, progress-bar labels) are not mutated: a changed
word there is not a bug the numerical tests could or should catch (the CLI tests check that the
important messages name the right thing).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module (under src/ditlab) -> (test files, pytest -k expression or None)
MODULES: dict[str, tuple[list[str], str | None]] = {
    "objectives/flow.py": (["tests/test_flow.py", "tests/test_flow_rules.py", "tests/test_objective_targets.py",
                            "tests/test_sampling_labels.py"], "not tiny_dit and not resume"),
    "objectives/shortcut.py": (["tests/test_shortcut.py", "tests/test_shortcut_rules.py", "tests/test_objective_targets.py",
                                "tests/test_sampling_labels.py"], "not tiny_dit and not experiment and not test_cli"),
    "objectives/guidance.py": (["tests/test_guidance.py", "tests/test_guidance_rules.py", "tests/test_flow.py",
                                "tests/test_shortcut.py", "tests/test_sampling_labels.py"],
                               "not tiny_dit and not resume and not experiment and not test_cli"),
    "sampling.py": (["tests/test_sampling_labels.py", "tests/test_sampling_arguments.py", "tests/test_sample_cli.py",
                     "tests/test_lm_model.py", "tests/test_lm_eval.py", "tests/test_lm_train.py"], "not gloo"),
    "train/ema.py": (["tests/test_train.py", "tests/test_train_schedules.py"], "ema or schedules"),
    "train/order.py": (["tests/test_train.py", "tests/test_distributed.py", "tests/test_train_order.py"],
                       "step_sampler or resume or ranks_shard or workers or micro_batches"),
    "eval/fid.py": (["tests/test_eval_fid.py", "tests/test_eval_fid_inputs.py", "tests/test_eval_wiring.py",
                     "tests/test_eval_command.py"], None),
    "experiments/stats.py": (["tests/test_findings_stats.py"], None),
    "models/onednn.py": (["tests/test_onednn.py", "tests/test_official_fixtures.py"], "onednn"),
    "eval/scaling.py": (["tests/test_eval_scaling.py"], None),
    "objectives/gaussian.py": (["tests/test_gaussian.py", "tests/test_gaussian_rules.py", "tests/test_official_fixtures.py",
                                "tests/test_objective_targets.py", "tests/test_sampling_labels.py", "tests/test_guidance_rules.py",
                                "tests/test_sampling_arguments.py"],
                               "not training_then_sampling and not test_dit and not seeded_initialisation and not global_rng"),
    "train/checkpoint.py": (["tests/test_checkpoint.py", "tests/test_reliability.py"],
                            "not locked and not holder and not signal and not progress and not sample_writes"),
    "eval/metrics.py": (["tests/test_eval_metrics.py", "tests/test_eval_wiring.py", "tests/test_eval_command.py"], None),
    # tests that start other processes (locks, signals, gloo ranks) would import the unmutated package;
    # configs/quickstart.yaml is a symlink, which mutmut's copy of configs/ replaces by a file; mutmut's
    # workers ignore SIGINT, which the test of the default Ctrl-C handler checks
    "train/trainer.py": (["tests/test_train.py", "tests/test_train_schedules.py", "tests/test_train_validation.py",
                          "tests/test_train_compute.py", "tests/test_reliability.py", "tests/test_lm_train.py",
                          "tests/test_train_loop.py", "tests/test_threads.py", "tests/test_data.py",
                          "tests/test_tokenizers.py"],
                         "not locked and not holder and not ranks_agree and not sigterm and not gloo and not repo_quickstart_config "
                         "and not first_signal"),
    "models/unet.py": (["tests/test_unet.py"], "not test_bad_config_through_cli"),
    # the byte language models (the gloo test starts processes, which import the unmutated package)
    **{module: (["tests/test_lm_model.py", "tests/test_lm_eval.py", "tests/test_lm_data.py", "tests/test_lm_train.py"], "not gloo")
       for module in ("models/lm.py", "models/infini_attention.py", "objectives/next_byte.py", "eval/lm.py")},
    "eval/classifier.py": (["tests/test_eval_classifier.py", "tests/test_eval_wiring.py", "tests/test_eval_command.py"], None),
    "eval/inception.py": (["tests/test_eval_inception.py", "tests/test_eval_fid.py", "tests/test_eval_fid_inputs.py"], None),
    "models/flops.py": (["tests/test_eval_flops.py"], None),
    "train/schedule.py": (["tests/test_train_schedules.py"], None),
    "train/optim.py": (["tests/test_optim.py"], None),
    "train/batch.py": (["tests/test_train_validation.py", "tests/test_data.py", "tests/test_train.py"],
                       "not locked and not holder and not gloo and not repo_quickstart_config"),
    # data and codecs: what a model trains on
    "data/mnist.py": (["tests/test_data.py", "tests/test_bad_input.py", "tests/test_eval_classifier.py"], None),
    "data/text.py": (["tests/test_lm_data.py", "tests/test_lm_eval.py", "tests/test_lm_train.py"], "not gloo"),
    "codecs/tokenizers.py": (["tests/test_tokenizers.py", "tests/test_codec.py"], None),
    # checkpoints and runs: what a command loads
    "models/loading.py": (["tests/test_convert.py", "tests/test_sample_cli.py", "tests/test_bad_input.py"], None),
    "models/convert.py": (["tests/test_convert.py", "tests/test_bad_input.py", "tests/test_dit_variants.py"], None),
    "runs.py": (["tests/test_runs.py", "tests/test_checkpoint.py", "tests/test_sample_cli.py", "tests/test_reliability.py",
                 "tests/test_bad_input.py", "tests/test_sampling_arguments.py", "tests/test_train.py"],
                "not locked and not holder and not signal and not gloo and not first_signal and not sigterm"),
    **{module: (["tests/test_dit.py", "tests/test_dit_ablations.py", "tests/test_dit_variants.py", "tests/test_layers.py",
                 "tests/test_official_fixtures.py", "tests/test_layout_compat.py"], None)
       for module in ("models/dit.py", "models/layers.py")},
}

# Lines not mutated (regular expressions, searched in each line).
DO_NOT_MUTATE = [
    r"raise DitlabError\(",  # the error's text; the condition above it is mutated
    r"^\s*f?\"[^\"]*\"\)?,?\s*(#.*)?$",  # a continuation line of a message: a string literal alone
    r"desc=f?\"",  # tqdm progress-bar labels
    r"^\s*from tqdm",
]


SESSION_CLEANUP = """

def pytest_sessionfinish(session):  # added by tools/mutation.py to its scratch copy only
    import shutil

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and factory._basetemp is not None:
        shutil.rmtree(factory._basetemp, ignore_errors=True)
"""


def undecorate_no_grad(path: Path) -> None:
    """Move `@torch.no_grad()` off top-level functions and methods of top-level classes: the
    decorator line goes, `X = torch.no_grad()(X)` follows the module or the class body."""
    source = path.read_text()
    tree = ast.parse(source)
    lines = source.splitlines()
    drop: set[int] = set()
    after_class: dict[int, list[str]] = {}  # last line of a class -> statements to append there
    tail: list[str] = []

    def no_grad(d: ast.expr) -> bool:
        return isinstance(d, ast.Call) and ast.unparse(d.func) == "torch.no_grad" and not d.args

    def visit(fn: ast.AST, owner: ast.ClassDef | None) -> None:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        found = [d for d in fn.decorator_list if no_grad(d)]
        if not found or len(fn.decorator_list) > 1:
            return
        drop.add(found[0].lineno - 1)
        if owner is None:
            tail.append(f"{fn.name} = torch.no_grad()({fn.name})")
        else:
            after_class.setdefault(owner.end_lineno - 1, []).append(f"{owner.name}.{fn.name} = torch.no_grad()({owner.name}.{fn.name})")

    for node in tree.body:
        visit(node, None)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                visit(item, node)
    if not drop:
        return
    out = []
    for i, line in enumerate(lines):
        if i not in drop:
            out.append(line)
        out.extend(after_class.get(i, []))
    path.write_text("\n".join(out + tail) + "\n")


def scratch_dir(module: str) -> Path:
    base = Path(os.environ.get("DITLAB_MUTATION_DIR", "/tmp/ditlab-mutation"))
    return base / module.replace("/", "_").removesuffix(".py")


def prepare(module: str, fresh: bool) -> Path:
    tests, keyword = MODULES[module]
    work = scratch_dir(module)
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "runs", "*.pyc")
    for name in ("src", "tests", "benchmarks", "configs"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    undecorate_no_grad(work / "src" / "ditlab" / module)
    args = ["-p", "no:cacheprovider", "-p", "no:xdist", "-q"] + (["-k", keyword] if keyword else [])
    # Every mutant is a pytest session in a process forked from mutmut's, which stays alive, so
    # pytest never deems their tmp_path folders stale and never removes them: a run of the
    # Inception tests (which write weight files) filled the disk that way. Each session removes
    # its own at the end.
    with open(work / "tests" / "conftest.py", "a") as f:
        f.write(SESSION_CLEANUP)
    lines = [
        "[mutmut]",
        "source_paths = src/ditlab",
        f"only_mutate = src/ditlab/{module}",
        "process_isolation = forkserver",  # torch is not fork-safe once it has run in the parent
        # the official-fixture tests import benchmarks/make_official_fixtures.py; config tests read configs/
        "also_copy =", "    benchmarks", "    configs",
        "pytest_add_cli_args_test_selection =", *(f"    {t}" for t in tests),
        "pytest_add_cli_args =", *(f"    {a}" for a in args),
        "do_not_mutate_patterns =", *(f"    {p}" for p in DO_NOT_MUTATE),
    ]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")
    return work


def env() -> dict[str, str]:
    # One thread per test process: the machine is shared, and the tests are tiny.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run(module: str, fresh: bool, children: int, only: list[str]) -> None:
    work = prepare(module, fresh)
    print(f"== {module}: mutmut run in {work}", flush=True)
    subprocess.run(["mutmut", "run", "--max-children", str(children), *only], cwd=work, env=env(),
                   stdout=open(work / "mutmut-run.log", "w"), stderr=subprocess.STDOUT, check=False)
    report(module)


def report(module: str) -> dict:
    """Counts per status and the surviving mutants of the module's last run."""
    work = scratch_dir(module)
    if not (work / "setup.cfg").exists():
        print(f"== {module}: no run in {work} yet (run it without --report first)")
        return {"stats": {}, "survivors": []}
    subprocess.run(["mutmut", "export-cicd-stats"], cwd=work, env=env(), capture_output=True, check=False)
    stats_file = work / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    out = subprocess.run(["mutmut", "results"], cwd=work, env=env(), capture_output=True, text=True, check=False)
    survivors = [line.split(":")[0].strip() for line in out.stdout.splitlines() if line.strip().endswith(": survived")]
    print(f"== {module}: {json.dumps(stats)}")
    for name in survivors:
        print(f"   survived: {name}")
    return {"stats": stats, "survivors": survivors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modules", nargs="*", help=f"modules under src/ditlab: {', '.join(MODULES)}")
    p.add_argument("--all", action="store_true", help="every module in MODULES")
    p.add_argument("--report", action="store_true", help="only print the last run's results")
    p.add_argument("--fresh", action="store_true", help="discard the scratch copy and mutmut's saved results")
    p.add_argument("--children", type=int, default=1, help="parallel mutant runs (default 1: a shared machine)")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only the mutants whose names match (fnmatch; repeatable), e.g. an earlier run's survivors")
    args = p.parse_args()
    modules = list(MODULES) if args.all else args.modules
    unknown = [m for m in modules if m not in MODULES]
    if unknown or not modules:
        p.error(f"choose modules from {', '.join(MODULES)} (unknown: {', '.join(unknown) or 'none given'})")
    for module in modules:
        report(module) if args.report else run(module, args.fresh, args.children, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
