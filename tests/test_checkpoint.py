"""Checkpoints: layout, keep-last-k, resolve_checkpoint, and saves that fail (disk full, kill)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.config import Config
from ditlab.errors import DitlabError
from ditlab import io, runs
from ditlab.train import checkpoint as ckpt

TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "objective.kind=flow",
    "optim.batch_size=8", "train.tensorboard=false", "train.progress=false", "train.log_every=1",
    "sample.sampler=euler", "sample.steps=1", "sample.num_samples=10",
]


def _save(run: Path, step: int, keep: int = 2) -> Path:
    sd = {"w": torch.full((2, 2), float(step))}
    return ckpt.save_checkpoint(run, step, sd, {"w": sd["w"] + 0.5}, {"step": step}, Config(), keep_last=keep)


def test_save_layout_latest_and_keep_last(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step, keep=2)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000020", "step_0000030"]
    assert runs.latest_checkpoint(tmp_path) == ckpts / "step_0000030"
    assert torch.equal(load_file(ckpts / "step_0000030" / "model.safetensors")["w"], torch.full((2, 2), 30.0))
    assert torch.load(ckpts / "step_0000030" / "state.pt", weights_only=True) == {"step": 30}
    assert runs.checkpoint_step(ckpts / "step_0000030" / "ema.safetensors") == 30
    with safe_open(ckpts / "step_0000030" / "model.safetensors", "pt") as f:  # "format": what loaders of .safetensors read
        assert f.metadata() == {"format": "pt", "ditlab_step": "30"}
    # saved into a run folder that does not exist yet, keeping the last two by default (train.keep_last's default)
    new_run = tmp_path / "new" / "run"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(new_run, step, {"w": torch.zeros(1)}, {"w": torch.zeros(1)}, {}, Config())
    assert sorted(p.name for p in (new_run / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000003"]
    assert Config().train.keep_last == 2


def test_resolve_checkpoint_accepts_run_step_dir_and_file(tmp_path):
    _save(tmp_path, 5)
    step = tmp_path / "checkpoints" / "step_0000005"
    for path in (tmp_path, tmp_path / "checkpoints", step):
        weights, cfg = runs.resolve_checkpoint(path)
        assert weights == step / "ema.safetensors" and isinstance(cfg, Config)  # EMA preferred
    weights, cfg = runs.resolve_checkpoint(step / "model.safetensors")
    assert weights == step / "model.safetensors" and cfg is not None
    (step / "ema.safetensors").unlink()
    assert runs.resolve_checkpoint(step)[0] == step / "model.safetensors"
    with pytest.raises(DitlabError, match="checkpoint not found"):
        runs.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DitlabError, match="no checkpoint yet"):
        runs.resolve_checkpoint(tmp_path / "empty")


def _snapshot(step_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in step_dir.iterdir()}


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"train.out_dir={run}", "train.steps=2"]) == 0
    good = _snapshot(run / "checkpoints" / "step_0000002")
    real = ckpt.write_bytes_synced

    def full_disk(path, data):
        if path.name == "state.pt":  # the weights went through, then the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_synced", full_disk)
    capsys.readouterr()
    assert main(["train", *TINY, f"train.out_dir={run}", "train.steps=4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk full" in err and "step_0000002 is intact" in err
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]  # no temp dir left behind
    assert (ckpts / "latest").read_text().strip() == "step_0000002"
    assert _snapshot(ckpts / "step_0000002") == good


def test_kill_during_save_leaves_latest_loadable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"train.out_dir={run}", "train.steps=2"]) == 0
    real = ckpt.write_bytes_synced

    def killed(path, data):
        if path.name == "ema.safetensors":
            raise KeyboardInterrupt  # the process dies half-way through the step directory
        real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_synced", killed)
    assert main(["train", *TINY, f"train.out_dir={run}", "train.steps=4", "--resume"]) == 130
    monkeypatch.setattr(ckpt, "write_bytes_synced", real)
    assert runs.latest_checkpoint(run).name == "step_0000002"  # the half-written step is invisible
    assert list((run / "checkpoints").glob(".tmp-*"))  # (a stray temp dir, as after a real kill)
    assert main(["train", *TINY, f"train.out_dir={run}", "train.steps=4", "--resume"]) == 0
    assert runs.latest_checkpoint(run).name == "step_0000004"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next good save cleans up


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "index.json"
    io.write_atomic(target, b"old")
    real = io.write_bytes_synced

    def torn(path, data):
        real(path, data[:1])  # half the bytes reach the disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_bytes_synced", torn)
    with pytest.raises(KeyboardInterrupt):
        io.write_atomic(target, b"new contents")
    assert target.read_bytes() == b"old"  # readers never see the torn write
    monkeypatch.setattr(io, "write_bytes_synced", real)
    io.write_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents" and sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_two_writers_of_one_file_never_share_a_temp_file(tmp_path, monkeypatch):
    """Another process writes the same file between this one's write and its rename (the workers of
    one results folder all write suite.json): both writes complete, the later rename wins."""
    target = tmp_path / "suite.json"
    real_replace = os.replace
    calls = []

    def interleaved(src, dst):
        if not calls:
            calls.append(src)
            io.write_atomic(target, b"other process")  # its whole write lands in between
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", interleaved)
    io.write_atomic(target, b"this process")
    assert target.read_bytes() == b"this process" and sorted(p.name for p in tmp_path.iterdir()) == ["suite.json"]


def test_figures_are_written_whole_and_closed(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from PIL import Image

    with io.figure(figsize=(2, 1)) as (fig, ax):
        ax.plot([0, 1], [1, 0])
        assert io.save_figure(fig, tmp_path / "new" / "plot.png", dpi=50) == "plot.png"  # its folder is created
    assert Image.open(tmp_path / "new" / "plot.png").size == (100, 50) and not plt.get_fignums()
    monkeypatch.setattr(io, "write_bytes_synced", lambda path, data: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(DitlabError, match="No space left on device"), io.figure() as (fig, ax):
        io.save_figure(fig, tmp_path / "new" / "plot.png")
    # a full disk keeps the old figure whole, leaves no temporary file, and the figure is closed all the same
    assert Image.open(tmp_path / "new" / "plot.png").size == (100, 50) and not plt.get_fignums()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["plot.png"]


def test_keep_last_zero_keeps_every_step_and_latest_is_never_pruned(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step, keep=0)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000010", "step_0000020", "step_0000030"]
    # re-saving an older step (a resume from it) keeps it: `latest` names it, though it is not among the newest two
    _save(tmp_path, 10, keep=2)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000010", "step_0000020", "step_0000030"]
    assert runs.latest_checkpoint(tmp_path) == ckpts / "step_0000010"
    _save(tmp_path, 40, keep=2)  # once latest moves on, the older steps go
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000030", "step_0000040"]


def test_resaving_a_step_replaces_its_files_and_leaves_no_old_copy(tmp_path):
    _save(tmp_path, 5)
    step = tmp_path / "checkpoints" / "step_0000005"
    ckpt.save_checkpoint(tmp_path, 5, {"w": torch.full((2, 2), 7.0)}, {"w": torch.zeros(2, 2)}, {"step": 5, "again": 1},
                         Config(), keep_last=2)
    assert torch.equal(load_file(step / "model.safetensors")["w"], torch.full((2, 2), 7.0))
    assert torch.equal(load_file(step / "ema.safetensors")["w"], torch.zeros(2, 2))
    assert torch.load(step / "state.pt", weights_only=True) == {"step": 5, "again": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000005"]


def test_prune_removes_what_killed_saves_left_behind(tmp_path):
    _save(tmp_path, 1)
    ckpts = tmp_path / "checkpoints"
    for stray in (".tmp-step_0000002-123", ".old-step_0000001-456"):
        (ckpts / stray).mkdir()
    (ckpts / "step_notes").mkdir()  # not a step directory: neither counted nor removed
    (ckpts / "step_0000000").write_text("a file, not a step directory")
    (ckpts / ".tmp-step_0000009-789").write_text("")  # debris that rmtree cannot take never fails a save
    ckpt.prune(ckpts, keep_last=1)
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step_0000009-789", "latest", "step_0000000",
                                                      "step_0000001", "step_notes"]
    (ckpts / ".tmp-step_0000009-789").unlink()
    _save(tmp_path, 2, keep=1)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000000", "step_0000002", "step_notes"]
    _save(tmp_path, 3, keep=0)
    (ckpts / "latest").unlink()  # without a pointer, the newest k stay
    ckpt.prune(ckpts, keep_last=1)
    assert sorted(p.name for p in ckpts.glob("step_0*")) == ["step_0000000", "step_0000003"]


def test_sorted_metadata_is_a_valid_file_whatever_the_insertion_order(tmp_path):
    from safetensors.torch import save

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, dtype=torch.int64)}
    for meta in ({"z": "1", "a": "22", "m": "333"}, {"m": "333", "z": "1", "a": "22"}, None):
        blob = ckpt._sorted_metadata(save(tensors, metadata=meta))
        n = int.from_bytes(blob[:8], "little")
        assert n % 8 == 0 and blob[8 + n - 1:8 + n] in (b"}", b" ")
        (tmp_path / "f.safetensors").write_bytes(blob)
        with safe_open(tmp_path / "f.safetensors", "pt") as f:
            assert f.metadata() == meta and sorted(f.keys()) == ["a", "b"]
            assert torch.equal(f.get_tensor("b"), torch.arange(3.0)) and torch.equal(f.get_tensor("a"), torch.ones(2, dtype=torch.int64))
        if meta:
            header = blob[8:8 + n].decode()
            assert header.index('"a"') < header.index('"m"') < header.index('"z"')
    assert ckpt._sorted_metadata(save(tensors, metadata={"z": "1", "a": "2"})) == \
        ckpt._sorted_metadata(save(tensors, metadata={"a": "2", "z": "1"}))


def test_integer_buffers_do_not_count_as_non_finite_and_ema_is_checked_too(tmp_path):
    sd = {"w": torch.ones(2), "count": torch.tensor([3], dtype=torch.int64)}
    ckpt.save_checkpoint(tmp_path, 1, sd, dict(sd), {}, Config())  # int tensors have no NaN to look for
    with pytest.raises(DitlabError, match=r"the EMA weights hold NaN or Inf \(w\)"):
        ckpt.save_checkpoint(tmp_path, 2, sd, {"w": torch.tensor([1.0, float("-inf")]), "count": sd["count"]}, {}, Config())
    assert runs.latest_checkpoint(tmp_path).name == "step_0000001"


def test_last_good_names_the_checkpoint_before_the_bad_step(tmp_path):
    for step in (2, 4, 6, 1_234_567):  # (the last fills every digit of the name)
        _save(tmp_path, step, keep=0)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_notes").mkdir()  # not steps: ignored
    (ckpts / "step_x1").mkdir()
    assert ckpt.last_good(tmp_path, 5) == f"last good checkpoint: {ckpts / 'step_0000004'}"
    assert ckpt.last_good(tmp_path, 7) == f"last good checkpoint: {ckpts / 'step_0000006'}"
    assert ckpt.last_good(tmp_path, 2_000_000) == f"last good checkpoint: {ckpts / 'step_1234567'}"
    assert ckpt.last_good(tmp_path, 6) == (f"last good checkpoint: {ckpts / 'step_0000004'}; step_0000006 holds the "
                                           "weights that gave it, resume from the good one")
    assert ckpt.last_good(tmp_path, 2).startswith("last good checkpoint: none; step_0000002 holds")
    assert ckpt.last_good(tmp_path / "elsewhere", 3) == "last good checkpoint: none"


def test_a_save_that_fails_otherwise_names_the_cause_in_one_line(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt, "write_bytes_synced", read_only)
    with pytest.raises(DitlabError) as e:
        _save(tmp_path, 2)
    assert "(Read-only file system)" in str(e.value) and "disk full" not in str(e.value)
    assert "step_0000001 is intact" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]
    # a run folder that cannot hold a checkpoints folder (a file stands there): one line, nothing half-made
    monkeypatch.undo()
    (tmp_path / "blocked").write_text("")
    with pytest.raises(DitlabError, match="no earlier checkpoint exists"):
        _save(tmp_path / "blocked", 1)
