"""Writing checkpoints: atomic step directories, a `latest` pointer, keep-last-k.

A step directory (layout: `ditlab.runs`) is written under a temporary name (every file
fsync'ed), then renamed into place; `latest` is replaced by an atomic rename only after that.
A kill or a full disk during a save therefore leaves at worst a stray `.tmp-*` directory,
never a broken latest checkpoint. Weights holding NaN or Inf are never saved (a diverged run
would otherwise overwrite its good checkpoints with poisoned ones), and the files are
byte-identical between identical runs (sorted safetensors metadata, seeded RNG states).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ditlab.config import Config, config_yaml
from ditlab.errors import DitlabError
from ditlab.io import fsync_dir, write_atomic, write_bytes_synced
from ditlab.runs import CHECKPOINTS, LATEST, latest_checkpoint, step_dir_name


def _checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """The steps of the step directories in RUN/checkpoints, in order (other names ignored)."""
    steps = []
    for d in ckpt_dir.glob("step_*"):
        if d.is_dir() and d.name[5:].isdigit():
            steps.append(int(d.name[5:]))
    return sorted(steps)


def last_good(run_dir: str | Path, step: int) -> str:
    """'last good checkpoint: ...' for a run whose loss turned non-finite on the weights of `step`.

    A checkpoint before `step` is good: its weights went on to give a finite loss. The one at
    `step` (if saved) holds the very weights that gave the non-finite loss, so it is not named good.
    """
    steps = _checkpoint_steps(Path(run_dir) / CHECKPOINTS)
    good = [s for s in steps if s < step]
    text = f"last good checkpoint: {Path(run_dir) / CHECKPOINTS / step_dir_name(good[-1]) if good else 'none'}"
    if step in steps:
        text += f"; {step_dir_name(step)} holds the weights that gave it, resume from the good one"
    return text


def _first_non_finite(sd: dict[str, Tensor]) -> str | None:
    for k, v in sd.items():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def _sorted_metadata(blob: bytes) -> bytes:
    """The safetensors file `blob` with its `__metadata__` keys in sorted order.

    safetensors keeps metadata in a hash map, so its order (and the file's bytes) changes from
    process to process; tensors and their offsets are already ordered. The header is rewritten
    as the format specifies it: JSON, space-padded to a multiple of 8 bytes, after its length.
    """
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


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
    for what, sd in (("model", model_sd), ("EMA", ema_sd)):
        bad = _first_non_finite(sd)
        if bad is not None:
            raise DitlabError(f"refusing to save checkpoint {name}: the {what} weights hold NaN or Inf ({bad}); "
                              f"the run diverged (last good checkpoint: {previous or 'none'}); "
                              "try a lower optim.lr or set optim.grad_clip")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {"format": "pt", "ditlab_step": str(step)}
        write_bytes_synced(tmp / "model.safetensors", _sorted_metadata(safetensors_bytes(_plain(model_sd), metadata=meta)))
        write_bytes_synced(tmp / "ema.safetensors", _sorted_metadata(safetensors_bytes(_plain(ema_sd), metadata=meta)))
        buf = io.BytesIO()
        torch.save(state, buf)
        write_bytes_synced(tmp / "state.pt", buf.getvalue())
        write_bytes_synced(tmp / "config.yaml", config_yaml(cfg).encode())
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside (prune removes it)
            os.replace(final, ckpt_dir / f".old-{name}-{os.getpid()}")
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
        shutil.rmtree(stale, ignore_errors=True)  # a killed save's, or the step a re-save replaced
    if keep_last <= 0:
        return  # 0 = keep everything
    pointer = ckpt_dir / LATEST
    keep = pointer.read_text().strip() if pointer.is_file() else None
    for name in map(step_dir_name, _checkpoint_steps(ckpt_dir)[:-keep_last]):
        if name != keep:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)
