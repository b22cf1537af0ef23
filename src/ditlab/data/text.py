"""Byte-level text corpora as uint8 arrays, split by position as enwik8 is (90% / 5% / 5%).

A plain file is memory-mapped as it is. A .gz file is decompressed once into a cache file
(`$DITLAB_CACHE/text/` or `~/.cache/ditlab/text/`) named after the source's size and mtime, so
an edited source gets a fresh copy; the copy is written to a temporary name and renamed into
place, so an interrupted run never leaves a truncated cache behind. Then it is memory-mapped.

Batches: `random_batch` draws windows of seq_len + 1 bytes at random offsets (training);
`sequential_batches` walks non-overlapping windows from the start (evaluation). In both,
x = window[:-1] and y = window[1:] (int64 [B, seq_len]). `TextWindows` offers the windows of
`sequential_batches` as a Dataset, which is what the trainer reads (data.source=text).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ditlab.errors import DitlabError

SPLITS = ("train", "val", "test")
DEFAULT_TEXT = Path("text") / "gcide.txt.gz"  # under $DITLAB_DATA


def default_text_path() -> Path:
    """$DITLAB_DATA/text/gcide.txt.gz, the corpus of ../shared/data."""
    root = os.environ.get("DITLAB_DATA")
    if not root:
        raise DitlabError("no text corpus given: pass a path or set DITLAB_DATA (e.g. DITLAB_DATA=../shared/data)")
    return Path(root) / DEFAULT_TEXT


def default_cache_dir() -> Path:
    return Path(os.environ.get("DITLAB_CACHE") or Path.home() / ".cache" / "ditlab")


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
    """[start, end) of each split of n bytes: the first 90%, the next 5%, the last 5% (enwik8: 90M/5M/5M)."""
    a, b = n * 9 // 10, n * 19 // 20
    return {"train": (0, a), "val": (a, b), "test": (b, n)}


def _decompressed(path: Path, cache_dir: Path) -> Path:
    """The cache file holding path's decompressed bytes, written on first use."""
    st = path.stat()
    out = cache_dir / "text" / f"{path.name.removesuffix('.gz')}.{st.st_size}.{st.st_mtime_ns}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, f, length=1 << 20)
        os.replace(tmp, out)  # atomic: readers see either no file or the whole file
    except (OSError, EOFError) as e:
        os.unlink(tmp)
        raise DitlabError(f"{path}: cannot decompress ({e})") from None
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def load_bytes(path: str | Path, cache_dir: str | Path | None = None) -> np.ndarray:
    """All bytes of a plain or .gz file as a read-only uint8 memmap."""
    path = Path(path)
    if not path.is_file():
        raise DitlabError(f"text corpus not found: {path}")
    if path.stat().st_size == 0:
        raise DitlabError(f"text corpus is empty: {path}")
    if path.suffix == ".gz":
        path = _decompressed(path, Path(cache_dir) if cache_dir else default_cache_dir())
        if path.stat().st_size == 0:
            raise DitlabError(f"text corpus is empty after decompression: {path}")
    return np.memmap(path, dtype=np.uint8, mode="r")


class ByteCorpus:
    """One split ("train", "val" or "test") of a byte corpus; `data` is a uint8 array (memmap).

    path: a plain or .gz file; default $DITLAB_DATA/text/gcide.txt.gz.
    """

    def __init__(self, path: str | Path | None = None, split: str = "train", cache_dir: str | Path | None = None):
        if split not in SPLITS:
            raise DitlabError(f"unknown split '{split}' (choose one of: {', '.join(SPLITS)})")
        self.path = Path(path) if path is not None else default_text_path()
        self.split = split
        full = load_bytes(self.path, cache_dir)
        start, end = split_bounds(len(full))[split]
        self.data: np.ndarray = full[start:end]
        if len(self.data) < 2:  # not even one (input, target) pair
            raise DitlabError(f"{self.path}: the {split} split holds only {len(self.data)} byte(s) of {len(full)}")

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"ByteCorpus({str(self.path)!r}, split={self.split!r}, {len(self):,} bytes)"

    def random_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return random_batch(self.data, batch_size, seq_len, generator)

    def sequential_batches(self, seq_len: int, batch_size: int, max_bytes: int | None = None,
                           drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        return sequential_batches(self.data, seq_len, batch_size, max_bytes, drop_last)


class TextWindows(Dataset):
    """A corpus split as a map-style dataset of non-overlapping windows, for the trainer.

    Item i is (x, y), int64 [seq_len] each: x = bytes [i L, (i+1) L), y = bytes [i L + 1, (i+1) L + 1)
    with L = seq_len; neighbouring windows share one byte, as in `sequential_batches`, and the
    tail shorter than a window is left out. Being indexable, it trains through the trainer's
    seeded data order (per-epoch permutations of the windows) and resumes exactly. The windows
    start at fixed multiples of seq_len (no random offsets): that keeps the index space small
    (one index per window, not per byte) and the order a pure function of (seed, step).
    """

    def __init__(self, corpus: ByteCorpus, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len
        self.n = (len(corpus) - 1) // seq_len
        if self.n < 1:
            raise DitlabError(f"{corpus.path}: the {corpus.split} split holds {len(corpus)} bytes, fewer than one "
                              f"window of model.lm_seq_len + 1 = {seq_len + 1}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.seq_len
        window = torch.from_numpy(np.asarray(self.corpus.data[start:start + self.seq_len + 1]).astype(np.int64))
        return window[:-1], window[1:]


def random_batch(data: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """batch_size windows of seq_len + 1 bytes at uniformly random offsets drawn from `generator`.

    Returns x, y int64 [batch_size, seq_len] on the CPU with y[:, t] = x[:, t + 1] inside a window.
    """
    n = len(data)
    if n < seq_len + 1:
        raise DitlabError(f"the data holds {n} bytes, fewer than one window of seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator).tolist()
    windows = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def sequential_batches(data: np.ndarray, seq_len: int, batch_size: int, max_bytes: int | None = None,
                       drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows from the start of data[:max_bytes], in order, batch_size at a time.

    Window i covers bytes [i * seq_len, (i + 1) * seq_len] (seq_len + 1 bytes; neighbours share one
    byte, the last target of one window being the first input of the next), so every byte except
    the first is a target exactly once. The leftover tail (fewer than seq_len targets) comes last
    as its own batch of one shorter window, unless drop_last.
    """
    if max_bytes is not None:
        data = data[:max_bytes]
    n_full = (len(data) - 1) // seq_len if len(data) > 1 else 0
    for first in range(0, n_full, batch_size):
        count = min(batch_size, n_full - first)
        chunk = torch.from_numpy(np.asarray(data[first * seq_len: (first + count) * seq_len + 1]).astype(np.int64))
        yield chunk[:-1].view(count, seq_len), chunk[1:].view(count, seq_len)
    tail_start = n_full * seq_len
    if not drop_last and tail_start < len(data) - 1:
        tail = torch.from_numpy(np.asarray(data[tail_start:]).astype(np.int64))
        yield tail[None, :-1], tail[None, 1:]
