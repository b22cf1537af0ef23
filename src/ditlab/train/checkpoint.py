"""Checkpoints: atomic step directories, a `latest` pointer, keep-last-k, and path resolution.

    RUN/checkpoints/step_0000500/{model.safetensors, ema.safetensors, state.pt, config.yaml}
    RUN/checkpoints/latest                      text file holding "step_0000500"

A step directory is written under a temporary name (every file fsync'ed), then renamed into
place; `latest` is replaced by an atomic rename only after that. A kill or a full disk during
a save therefore leaves at worst a stray `.tmp-*` directory, never a broken latest checkpoint.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ditlab.errors import DitlabError

LATEST = "latest"
WEIGHT_FILES = ("ema.safetensors", "model.safetensors")  # resolve_checkpoint prefers the EMA


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _write_bytes(path: Path, data: bytes) -> None:
    """The one place checkpoint bytes hit the disk: write, flush, fsync."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: fsync'ed bytes under PATH.tmp, then an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    _write_bytes(tmp, data)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def _plain(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: give it private copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step directory `RUN/checkpoints/latest` points to, or None when there is none."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    step_dir = ckpt_dir / name
    if not name or not step_dir.is_dir():
        raise DitlabError(f"{pointer} points to '{name}', which does not exist")
    return step_dir


def save_checkpoint(run_dir: str | Path, step: int, model_sd: dict[str, Tensor], ema_sd: dict[str, Tensor],
                    state: dict, cfg, keep_last: int = 2) -> Path:
    """Write RUN/checkpoints/step_N atomically, point `latest` at it, prune to the last k."""
    from ditlab.config import config_to_dict

    import yaml

    ckpt_dir = Path(run_dir) / "checkpoints"
    name = step_dir_name(step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    previous = None
    try:
        previous = latest_checkpoint(run_dir)
    except DitlabError:
        pass
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {"format": "pt", "ditlab_step": str(step)}
        _write_bytes(tmp / "model.safetensors", safetensors_bytes(_plain(model_sd), metadata=meta))
        _write_bytes(tmp / "ema.safetensors", safetensors_bytes(_plain(ema_sd), metadata=meta))
        buf = io.BytesIO()
        torch.save(state, buf)
        _write_bytes(tmp / "state.pt", buf.getvalue())
        _write_bytes(tmp / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            old = ckpt_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        write_atomic(ckpt_dir / LATEST, (name + "\n").encode())
        _fsync_dir(ckpt_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise DitlabError(f"could not save checkpoint {name} in {ckpt_dir} ({why}); {kept}") from None
    prune(ckpt_dir, keep_last)
    return final


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step directories (never the one `latest` names)."""
    for stale in list(ckpt_dir.glob(".tmp-step_*")) + list(ckpt_dir.glob(".old-step_*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed half-way
    if keep_last <= 0:
        return  # 0 = keep everything
    pointer = ckpt_dir / LATEST
    keep = pointer.read_text().strip() if pointer.is_file() else None
    steps = sorted(d for d in ckpt_dir.glob("step_*") if d.is_dir())
    for d in steps[:-keep_last]:
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def load_state(step_dir: Path) -> dict:
    path = Path(step_dir) / "state.pt"
    if not path.is_file():
        raise DitlabError(f"checkpoint {step_dir} has no state.pt (cannot resume from weights alone)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DitlabError(f"corrupt checkpoint state {path}: {str(e).splitlines()[0]}") from None


def read_weights(path: str | Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise DitlabError(f"cannot read weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _config_near(weights: Path):
    from ditlab.config import load_config

    for candidate in (weights.parent / "config.yaml", weights.parent.parent.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    return None


def resolve_checkpoint(path: str | Path):
    """(weights file, Config or None) for a run dir, a step dir, `RUN/checkpoints` or a weights file.

    Directories resolve through `latest` to a step directory, where the EMA weights are
    preferred over the raw ones. The config is the step's config.yaml (or the run's).
    """
    path = Path(path)
    if not path.exists():
        raise DitlabError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix == ".safetensors":
            return path, _config_near(path)
        return path, None  # e.g. an official DiT .pt checkpoint: the caller knows its format
    step_dir = path
    if (path / "checkpoints").is_dir():
        step_dir = latest_checkpoint(path)
        if step_dir is None:
            raise DitlabError(f"run {path} has no checkpoint yet")
    elif (path / LATEST).is_file():
        step_dir = latest_checkpoint(path.parent)
    for name in WEIGHT_FILES:
        if (step_dir / name).is_file():
            return step_dir / name, _config_near(step_dir / name)
    raise DitlabError(f"no {' or '.join(WEIGHT_FILES)} in {step_dir}")


def checkpoint_step(weights: str | Path) -> int | None:
    """The training step stored in a ditlab weights file's metadata (None if absent)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            step = (f.metadata() or {}).get("ditlab_step")
    except Exception:
        return None
    return int(step) if step is not None else None
