"""Byte corpora (split by position, .gz cache, batches) and bits-per-byte evaluation."""

from __future__ import annotations

import gzip
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditlab.data.text import (ByteCorpus, TextWindows, default_cache_dir, default_text_path, load_bytes, random_batch,
                              sequential_batches, split_bounds)
from ditlab.errors import DitlabError
from ditlab.eval.lm import bits_per_byte, bpb_by_position
from ditlab.models.lm import build_lm

DATA = Path(os.environ.get("DITLAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
GCIDE = DATA / "text" / "gcide.txt.gz"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus_file(tmp_path):
    content = np.random.default_rng(0).integers(0, 256, size=1013, dtype=np.uint8).tobytes()
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return path, content


def test_splits_tile_the_file_in_order(corpus_file, tmp_path):
    path, content = corpus_file
    parts = [ByteCorpus(path, split, cache_dir=tmp_path / "cache") for split in ("train", "val", "test")]
    assert [len(p) for p in parts] == [911, 51, 51]  # 1013 * 0.9 = 911.7, 1013 * 0.95 = 962.35
    assert b"".join(p.data.tobytes() for p in parts) == content
    again = ByteCorpus(path, "val")
    assert again.data.tobytes() == parts[1].data.tobytes()
    assert split_bounds(10**8) == {"train": (0, 90_000_000), "val": (90_000_000, 95_000_000),
                                   "test": (95_000_000, 100_000_000)}  # enwik8's 90M/5M/5M


def test_gz_is_decompressed_once_into_a_keyed_cache(corpus_file, tmp_path, monkeypatch):
    path, content = corpus_file
    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(gzip.compress(content))
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    assert ByteCorpus(gz, "train").data.tobytes() == content[:911]
    cached = list((tmp_path / "cache" / "text").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == content  # no temporary files left behind

    def fail(*args, **kwargs):
        raise AssertionError("decompressed twice")

    monkeypatch.setattr(gzip, "open", fail)
    assert ByteCorpus(gz, "test").data.tobytes() == content[962:]  # read from the cache
    monkeypatch.undo()

    # a changed source (size, mtime) gets a fresh cache file
    gz.write_bytes(gzip.compress(content[::-1]))
    os.utime(gz, ns=(1_000_000_000, 1_000_000_000))
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    assert load_bytes(gz).tobytes() == content[::-1]
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2


def test_missing_empty_or_broken_files_raise_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.txt.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    (tmp_path / "tiny.txt").write_bytes(b"abcde")  # its val split is empty
    cases = [(tmp_path / "missing.txt", "train", "not found"), (tmp_path / "empty.txt", "train", "empty"),
             (tmp_path / "empty.txt.gz", "train", "empty"), (tmp_path / "broken.gz", "train", "decompress"),
             (tmp_path / "tiny.txt", "val", "split holds only"), (tmp_path / "tiny.txt", "dev", "unknown split")]
    for path, split, message in cases:
        with pytest.raises(DitlabError, match=message) as info:
            ByteCorpus(path, split, cache_dir=tmp_path / "cache")
        assert "\n" not in str(info.value)
    assert not [p for p in (tmp_path / "cache" / "text").iterdir() if p.suffix == ".tmp"]
    monkeypatch.delenv("DITLAB_DATA", raising=False)
    with pytest.raises(DitlabError, match="DITLAB_DATA"):
        ByteCorpus()


def test_random_batches_are_seeded_windows_of_the_split(corpus_file):
    path, content = corpus_file
    corpus = ByteCorpus(path, "train")
    x, y = corpus.random_batch(6, 16, torch.Generator().manual_seed(5))
    x2, y2 = corpus.random_batch(6, 16, torch.Generator().manual_seed(5))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    train = content[:911]
    for xi, yi in zip(x.tolist(), y.tolist()):
        window = bytes(xi + yi[-1:])
        assert bytes(yi) == window[1:] and window in train
    with pytest.raises(DitlabError, match="fewer than one window"):
        random_batch(np.zeros(16, dtype=np.uint8), 1, 16, torch.Generator())


@pytest.mark.parametrize("n", [1, 2, 33, 65, 100])
def test_sequential_batches_predict_every_byte_once_in_order(n):
    data = np.arange(n, dtype=np.int64).astype(np.uint8)
    batches = list(sequential_batches(data, seq_len=8, batch_size=3))
    xs = [int(v) for x, _ in batches for v in x.flatten()]
    ys = [int(v) for _, y in batches for v in y.flatten()]
    assert xs == list(range(n - 1)) and ys == list(range(1, n))
    full = list(sequential_batches(data, seq_len=8, batch_size=3, drop_last=True))
    assert sum(len(x) for x, _ in full) == (n - 1) // 8 and all(x.shape[1] == 8 for x, _ in full)
    limited = list(sequential_batches(data, seq_len=8, batch_size=3, max_bytes=20))
    assert [int(v) for _, y in limited for v in y.flatten()] == list(range(1, min(n, 20)))


def test_default_corpus_and_cache_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_DATA", str(tmp_path / "data"))
    assert default_text_path() == tmp_path / "data" / "text" / "gcide.txt.gz"
    monkeypatch.delenv("DITLAB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ditlab"
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"


def test_a_failed_decompression_leaves_no_temporary_file(tmp_path, monkeypatch):
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"some text that is cut short")[:-12])
    with pytest.raises(DitlabError, match="cannot decompress"):
        load_bytes(broken, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "text").iterdir()) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    good = tmp_path / "good.txt.gz"
    good.write_bytes(gzip.compress(b"some text"))
    monkeypatch.setattr(shutil, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not swallowed, and nothing half-written is left
        load_bytes(good, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "text").iterdir()) == []


def _bytes_file(tmp_path, n: int) -> Path:
    path = tmp_path / f"c{n}.txt"
    path.write_bytes(bytes(range(n)))
    return path


def test_smallest_splits_windows_and_batches(tmp_path):
    """The boundaries: a split of 2 bytes (one input-target pair), exactly one window, a window count
    from split length L k and L k + 1, random windows that may start at 0 and end at the last byte."""
    data = load_bytes(_bytes_file(tmp_path, 40))
    assert data.dtype == np.uint8 and not data.flags.writeable  # a read-only memmap
    val = ByteCorpus(_bytes_file(tmp_path, 40), "val")  # bytes [36, 38)
    assert val.data.tolist() == [36, 37]
    assert repr(val) == f"ByteCorpus({str(tmp_path / 'c40.txt')!r}, split='val', 2 bytes)"
    with pytest.raises(DitlabError, match="the val split holds only 1 byte"):
        ByteCorpus(_bytes_file(tmp_path, 20), "val")  # bytes [18, 19)

    # train splits of 12, 13 and 5 bytes (n * 9 // 10), windows of 4 bytes
    assert len(TextWindows(ByteCorpus(_bytes_file(tmp_path, 14)), 4)) == 2  # 11 targets: 2 full windows
    assert len(TextWindows(ByteCorpus(_bytes_file(tmp_path, 15)), 4)) == 3  # 12 targets: 3
    one = TextWindows(ByteCorpus(_bytes_file(tmp_path, 6)), 4)
    assert len(one) == 1 and [t.tolist() for t in one[0]] == [[0, 1, 2, 3], [1, 2, 3, 4]]
    with pytest.raises(DitlabError, match="fewer than one window"):
        TextWindows(ByteCorpus(_bytes_file(tmp_path, 5)), 4)  # 4 bytes, 3 targets

    exact = np.arange(5, dtype=np.uint8)
    x, y = random_batch(exact, 3, 4, torch.Generator().manual_seed(0))  # only one window fits
    assert x.tolist() == [[0, 1, 2, 3]] * 3 and y.tolist() == [[1, 2, 3, 4]] * 3
    x, _ = random_batch(np.arange(6, dtype=np.uint8), 64, 4, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1}  # both offsets drawn

    assert list(sequential_batches(np.zeros(0, dtype=np.uint8), 4, 2)) == []
    pairs = list(sequential_batches(np.arange(2, dtype=np.uint8), 1, 2, drop_last=True))
    assert [(x.tolist(), y.tolist()) for x, y in pairs] == [([[0]], [[1]])]
    corpus = ByteCorpus(_bytes_file(tmp_path, 40))
    own = [(x.tolist(), y.tolist()) for x, y in corpus.sequential_batches(5, 2, max_bytes=33)]
    assert own == [(x.tolist(), y.tolist()) for x, y in sequential_batches(corpus.data, 5, 2, 33, False)]
    assert own[-1] == ([[30, 31]], [[31, 32]])  # the tail comes by default


class UniformLM(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, 256)


def test_uniform_model_scores_exactly_8_bits_per_byte():
    data = np.random.default_rng(1).integers(0, 256, size=1001, dtype=np.uint8)
    # float32 ln(256) is correctly rounded (relative error <= 2^-24); the sum is in float64
    assert abs(bits_per_byte(UniformLM(), data, seq_len=64, batch_size=4) - 8.0) <= 8 * 2.0**-23
    # the same through a real model whose (tied) embedding is zero: its logits are all zero
    model = build_lm(seq_len=64, d_model=16, n_layers=1, n_heads=2)
    with torch.no_grad():
        model.wte.weight.zero_()
    assert abs(bits_per_byte(model, data, seq_len=64, batch_size=4) - 8.0) <= 8 * 2.0**-23
    assert np.all(np.abs(bpb_by_position(UniformLM(), data, 64, 4) - 8.0) <= 8 * 2.0**-23)


def test_bits_per_byte_equals_a_window_by_window_reference():
    torch.manual_seed(0)
    model = build_lm(seq_len=16, d_model=16, n_layers=1, n_heads=2, attention="infini", segment_len=4).double()
    data = np.frombuffer(b"a small corpus of english text, repeated. " * 3, dtype=np.uint8)
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data) - 1, 16):  # windows of 16 targets, each from its own start
            window = torch.tensor(data[start:start + 17], dtype=torch.int64)
            logits = model(window[None, :-1])[0]
            nats += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    assert count == len(data) - 1
    assert bits_per_byte(model, data, seq_len=16, batch_size=3) == pytest.approx(nats / count / math.log(2), rel=1e-12)
    assert model.training  # evaluation restores the mode

    # by position: full windows only; the mean over positions is the bits per byte of those windows
    per_pos = bpb_by_position(model, data, seq_len=16, batch_size=3)
    n_full = (len(data) - 1) // 16
    assert per_pos.shape == (16,)
    assert per_pos.mean() == pytest.approx(bits_per_byte(model, data[:n_full * 16 + 1], 16, 3), rel=1e-12)
    # with the memory reset each segment, the first segment is unchanged and later ones differ
    reset = bpb_by_position(model, data, seq_len=16, batch_size=3, memory=False)
    np.testing.assert_allclose(reset[:4], per_pos[:4], rtol=1e-12)
    assert np.abs(reset[4:] - per_pos[4:]).max() > 1e-6


@pytest.mark.skipif(not GCIDE.is_file(), reason="shared GCIDE corpus not present")
def test_gcide_corpus(tmp_path):
    train = ByteCorpus(GCIDE, "train", cache_dir=tmp_path)
    test = ByteCorpus(GCIDE, "test", cache_dir=tmp_path)
    n = 39_952_321  # documented in shared/data/README.md
    assert len(train) == n * 9 // 10 and len(test) == n - n * 19 // 20
    assert np.count_nonzero(np.bincount(train.data, minlength=256)) <= 99
