"""Run reliability: the run lock, poisoned checkpoints, resume that would change the experiment,
graceful stops on signals, clean logs and byte-identical checkpoints, and no stray files."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditlab import io, runs
from ditlab.cli import main
from ditlab.config import Config
from ditlab.errors import DitlabError
from ditlab.train import checkpoint as ckpt
from ditlab.train.stop import StopSignals

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    "objective.kind=flow", "optim.batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=3", "optim.grad_clip=1.0",
    "train.ema_decay=0.99", "train.tensorboard=false", "train.progress=false", "train.log_every=1",
    "sample.sampler=euler", "sample.steps=2", "sample.num_samples=10",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two busy cores: one thread per subprocess


def tiny(out: Path | str, *extra: str) -> list[str]:
    return [*TINY, f"train.out_dir={out}", *extra]


def ditlab(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ditlab", *args], env=ENV, capture_output=True, text=True,
                          timeout=120, **kw)


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root but the lock (which names whoever holds the run): (bytes, mtime) by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != runs.LOCK}


def one_line(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def weights(step_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(step_dir / name) for name in ("model.safetensors", "ema.safetensors")]


def assert_equal_weights(a: Path, b: Path) -> None:
    for x, y in zip(weights(a), weights(b)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- the run lock ---------------------------------------------------------------------------


def test_second_process_on_a_locked_run_exits_2_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=1")]) == 0
    runs.lock_run_dir(run)  # this process holds the run now, as a training process would
    try:
        before = files(run)
        proc = ditlab("train", *tiny(run, "train.steps=3"), "--resume")
        assert proc.returncode == 2
        err = one_line(proc.stderr)
        assert f"pid {os.getpid()}" in err and "in use" in err
        assert files(run) == before  # not a byte, not a timestamp of the first run changed
    finally:
        runs.release_run_dir(run)
    assert main(["train", *tiny(run, "train.steps=2"), "--resume"]) == 0  # released: free to continue


def test_a_killed_holder_frees_the_lock(tmp_path):
    run = tmp_path / "run"
    code = f"import time; from ditlab.runs import lock_run_dir; lock_run_dir({str(run)!r}); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DitlabError, match=f"pid {holder.pid}"):
            runs.prepare_run_dir(run, False)
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own runs
        holder.wait()
    assert runs.prepare_run_dir(run, False) is None  # the kernel dropped the dead holder's lock
    runs.release_run_dir(run)


# ---- poisoned checkpoints -------------------------------------------------------------------


def _save(run: Path, step: int, value: float) -> Path:
    sd = {"w": torch.full((2, 2), value)}
    return ckpt.save_checkpoint(run, step, sd, {"w": sd["w"].clone()}, {"step": step}, Config())


def test_non_finite_weights_are_never_saved(tmp_path):
    _save(tmp_path, 1, 1.0)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(DitlabError, match=r"refusing to save checkpoint step_0000002: the model weights hold NaN or Inf \(w\).*"
                                              r"last good checkpoint: .*step_0000001"):
            _save(tmp_path, 2, bad)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def test_nan_weights_after_an_update_stop_the_run_without_saving(tmp_path, monkeypatch, capsys):
    real = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):  # the loss was finite; the update is not
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2", "train.ckpt_every=1")]) == 2
    assert "refusing to save checkpoint step_0000001" in one_line(capsys.readouterr().err)
    assert not (run / "checkpoints" / "step_0000001").exists()


def test_a_diverged_run_does_not_call_its_last_checkpoint_good(tmp_path, capsys):
    # lr 1e30: step 1 gives huge but finite weights (saved), whose loss at step 2 is inf.
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=3", "train.ckpt_every=1", "optim.lr=1e30")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "non-finite loss" in err and "step 2" in err
    assert "last good checkpoint: none" in err and "step_0000001 holds the weights that gave it" in err


# ---- resume ---------------------------------------------------------------------------------


def test_resume_that_changes_the_experiment_is_refused_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2")]) == 0
    before = files(run)
    capsys.readouterr()
    assert main(["train", *tiny(run, "train.steps=4", "objective.kind=gaussian", "optim.lr=5e-4"), "--resume"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "objective.kind: 'flow' -> 'gaussian'" in err and "optim.lr: 0.001 -> 0.0005" in err
    assert files(run) == before  # config.yaml above all
    # The budget, logging and sampling settings may change.
    assert main(["train", *tiny(run, "train.steps=3", "train.log_every=3", "sample.num_samples=4"), "--resume"]) == 0
    assert runs.latest_checkpoint(run).name == "step_0000003"


def test_resume_does_not_swallow_the_next_override(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2")]) == 0
    assert main(["train", *tiny(run), "--resume", "train.steps=3"]) == 0
    assert runs.latest_checkpoint(run).name == "step_0000003"


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0")]) == 0
    # As after a kill between the step-4 log row and its checkpoint: latest is step 2.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / "latest").write_text("step_0000002\n")
    with open(run / "log.csv", "a") as f:
        f.write("5,0.1")  # and a row cut short
    assert main(["train", *tiny(run, "train.steps=4", "train.ckpt_every=2"), "--resume"]) == 0
    assert [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))] == [1, 2, 3, 4]


# ---- graceful stop --------------------------------------------------------------------------


def _wait_for_rows(log: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.is_file() and len(log.read_text().splitlines()) > n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not log in time")


def test_sigterm_saves_the_current_step_and_resume_is_bit_identical(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ditlab", "train", *tiny(run, "train.steps=100000", "train.ckpt_every=0",
                                                            "data.random_flip=true")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(run / "log.csv", 2, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    step_dir = runs.latest_checkpoint(run)
    step = int(step_dir.name.split("_")[1])
    assert step >= 2 and f"stopped by SIGTERM at step {step}: checkpoint {step_dir}" in out and "--resume" in out
    assert not err.strip()
    # Continue two steps and compare with an uninterrupted run to the same step.
    assert main(["train", *tiny(run, f"train.steps={step + 2}", "data.random_flip=true"), "--resume"]) == 0
    full = tmp_path / "full"
    assert main(["train", *tiny(full, f"train.steps={step + 2}", "data.random_flip=true")]) == 0
    name = runs.step_dir_name(step + 2)
    assert_equal_weights(run / "checkpoints" / name, full / "checkpoints" / name)
    assert [int(r["step"]) for r in csv.DictReader(open(run / "log.csv"))] == list(range(1, step + 3))


def test_first_signal_sets_a_flag_second_stops_at_once():
    # A suite started as a background job (`cmd &`) inherits an ignored SIGINT, which StopSignals
    # leaves ignored on purpose: give this test Python's default handler, as a terminal would.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    signals = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.received == signal.SIGINT  # no KeyboardInterrupt: the step goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signals.restore()
        restored = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, outer)
    assert restored is signal.default_int_handler


_AGREE = """
import os, signal, sys
import torch.distributed as dist
from ditlab.train.distributed import setup
from ditlab.train.stop import StopSignals, agreed_stop
env = setup("cpu")
s = StopSignals()
if env.rank == 1:
    s.received = signal.SIGUSR1  # only rank 1 was signalled
