"""Evaluation of byte-level language models: bits per byte, bits per byte by position, a
passkey-retrieval probe for long-context memory, and sampling (`generate`, which lives in
`ditlab.sampling` because the trainer writes text samples with it too).

`model` is any module with `model(x) -> logits [B, T, 256]` for bytes x [B, T] (e.g.
`ditlab.models.lm.ByteLM`); `memory=False` is passed on only to models that take it (Infini).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.data.text import ByteCorpus, sequential_batches
from ditlab.errors import DitlabError
from ditlab.sampling import generate_bytes as generate  # noqa: F401  (part of this module's API)

LN2 = math.log(2.0)

# The passkey task of Mohtashami & Jaggi (2023), also used by the Infini-Attention paper.
PASSKEY_FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_SENTENCE = b" The pass key is {key}. Remember it. "
PASSKEY_QUESTION = b" What is the pass key? The pass key is "


def as_byte_array(data: ByteCorpus | np.ndarray | bytes | Tensor) -> np.ndarray:
    """A 1-D uint8 array from a corpus split, an array, bytes or a tensor of byte values."""
    if isinstance(data, ByteCorpus):
        return data.data
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    if arr.ndim == 1 and arr.dtype == np.uint8:
        return arr
    if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise DitlabError(f"expected a 1-D sequence of byte values, got shape {arr.shape}")
    return arr.astype(np.uint8)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _logits(model: nn.Module, x: Tensor, memory: bool) -> Tensor:
    """The model's logits in at least float32 (the loss of bf16 logits is too coarse to report)."""
    logits = model(x) if memory else model(x, memory=False)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """eval mode (no dropout) and no autograd for the block; the train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def window_bits(model: nn.Module, data: ByteCorpus | np.ndarray | bytes, seq_len: int, batch_size: int,
                max_bytes: int | None = None, memory: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(bits, bytes) per evaluation window, in the protocol of `bits_per_byte`: the per-window
    values give the sampling error of a bits-per-byte estimate."""
    arr = as_byte_array(data)
    device = _device(model)
    bits, counts = [], []
    with _evaluating(model):
        for x, y in sequential_batches(arr, seq_len, batch_size, max_bytes):
            logits = _logits(model, x.to(device), memory)
            nll = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="none")
            bits.append(nll.view(y.shape).double().sum(1).cpu().numpy() / LN2)
            counts.append(np.full(len(y), y.shape[1]))
    if not bits:
        raise DitlabError(f"no bytes to evaluate: the data holds {len(arr)} byte(s)")
    return np.concatenate(bits), np.concatenate(counts)


def bits_per_byte(model: nn.Module, data: ByteCorpus | np.ndarray | bytes, seq_len: int, batch_size: int,
                  max_bytes: int | None = None, memory: bool = True) -> float:
    """Mean next-byte cross-entropy in bits over a whole split (or its first max_bytes bytes).

    Context protocol: the data is cut into non-overlapping windows of seq_len predictions; every
    byte is predicted from the bytes before it *in its own window*, i.e. from the window's start
    (1 .. seq_len bytes of context, (seq_len + 1)/2 on average), never from the previous window.
    Every byte but the first is predicted exactly once; the leftover tail is a shorter window.
    The result is sum(nats) / (count * ln 2), summed in float64.
    """
    bits, counts = window_bits(model, data, seq_len, batch_size, max_bytes, memory)
    return float(bits.sum() / counts.sum())


def bpb_by_position(model: nn.Module, data: ByteCorpus | np.ndarray | bytes, seq_len: int, batch_size: int,
                    max_windows: int | None = None, memory: bool = True) -> np.ndarray:
    """Bits per byte as a function of position in a window: array [seq_len], float64.

    Same non-overlapping windows as `bits_per_byte` (full windows only, the first max_windows of
    them); entry t is the mean over windows of the loss of predicting the byte after position t
    from the t + 1 bytes before it. For an Infini model, seq_len may span many segments; compare
    memory=True with memory=False (memory reset at every segment) to see what the memory adds.
    Averaging the entries over a segment (`.reshape(-1, segment_len).mean(1)`) gives one number
    per segment.
    """
    arr = as_byte_array(data)
    device = _device(model)
    max_bytes = None if max_windows is None else max_windows * seq_len + 1
    sums, n = torch.zeros(seq_len, dtype=torch.float64), 0
    with _evaluating(model):
        for x, y in sequential_batches(arr, seq_len, batch_size, max_bytes, drop_last=True):
            logits = _logits(model, x.to(device), memory)
            nll = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")  # [B, T]
            sums += nll.double().sum(0).cpu()
            n += len(y)
    if n == 0:
        raise DitlabError(f"the data ({len(arr)} bytes) holds no full window of seq_len + 1 = {seq_len + 1} bytes")
    return (sums / n / LN2).numpy()


