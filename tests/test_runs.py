"""Run folders without training: the lock (another holder simulated in this process: flock locks
belong to an open file, so a second open of RUN/.lock conflicts like another process would),
device names, what a resume may change, and the checkpoint pointers and files a run is read from."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditlab import runs
from ditlab.config import Config, config_from_dict
from ditlab.errors import DitlabError
from ditlab.train.checkpoint import save_checkpoint


@pytest.fixture
def holder(tmp_path):
    """RUN/.lock held by 'another process' (an open file of this one) whose file says `content`."""
    opened = []

    def hold(run: Path, content: bytes) -> None:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / runs.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        opened.append(fd)
        os.write(fd, content)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    yield hold
    for fd in opened:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def locked_against_others(lock: Path) -> bool:
    """Whether another open of the lock file (as another process would make) fails to lock it."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False  # closing the descriptor frees that lock again
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.parametrize("content, shown", [(b"4242\n", "pid 4242)"), (b"", "pid unknown)"), (b"\xff42\n", "pid \ufffd42)")])
def test_a_held_run_is_refused_naming_the_pid_and_left_as_it_was(tmp_path, holder, content, shown):
    run = tmp_path / "run"
    holder(run, content)
    fds = open_fds()
    with pytest.raises(DitlabError, match="in use by another ditlab process") as e:
        runs.lock_run_dir(run)
    assert shown in str(e.value)
    assert (run / runs.LOCK).read_bytes() == content and open_fds() == fds  # its file untouched, ours closed
    assert runs.prepare_run_dir(tmp_path / "other", False) is None  # other folders are free
    runs.release_run_dir(tmp_path / "other")


def test_the_lock_file_holds_this_pid_and_the_lock_is_reentrant(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    run.parent.mkdir(parents=True)
    (run.parent / "x").write_text("")  # b exists and is not empty: only what this lock created goes on release
    runs.lock_run_dir(run)
    lock = run / runs.LOCK
    assert lock.read_text() == f"{os.getpid()}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert lock.stat().st_mode & 0o777 == 0o644 & ~umask  # readable by others, for the refusal message
    runs.lock_run_dir(run)  # this process again: fine, nothing changes
    assert locked_against_others(lock)
    runs.release_run_dir(run)
    assert not run.exists() and (run.parent / "x").exists()  # created by the lock, holding nothing else

    new = tmp_path / "new" / "deeper" / "run"
    runs.lock_run_dir(new)
    runs.release_run_dir(new)
    assert not (tmp_path / "new").exists()  # every folder the lock made, outermost included


def test_a_stale_lock_file_is_rewritten_whole(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.LOCK).write_text("99999999999\n")  # a crashed holder's, longer than our pid
    runs.lock_run_dir(run)
    try:
        assert (run / runs.LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        runs.release_run_dir(run)
    assert run.exists()  # not created by this lock: kept


def test_a_run_folder_deleted_and_made_again_is_taken_anew(tmp_path):
    run = tmp_path / "run"
    runs.lock_run_dir(run)
    (run / runs.LOCK).unlink()
    run.rmdir()
    runs.lock_run_dir(run)  # the old lock guards a file that is gone: this one is locked instead
    try:
        assert (run / runs.LOCK).read_text() == f"{os.getpid()}\n" and locked_against_others(run / runs.LOCK)
    finally:
        runs.release_run_dir(run)


def test_an_unwritable_folder_is_refused_and_what_was_made_for_it_removed(tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and not mode & os.W_OK)
    with pytest.raises(DitlabError, match="output folder .* is not writable: Permission denied$"):
        runs.lock_run_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_a_full_disk_at_the_pid_write_is_refused_and_what_was_made_for_it_removed(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    fds = open_fds()
    with pytest.raises(DitlabError, match="is not writable: No space left on device$"):
        runs.lock_run_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists() and open_fds() == fds
    monkeypatch.undo()
    runs.lock_run_dir(tmp_path / "new" / "run")  # nothing left held: free again
    runs.release_run_dir(tmp_path / "new" / "run")


def test_prepare_run_dir_resumes_from_another_runs_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "donor", 3, {"w": torch.zeros(1)}, {"w": torch.zeros(1)}, {}, Config())
    try:
        assert runs.prepare_run_dir(tmp_path / "run", tmp_path / "donor") == tmp_path / "donor" / "checkpoints" / "step_0000003"
    finally:
        runs.release_run_dir(tmp_path / "run")


def test_device_names(monkeypatch):
    assert runs.resolve_device("cpu") == torch.device("cpu")
    assert runs.resolve_device("cpu:0") == torch.device("cpu:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runs.resolve_device("cuda") == torch.device("cuda")
    assert runs.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DitlabError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        runs.resolve_device("cuda:2")


def test_what_a_resume_may_change():
    saved = config_from_dict({"objective": {"kind": "flow", "data_std": 0.5}, "optim": {"grad_clip": 1.0}})

    def changes(**sections) -> list[str]:
        return runs.resume_changes(saved, config_from_dict({"objective": {"kind": "flow", "data_std": 0.5},
                                                            "optim": {"grad_clip": 1.0}, **sections}))

    assert changes() == []
    assert changes(train={"steps": 99}, sample={"steps": 7}) == []  # a budget and a sampling setting
    assert changes(objective={"kind": "flow"}) == []  # an older checkpoint's measured std: taken from it
    assert changes(objective={"kind": "flow", "data_std": 0.7}) == ["objective.data_std: 0.5 -> 0.7"]
    assert changes(optim={"grad_clip": None}) == ["optim.grad_clip: 1.0 -> None"]  # None is a change elsewhere


def test_checkpoint_pointers_and_files(tmp_path):
    step = save_checkpoint(tmp_path, 5, {"w": torch.zeros(1)}, {"w": torch.ones(1)}, {"step": 5}, Config())
    pointer = tmp_path / "checkpoints" / runs.LATEST
    pointer.write_text("step_0000009\n")
    with pytest.raises(DitlabError, match="points to 'step_0000009', which does not exist"):
        runs.latest_checkpoint(tmp_path)
    pointer.write_text(step.name)
    # a step without its own config.yaml takes the run's
    (tmp_path / "config.yaml").write_text("train:\n  steps: 123\n")
    (step / "config.yaml").unlink()
    assert runs.resolve_checkpoint(step / "ema.safetensors")[1].train.steps == 123
    # weights without ditlab's step metadata: no step
    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    assert runs.checkpoint_step(tmp_path / "plain.safetensors") is None
    assert runs.load_state(step) == {"step": 5}


class RunsCode:
    """Unpickling this creates a file: what a checkpoint or state file must never be able to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_state_file_that_would_run_code_is_refused(tmp_path):
    step = tmp_path / "step"
    step.mkdir()
    torch.save({"step": RunsCode(tmp_path / "pwned")}, step / "state.pt")
    with pytest.raises(DitlabError, match="corrupt checkpoint state .*state.pt: Weights only load failed"):
        runs.load_state(step)
    assert not (tmp_path / "pwned").exists()


def test_build_run_names_its_source_when_weights_do_not_fit():
    cfg = config_from_dict({"model": {"name": "DiT-S/4", "hidden_size": 32, "depth": 1, "num_heads": 2,
                                      "input_size": 8, "in_channels": 1, "num_classes": 3}})
    with pytest.raises(DitlabError, match="^checkpoint does not match the model; missing keys"):
        runs.build_run(cfg, {})