print(agreed_stop(env, False, s)[1], flush=True)
dist.destroy_process_group()
"""


def test_ranks_agree_on_a_stop_signal_only_one_received():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o.strip() for o, _ in outs] == [str(int(signal.SIGUSR1))] * 2, outs


# ---- files ----------------------------------------------------------------------------------


def test_identical_runs_write_byte_identical_checkpoints(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)  # the same relative train.out_dir, so config.yaml matches too
        assert main(["train", *tiny("run", "train.steps=2")]) == 0
    a, b = (files(tmp_path / name / "run" / "checkpoints") for name in ("a", "b"))
    assert a.keys() == b.keys() and len(a) == 5
    assert all(a[k][0] == b[k][0] for k in a), [k for k in a if a[k][0] != b[k][0]]
    meta = ckpt._sorted_metadata(open(tmp_path / "a" / "run" / "checkpoints" / "step_0000002" / "ema.safetensors", "rb").read())
    assert runs.checkpoint_step(tmp_path / "a" / "run" / "checkpoints" / "step_0000002" / "ema.safetensors") == 2
    assert len(meta) % 8 == 0


def test_a_run_that_fails_in_setup_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["train", *tiny(out, "data.source=folder", f"data.path={tmp_path / 'nope'}")]) == 2
    one_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_failed_writes_leave_no_tmp_file_nor_folder(tmp_path, monkeypatch):
    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", no_rename)
    with pytest.raises(DitlabError, match="No space left"):
        io.save_text(tmp_path / "new" / "sub" / "m.json", "{}")
    with pytest.raises(OSError):
        io.write_atomic(tmp_path / "x.txt", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sample_writes_the_npz_it_names(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=1")]) == 0
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--num-samples", "2", "--out-npz", str(tmp_path / "o.txt")]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "o.txt").is_file() and not (tmp_path / "o.txt.npz").exists()
    assert str(tmp_path / "o.txt") in captured.out
    assert "steps:" not in captured.err and "\r" not in captured.err  # no progress bar off a terminal


def test_progress_off_a_terminal_is_a_plain_line_per_log_step(tmp_path, capsys):
    assert main(["train", *tiny(tmp_path / "run", "train.steps=4", "train.log_every=2", "train.progress=true")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["train step 2/4", "train step 4/4"] and "loss" in lines[0]
