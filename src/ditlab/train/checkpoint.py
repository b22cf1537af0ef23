"""Writing checkpoints: atomic step directories, a `latest` pointer, keep-last-k.

A step directory (layout: `ditlab.runs`) is written under a temporary name (every file
fsync'ed), then renamed into place; `latest` is replaced by an atomic rename only after that.
A kill or a full disk during a save therefore leaves at worst a stray `.tmp-*` directory,
never a broken latest checkpoint.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ditlab.config import Config, config_yaml
from ditlab.errors import DitlabError
from ditlab.io import fsync_dir, write_atomic, write_bytes_synced
from ditlab.runs import CHECKPOINTS, LATEST, latest_checkpoint, step_dir_name


def _plain(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: give it private copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(run_dir: str | Path, step: int, model_sd: dict[str, Tensor], ema_sd: dict[str, Tensor],
                    state: dict, cfg: Config, keep_last: int = 2) -> Path:
    """Write RUN/checkpoints/step_N atomically, point `latest` at it, prune to the last k."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
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
        write_bytes_synced(tmp / "model.safetensors", safetensors_bytes(_plain(model_sd), metadata=meta))
        write_bytes_synced(tmp / "ema.safetensors", safetensors_bytes(_plain(ema_sd), metadata=meta))
        buf = io.BytesIO()
        torch.save(state, buf)
        write_bytes_synced(tmp / "state.pt", buf.getvalue())
        write_bytes_synced(tmp / "config.yaml", config_yaml(cfg).encode())
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            old = ckpt_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        write_atomic(ckpt_dir / LATEST, (name + "\n").encode())
        fsync_dir(ckpt_dir)
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
