"""Checkpoints: layout, keep-last-k, resolve_checkpoint, and saves that fail (disk full, kill)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
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
