"""Files: atomic writes, uint8 image conversion, PNG grids and figures, ADM-style .npz sample files.

The .npz layout is the one of OpenAI's ADM evaluation suite (and DiT's sample_ddp.py):
`arr_0` uint8 [N, H, W, C] and `labels` int64 [N] (-1 for samples of an unconditional model).
"""

from __future__ import annotations

import math
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ditlab.errors import DitlabError


def write_bytes_synced(path: Path, data: bytes) -> None:
    """Write, flush and fsync: the bytes are on disk when this returns."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def temp_beside(path: Path) -> Path:
    """A temporary name in `path`'s folder, unique to this call: two processes writing the same file
    (the workers of one results folder) must not write, rename or delete each other's temp file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `path` whole or not at all: fsync'ed bytes under a temp name, then an atomic rename."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        write_bytes_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill must not leave the temp file behind
        raise


def check_writable(path: str | Path) -> Path:
    """Fail now, in one line, when `path` could not be written later: before minutes of work
    whose result would then be lost. Creates nothing (the folders come when the file is written)."""
    path = Path(path)
    if path.is_dir():
        raise DitlabError(f"cannot write {path}: it is a folder")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest folder that exists: the others would be created in it
    if not parent.is_dir():
        raise DitlabError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(path if path.exists() else parent, os.W_OK) or not os.access(parent, os.X_OK):
        raise DitlabError(f"cannot write {path}: permission denied")
    return path


def save_text(path: str | Path, text: str) -> Path:
    """Write a text file (e.g. JSON results) whole or not at all, creating its folder; one-line errors."""
    path = Path(path)
    with _writing(path):
        write_atomic(path, text.encode())
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where the filesystem cannot fsync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1], [N, C, H, W] -> uint8 [N, H, W, C], rounding to the nearest level.

    Same mapping as DiT's sample_ddp.py: clamp(127.5 x + 128, 0, 255) truncated to uint8.
    """
    if x.ndim != 4:
        raise DitlabError(f"to_uint8 expects [N, C, H, W] images, got shape {tuple(x.shape)}")
    x = torch.clamp(127.5 * x.detach().float() + 128.0, 0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images into one [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] image, row-major."""
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = img
    return grid


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Create `path`'s folder; an OS error while writing (read-only folder, full disk, ...) is one line.

    On any failure the folders created for it are removed again (when still empty).
    """
    created = [d for d in path.parents if not d.exists()]  # innermost first
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield
        except BaseException:
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
    except FileExistsError as e:  # mkdir: a folder on the way is a regular file
        raise DitlabError(f"cannot write {path}: {e.filename} is a file, not a folder") from None
    except NotADirectoryError:
        raise DitlabError(f"cannot write {path}: a folder on the way is a file") from None
    except OSError as e:
        raise DitlabError(f"cannot write {path}: {e.strerror or e}") from None


def save_grid(path: str | Path, images: np.ndarray, nrow: int | None = None, labels: list | np.ndarray | None = None) -> Path:
    """Write uint8 [N, H, W, C] images (C = 1 or 3) as a PNG grid; `labels` adds a caption above each cell."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DitlabError(f"save_grid expects uint8 [N, H, W, 1 or 3] images, got {images.dtype} {images.shape}")
    n = len(images)
    nrow = nrow or math.ceil(math.sqrt(n))
    if labels is not None:
        # A white band of `band` pixels on top of each image holds its label.
        band = 12
        banded = np.full((n, images.shape[1] + band, images.shape[2], images.shape[3]), 255, dtype=np.uint8)
        banded[:, band:] = images
        images = banded
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if labels is not None:
        draw = ImageDraw.Draw(img)
        h, w = images.shape[1:3]
        for i, label in enumerate(labels):
            r, col = divmod(i, max(1, min(nrow, n)))
            draw.text((2 + col * (w + 2) + 1, 2 + r * (h + 2)), str(int(label)), fill=0)
    path = Path(path)
    with _writing(path):
        try:
            img.save(path)
        except ValueError as e:  # PIL has no writer for the file extension
            raise DitlabError(f"cannot write {path}: {e}") from None
    return path


@contextmanager
def figure(**subplots: object) -> Iterator[tuple]:
    """(fig, axes) of `plt.subplots(**subplots)` on matplotlib's file-only backend, closed on leaving
    the block whatever happens in it (an open figure holds its memory until the process ends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def save_figure(fig: object, path: str | Path, dpi: int = 90) -> str:
    """Lay out and write a matplotlib figure as PNG, whole or not at all; returns the file's name."""
    from io import BytesIO

    buffer = BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    path = Path(path)
    with _writing(path):
        write_atomic(path, buffer.getvalue())
    return path.name


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | list) -> Path:
    """Write an ADM-style sample file: `arr_0` uint8 [N, H, W, C], `labels` int64 [N]."""
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DitlabError(f"save_npz expects uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise DitlabError(f"save_npz: {len(images)} images but labels of shape {labels.shape}")
    path = Path(path)
    tmp = temp_beside(path)
    with _writing(path):
        try:
            # Through a file object: np.savez would append ".npz" to a name without it, and the
            # caller would then report a file that does not exist. Whole or not at all, as write_atomic.
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=images, labels=labels)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The raw arrays of an ADM-style sample file: (arr_0, labels or arr_1 or None), one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise DitlabError(f"sample file not found: {path}")
    try:
        with np.load(path) as f:
            if "arr_0" not in f.files:
                raise DitlabError(f"{path} has no 'arr_0' array (expected an ADM-style .npz)")
            labels = f["labels"] if "labels" in f.files else (f["arr_1"] if "arr_1" in f.files else None)
            return f["arr_0"], labels
    except DitlabError:
        raise
    except Exception as e:
        raise DitlabError(f"cannot read {path} as .npz: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM-style sample file: (uint8 [N, H, W, C] images, int64 labels or None when absent)."""
    images, labels = read_npz(path)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DitlabError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    return images, None if labels is None else labels.astype(np.int64)
