"""Bad input to every command: a non-zero exit, exactly one line on stderr, no traceback, and no
file of an existing run changed (nor any output or folder left behind).

Each row is (command line, a piece of the expected message). `RUN` is a trained tiny run, `BIN` a
binary file, `FILE` a regular file (so `FILE/x` cannot be created), `NEW` a path that must stay
absent, `F01`, `L12` and `LFLOAT` sample files with a flaw each, `GOOD` a good sample file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ditlab.cli import main
from ditlab.runs import LOCK

TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    "objective.kind=flow", "optim.batch_size=8", "train.tensorboard=false", "train.progress=false",
    "sample.sampler=euler", "sample.steps=2", "sample.num_samples=10",
]
T = [*TINY, "train.out_dir=NEW"]  # a new run: nothing may be created for it
R = [*TINY, "train.out_dir=RUN"]  # the existing run

CASES = [
    # train
    (["train", "BIN"], "is not UTF-8 text"),
    (["train", *T, "model.depth=0"], "model.depth must be >= 1"),
    (["train", *T, "model.depth=-1"], "model.depth must be >= 1"),
    (["train", *T, "train.steps=-5"], "train.steps must be >= 1"),
    (["train", *T, "sample.cfg_scale=nan"], "sample.cfg_scale must be a finite number"),
    (["train", *T, "optim.lr=fast"], "cannot read 'fast' as float"),
    (["train", *T, "data.source=folder", "data.path=NEW/data"], "image folder not found"),
    (["train", *R, "train.steps=4"], "already holds checkpoints"),
    (["train", *R, "train.steps=4", "objective.kind=gaussian", "--resume"], "objective.kind: 'flow' -> 'gaussian'"),
    (["train", *R, "train.steps=4", "--resume", "model.hidden_size=48"], "model.hidden_size: 32 -> 48"),
    (["train", *T, "--resume"], "no checkpoint"),
    (["train", *T, "train.out_dir=FILE/run"], "not writable"),
    # sample
    (["sample", "--ckpt", "RUN", "--cfg-scale", "nan", "--out-png", "NEW"], "--cfg-scale must be a finite number"),
    (["sample", "--ckpt", "RUN", "--cfg-scale", "inf", "--out-png", "NEW"], "--cfg-scale must be a finite number"),
    (["sample", "--ckpt", "RUN", "sample.cfg_scale=nan", "--out-png", "NEW"], "sample.cfg_scale must be a finite"),
    (["sample", "--ckpt", "RUN", "--labels", ",", "--out-png", "NEW"], "holds no label"),
    (["sample", "--ckpt", "RUN", "--labels", "3,10", "--out-png", "NEW"], "out of range"),
    (["sample", "--ckpt", "RUN", "--config", "BIN", "--out-png", "NEW"], "--config is for checkpoints without"),
    (["sample", "--ckpt", "RUN", "--out-png", "FILE/x.png"], "is a file, not a folder"),
    (["sample", "--ckpt", "NEW", "--out-png", "NEW"], "checkpoint not found"),
    # eval
    (["eval", "--samples", "F01", "--dataset", "mnist", "--metrics", "counts"], "looks like [0, 1]"),
    (["eval", "--samples", "L12", "--dataset", "mnist", "--metrics", "class_acc"], "must lie in [0, 10)"),
    (["eval", "--samples", "LFLOAT", "--dataset", "mnist", "--metrics", "class_acc"], "whole class indices"),
    (["eval", "--samples", "GOOD", "--dataset", "mnist", "--metrics", "counts", "--out", "FILE/m.json"],
     "cannot write"),
    (["eval", "--ckpt", "RUN", "--cfg-scale", "nan", "--num-samples", "2"], "--cfg-scale must be a finite number"),
    # flops
    (["flops", "--config", "BIN"], "is not UTF-8 text"),
    (["flops", "DiT-S/2", "--set", "model.depth=-1"], "model.depth must be >= 1"),
    (["flops", "DiT-S/2", "--set", "model.depth=0"], "model.depth must be >= 1"),
    (["flops", "DiT-S/2", "--image-size", "100"], "multiple of 8"),
    (["flops", "DiT-S/2", "--json", "FILE/f.json"], "is a file, not a folder"),
    # scaling
    (["scaling", "--csv", "CSV", "--json", "FILE/f.json"], "is a file, not a folder"),
    (["scaling", "--csv", "CSV", "--out", "FILE/f.png"], "is a file, not a folder"),
    # convert
    (["convert", "RUN", "NEW", "--to", "diffusers", "--model", "DiT-XL/2"], "hidden size 1152, but these weights have 32"),
    (["convert", "RUN", "NEW", "--to", "diffusers", "--num-heads", "0"], "--num-heads must be >= 1"),
    (["convert", "RUN", "NEW", "--to", "diffusers", "--num-heads", "5"], "not divisible by num_heads 5"),
    # quickstart (OMP_NUM_THREADS is set for every case)
    (["quickstart", "--out", "NEW", "--threads", "0"], "--threads must be >= 1"),
    (["quickstart", "--out", "NEW", "--threads", "-1"], "--threads must be >= 1"),
    (["quickstart", "--out", "NEW", "--budget", "-1"], "--budget must be positive"),
]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK}  # the lock names whoever holds the run; it is no part of it


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    assert main(["train", *TINY, f"train.out_dir={run}", "train.steps=2", "train.log_every=1"]) == 0
    (root / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (root / "file").write_text("a regular file\n")
    digits = np.zeros((4, 28, 28, 1), np.uint8)
    np.savez(root / "f01.npz", arr_0=np.full((4, 28, 28, 1), 0.5, np.float32), labels=np.arange(4))
    np.savez(root / "l12.npz", arr_0=digits, labels=np.array([0, 1, 12, 3]))
    np.savez(root / "lfloat.npz", arr_0=digits, labels=np.array([0.0, 1.5, 2.0, 3.0]))
    np.savez(root / "good.npz", arr_0=digits, labels=np.arange(4))
    (root / "runs.csv").write_text("gflops,fid\n1,40\n2,30\n4,22\n")
    return {"RUN": run, "BIN": root / "binary.yaml", "FILE": root / "file", "NEW": root / "new",
            "F01": root / "f01.npz", "L12": root / "l12.npz", "LFLOAT": root / "lfloat.npz", "GOOD": root / "good.npz",
            "CSV": root / "runs.csv"}


def _fill(arg: str, places: dict[str, Path]) -> str:
    for name in sorted(places, key=len, reverse=True):  # LFLOAT before F01 ...
        if arg == name or arg.startswith(name + "/") or arg.endswith("=" + name) or f"={name}/" in arg:
            return arg.replace(name, str(places[name]), 1)
    return arg


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:1] + [x for x in a[1:] if x not in TINY])
                                                      for a, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing(places, argv, message, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = snapshot(places["RUN"])
    root_before = sorted(p.name for p in places["RUN"].parent.iterdir())
    capsys.readouterr()
    code = main([_fill(a, places) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(places["RUN"]) == before
    assert sorted(p.name for p in places["RUN"].parent.iterdir()) == root_before  # no output, no folder


def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """`ditlab reproduce --plan | head -1`: the reader has gone; no traceback, exit status 1."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: every write fails
    proc = subprocess.Popen([sys.executable, "-m", "ditlab.cli", "reproduce", "--profile", "smoke", "--plan",
                             "--out", str(tmp_path / "suite")], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err