def memory_use(model: nn.Module, data: ByteCorpus | np.ndarray | bytes, seq_len: int, batch_size: int,
               segment_len: int | None, max_windows: int | None = None) -> dict:
    """Bits per byte by span of the window, with the memory on and (Infini) reset at every segment.

    The spans are the segments of an Infini model (segment_len) or 8 equal spans of a vanilla
    model's window (segment_len None; it has no memory to reset). Where the memory is used, the
    bits per byte of later segments fall below those with the memory reset ("reset" - "memory" > 0).
    Returns {"windows": max_windows, "spans": [{"positions": [a, b], "memory": bpb, "reset": bpb}, ...]}.
    """
    memory = bpb_by_position(model, data, seq_len, batch_size, max_windows)
    reset = bpb_by_position(model, data, seq_len, batch_size, max_windows, memory=False) if segment_len else None
    spans = [(a, min(a + segment_len, seq_len)) for a in range(0, seq_len, segment_len)] if segment_len else \
        [(int(s[0]), int(s[-1]) + 1) for s in np.array_split(np.arange(seq_len), min(8, seq_len))]
    rows = []
    for a, b in spans:
        row = {"positions": [a, b], "memory": float(memory[a:b].mean())}
        if reset is not None:
            row["reset"] = float(reset[a:b].mean())
        rows.append(row)
    return {"windows": max_windows, "spans": rows}


def passkey_sequences(distance: int, n_segments: int, segment_len: int, n_trials: int, n_digits: int = 5,
                      generator: torch.Generator | None = None,
                      filler: bytes = PASSKEY_FILLER) -> tuple[Tensor, list[bytes]]:
    """n_trials passkey sequences of n_segments * segment_len bytes, and their keys.

    Layout: filler text (repeated from a random phase) everywhere; the sentence
    " The pass key is <key>. Remember it. " at a random offset wholly inside segment
    n_segments - 1 - distance; and the sequence ends, inside the last segment, with
    " What is the pass key? The pass key is <key>". distance 0 puts the key in the question's
    own segment, where local attention sees it; distance k >= 1 leaves only the memory to carry
    it across k segment boundaries. Returns tokens int64 [n_trials, T].
    """
    T = n_segments * segment_len
    tail_len = len(PASSKEY_QUESTION) + n_digits
    sentence_len = len(PASSKEY_SENTENCE.replace(b"{key}", b"0" * n_digits))
    if not 0 <= distance < n_segments:
        raise DitlabError(f"passkey distance {distance} is outside 0..{n_segments - 1} (n_segments={n_segments})")
    room = segment_len - sentence_len - (tail_len if distance == 0 else 0)  # last valid offset in the segment
    if tail_len > segment_len or room < 0:
        raise DitlabError(f"segment_len={segment_len} is too short for the passkey sentence and question")
    if not filler:
        raise DitlabError("the passkey filler text is empty")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    key_segment = n_segments - 1 - distance
    rows, keys = [], []
    for _ in range(n_trials):
        key = bytes(b"0123456789"[d] for d in torch.randint(0, 10, (n_digits,), generator=g).tolist())
        phase = int(torch.randint(0, len(filler), (), generator=g))
        seq = bytearray((filler * (T // len(filler) + 2))[phase:phase + T])
        offset = key_segment * segment_len + int(torch.randint(0, room + 1, (), generator=g))
        sentence = PASSKEY_SENTENCE.replace(b"{key}", key)
        seq[offset:offset + len(sentence)] = sentence
        seq[T - tail_len:] = PASSKEY_QUESTION + key
        rows.append(list(seq))
        keys.append(key)
    return torch.tensor(rows, dtype=torch.int64), keys


def passkey_accuracy(model: nn.Module, distances: Sequence[int], n_segments: int, segment_len: int,
                     n_trials: int = 32, n_digits: int = 5, batch_size: int = 8, seed: int = 0,
                     memory: bool = True, filler: bytes = PASSKEY_FILLER) -> dict[int, dict[str, float]]:
    """Passkey retrieval accuracy against distance (in segments) between key and question.

    Scores the key digits with one forward pass (teacher forcing) per sequence:
      "exact": fraction of sequences where the argmax at every digit is the true digit; this is
               exactly the fraction where greedy generation after the question reproduces the key
               (greedy decoding sees the same prefix as long as it has been right);
      "digit": fraction of digits that are the argmax given the true digits before them.
    Every distance uses the same seed, hence the same keys (a paired comparison). For a vanilla
    model, n_segments * segment_len must fit its context.
    """
    device = _device(model)
    T = n_segments * segment_len
    results = {}
    with _evaluating(model):
        for distance in distances:
            tokens, _ = passkey_sequences(distance, n_segments, segment_len, n_trials, n_digits,
                                          torch.Generator().manual_seed(seed), filler)
            correct = []
            for batch in tokens.split(batch_size):
                batch = batch.to(device)
                logits = _logits(model, batch, memory)
                # logits at t predict byte t + 1: the digits T-n..T-1 are predicted at T-n-1..T-2.
                pred = logits[:, T - n_digits - 1:T - 1].argmax(-1)
                correct.append((pred == batch[:, T - n_digits:]).cpu())
            hits = torch.cat(correct)
            results[distance] = {"exact": hits.all(1).float().mean().item(), "digit": hits.float().mean().item()}
    return results
