"""Byte-LM evaluation helpers one by one: inputs, the window protocol's limits, bits per byte by
span of the window, and the passkey probe's layout, randomness and scoring.

References are recomputed window by window in float64 (a float64 model), so they agree with the
batched code to ~1e-15 relative; 1e-12 leaves room for summation order and nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditlab.data.text import ByteCorpus
from ditlab.errors import DitlabError
from ditlab.eval.lm import (
    PASSKEY_QUESTION,
    PASSKEY_SENTENCE,
    as_byte_array,
    bits_per_byte,
    bpb_by_position,
    memory_use,
    passkey_accuracy,
    passkey_sequences,
    window_bits,
)
from ditlab.models.lm import build_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = np.frombuffer(b"a small corpus of english text, repeated with variations. " * 4, dtype=np.uint8)
SENTENCE_LEN = len(PASSKEY_SENTENCE.replace(b"{key}", b"00000"))
TAIL_LEN = len(PASSKEY_QUESTION) + 5


def _infini(seq_len: int = 16):
    torch.manual_seed(0)
    return build_lm(seq_len=seq_len, d_model=16, n_layers=1, n_heads=2, attention="infini", segment_len=4).double()


@torch.no_grad()
def _window_nll(model: nn.Module, data: np.ndarray, seq_len: int, memory: bool = True) -> list[torch.Tensor]:
    """Per-target nats of each full window, one window at a time."""
    out = []
    for start in range(0, len(data) - seq_len, seq_len):
        w = torch.tensor(data[start:start + seq_len + 1], dtype=torch.int64)
        logits = model(w[None, :-1], memory=memory)[0]
        out.append(F.cross_entropy(logits, w[1:], reduction="none"))
    return out


def test_as_byte_array_accepts_bytes_arrays_tensors_and_corpora(tmp_path):
    arr = np.array([0, 7, 255], dtype=np.uint8)
    assert as_byte_array(arr) is arr  # already bytes: no copy
    (tmp_path / "c.txt").write_bytes(bytes(range(200)))
    corpus = ByteCorpus(tmp_path / "c.txt", "train", cache_dir=tmp_path)
    assert as_byte_array(corpus) is corpus.data
    for data in (b"\x00\x07\xff", bytearray(b"\x00\x07\xff"), torch.tensor([0, 7, 255]), np.array([0, 7, 255]),
                 [0.0, 7.0, 255.0]):
        out = as_byte_array(data)
        assert out.dtype == np.uint8 and out.tolist() == [0, 7, 255], type(data)
    assert as_byte_array([]).dtype == np.uint8 and as_byte_array([]).size == 0
    for bad in ([0, 256], [-1, 3], np.zeros((2, 3), dtype=np.uint8), np.zeros((2, 3), dtype=np.int64)):
        with pytest.raises(DitlabError, match="1-D sequence of byte values"):
            as_byte_array(bad)


def test_defaults_evaluate_with_the_memory_and_limits_reach_the_windows():
    model = _infini()
    nll = _window_nll(model, TEXT, 16)
    assert bits_per_byte(model, TEXT, 16, 3) == bits_per_byte(model, TEXT, 16, 3, memory=True)
    assert bits_per_byte(model, TEXT, 16, 3) != bits_per_byte(model, TEXT, 16, 3, memory=False)
    # max_bytes = 3 windows of 16 targets + 1: exactly the first three windows
    bits, counts = window_bits(model, TEXT, 16, 2, max_bytes=49)
    np.testing.assert_allclose(bits, [float(n.sum()) / math.log(2) for n in nll[:3]], rtol=1e-12)
    assert counts.tolist() == [16, 16, 16]
    assert bits_per_byte(model, TEXT, 16, 2, max_bytes=49) == pytest.approx(bits.sum() / 48, rel=1e-12)
    # by position: the mean over the first max_windows full windows, per position, summed in float64
    for windows in (1, 3):
        expected = torch.stack(nll[:windows]).mean(0).numpy() / math.log(2)
        np.testing.assert_allclose(bpb_by_position(model, TEXT, 16, 2, max_windows=windows), expected, rtol=1e-12)
    torch.manual_seed(0)
    one = build_lm(seq_len=1, d_model=16, n_layers=1, n_heads=2).double()  # windows of one target: no slack
    expected = torch.stack(_window_nll(one, TEXT, 1)[:2]).mean(0).numpy() / math.log(2)
    np.testing.assert_allclose(bpb_by_position(one, TEXT, 1, 4, max_windows=2), expected, rtol=1e-12)
    with pytest.raises(DitlabError, match="no full window"):
        bpb_by_position(model, TEXT[:16], 16, 2)  # 16 bytes hold 15 targets
    assert bpb_by_position(model, TEXT[:17], 16, 2).shape == (16,)  # exactly one window


def test_bf16_logits_are_scored_in_float32():
    torch.manual_seed(0)
    model = build_lm(seq_len=16, d_model=16, n_layers=1, n_heads=2).to(torch.bfloat16)
    x = torch.tensor(TEXT[:17], dtype=torch.int64)
    with torch.no_grad():
        logits = model(x[None, :-1])[0].float()
    nats = F.cross_entropy(logits, x[1:], reduction="sum").double().item()
    assert bits_per_byte(model, TEXT[:17], 16, 1) == pytest.approx(nats / 16 / math.log(2), rel=1e-6)
    assert float(window_bits(model, TEXT[:17], 16, 1)[0][0]) == pytest.approx(nats / math.log(2), rel=1e-6)


def test_memory_use_spans():
    model = _infini()
    by_pos = bpb_by_position(model, TEXT, 16, 2, max_windows=4)
    reset = bpb_by_position(model, TEXT, 16, 2, max_windows=4, memory=False)
    use = memory_use(model, TEXT, 16, 2, segment_len=4, max_windows=4)
    assert use["windows"] == 4 and [s["positions"] for s in use["spans"]] == [[0, 4], [4, 8], [8, 12], [12, 16]]
    for span in use["spans"]:
        a, b = span["positions"]
        assert span["memory"] == pytest.approx(by_pos[a:b].mean(), rel=1e-12)
        assert span["reset"] == pytest.approx(reset[a:b].mean(), rel=1e-12)
    assert use["spans"][0]["reset"] == pytest.approx(use["spans"][0]["memory"], rel=1e-12)
    assert use["spans"][3]["reset"] != pytest.approx(use["spans"][3]["memory"], rel=1e-6)
    # a vanilla model: 8 near-equal spans covering the window, no reset
    torch.manual_seed(0)
    vanilla = build_lm(seq_len=12, d_model=16, n_layers=1, n_heads=2).double()
    spans = memory_use(vanilla, TEXT, 12, 2, segment_len=None, max_windows=2)["spans"]
    assert [s["positions"] for s in spans] == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 9], [9, 10], [10, 11], [11, 12]]
    assert all("reset" not in s for s in spans)
    per_pos = bpb_by_position(vanilla, TEXT, 12, 2, max_windows=2)
    assert spans[4]["memory"] == pytest.approx(per_pos[8], rel=1e-12)
    assert len(memory_use(vanilla, TEXT, 5, 2, segment_len=None, max_windows=1)["spans"]) == 5  # fewer positions than 8


def test_passkey_offsets_cover_the_whole_room_and_the_bounds_are_tight():
    # distance >= 1: the question has its own segment; the room is segment_len - sentence_len
    segment_len = TAIL_LEN  # the shortest segment the question fits in
    tokens, keys = passkey_sequences(1, n_segments=3, segment_len=segment_len, n_trials=300,
                                     generator=torch.Generator().manual_seed(0))
    offsets = []
    for row, key in zip(tokens.tolist(), keys):
        offsets.append(bytes(row).find(PASSKEY_SENTENCE.replace(b"{key}", key)) - segment_len)  # in segment 1
    room = segment_len - SENTENCE_LEN
    assert sorted(set(offsets)) == list(range(room + 1))
    # every digit is drawn; keys have 5 digits by default
    assert set(b"".join(keys)) == set(b"0123456789") and all(len(k) == 5 for k in keys)
    # distance 0: sentence and question share the last segment; with no room left the offset is 0
    tokens, keys = passkey_sequences(0, n_segments=2, segment_len=SENTENCE_LEN + TAIL_LEN, n_trials=3)
    assert all(bytes(r)[SENTENCE_LEN + TAIL_LEN:].startswith(b" The pass key is " + k) for r, k in zip(tokens.tolist(), keys))
    for distance, segment_len in ((0, SENTENCE_LEN + TAIL_LEN - 1), (1, TAIL_LEN - 1)):
        with pytest.raises(DitlabError, match="too short"):
            passkey_sequences(distance, n_segments=3, segment_len=segment_len, n_trials=1)


def test_passkey_randomness_comes_from_the_generator_only():
    def draw(seed_global: int, generator):
        torch.manual_seed(seed_global)
        return passkey_sequences(1, n_segments=3, segment_len=64, n_trials=20, generator=generator, filler=b"abcd")

    a, b = draw(1, torch.Generator().manual_seed(5)), draw(2, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    default, zero = draw(1, None), draw(2, torch.Generator().manual_seed(0))  # no generator: seed 0
    assert torch.equal(default[0], zero[0]) and not torch.equal(default[0], a[0])
    # the filler starts at a random phase, each of them drawn
    phases = {bytes(row[:1]) for row in passkey_sequences(1, 3, 64, 100, filler=b"abcd")[0].tolist()}
    assert phases == {b"a", b"b", b"c", b"d"}


class _AlternateOracle(nn.Module):
    """Right on every even row of a batch (the key's digits as one-hot logits), all-zero logits
    (argmax byte 0, never a digit) on odd rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, 256)
        logits[0::2, :-1].scatter_(-1, x[0::2, 1:, None], 1.0)  # predicts the true next byte
        return logits


class _Zeros(nn.Module):
    """Always says "0"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, 256)
        logits[..., ord("0")] = 1.0
        return logits


def test_passkey_accuracy_scores_each_sequence_and_digit():
    # batches of 8 (the default) alternate right and wrong rows: half the sequences, half the digits
    scores = passkey_accuracy(_AlternateOracle(), distances=[0, 2], n_segments=3, segment_len=96)
    assert scores == {0: {"exact": 0.5, "digit": 0.5}, 2: {"exact": 0.5, "digit": 0.5}}
    # a model that always says "0": digit accuracy is the share of zeros in the probe's keys
    for kwargs in ({}, dict(seed=4, n_trials=10, n_digits=4)):  # seed 4 draws 5 zeros, seed 0 four
        score = passkey_accuracy(_Zeros(), distances=[1], n_segments=3, segment_len=64, **kwargs)[1]
        got = score["digit"]
        assert score["exact"] == 0.0  # none of these keys is all zeros
        _, keys = passkey_sequences(1, 3, 64, kwargs.get("n_trials", 32), kwargs.get("n_digits", 5),
                                    torch.Generator().manual_seed(kwargs.get("seed", 0)))
        assert got == pytest.approx(b"".join(keys).count(b"0") / len(b"".join(keys)))


# --------------------------------------------------------------------------- generation


class _TwoBytes(nn.Module):
    """No parameters and no max_context: logits ln 1 for "a" and ln 2 for "b", -inf elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*x.shape, 256), float("-inf"))
        logits[..., ord("a")] = 0.0
        logits[..., ord("b")] = math.log(2.0)
        return logits


class _SaysMemory(nn.Module):
    """Says "m" with the memory on, "r" with it reset."""

    def forward(self, x: torch.Tensor, memory: bool = True) -> torch.Tensor:
        logits = torch.zeros(*x.shape, 256)
        logits[..., ord("m" if memory else "r")] = 1.0
        return logits


def test_generate_bytes_defaults_arguments_and_temperature():
    from ditlab.sampling import generate_bytes

    two = [generate_bytes(_TwoBytes(), b"x", 200, generator=torch.Generator().manual_seed(0), **kw)
           for kw in ({}, dict(temperature=1.0), dict(temperature=2.0))]
    assert two[0] == two[1] != two[2]  # temperature 1 by default
    # the memory switch reaches the model, on by default
    says = _SaysMemory()
    assert generate_bytes(says, b"x", 0) == b""
    assert generate_bytes(says, b"x", 3, temperature=0) == b"mmm"
    assert generate_bytes(says, b"x", 3, temperature=0, memory=False) == b"rrr"
    for kwargs in (dict(max_new=-1), dict(top_k=0), dict(temperature=-0.5)):
        with pytest.raises(DitlabError, match="temperature >= 0"):
            generate_bytes(says, b"x", **{"max_new": 3, **kwargs})
    # temperature T samples from softmax(logits / T): P(b) = 2^(1/T) / (1 + 2^(1/T)); 0.8 at T = 0.5
    text = generate_bytes(_TwoBytes(), b"x", 3000, temperature=0.5, generator=torch.Generator().manual_seed(0))
    share = text.count(b"b") / 3000
    assert set(text) <= {ord("a"), ord("b")} and abs(share - 0.8) < 4 * math.sqrt(0.16 / 3000)


class _Bf16Logits(nn.Module):
    """The same spread of bf16 logits over all 256 bytes at every position, as a bf16 model gives."""

    logits = (torch.randn(256, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*x.shape, 256)


def test_bf16_logits_are_sampled_as_their_float32_values():
    from ditlab.sampling import generate_bytes

    # the draws softmax(float32(logits) / T) gives with the same generator, one at a time
    gen, probs = torch.Generator().manual_seed(0), torch.softmax(_Bf16Logits.logits.float() / 1.5, dim=-1)
    expected = bytes(int(torch.multinomial(probs, 1, generator=gen)) for _ in range(2000))
    assert generate_bytes(_Bf16Logits(), b"x", 2000, temperature=1.5, generator=torch.Generator().manual_seed(0)) == expected


def test_generate_text_takes_the_run_settings_unless_given(monkeypatch):
    from types import SimpleNamespace

    import ditlab.sampling as sampling

    calls = []
    monkeypatch.setattr(sampling, "generate_bytes", lambda *args: calls.append(args) or b"")
    sample = SimpleNamespace(top_k=5, seed=7, temperature=0.8, max_new_bytes=9)
    run = SimpleNamespace(cfg=SimpleNamespace(sample=sample), is_language_model=True, model="M", weights=None)

    def state(seed):
        return torch.Generator().manual_seed(seed).get_state()

    sampling.generate_text(run, b"x")
    model, prompt, max_new, temperature, top_k, generator = calls[-1]
    assert (model, prompt, max_new, temperature, top_k) == ("M", b"x", 9, 0.8, 5)
    assert torch.equal(generator.get_state(), state(7))
    sampling.generate_text(run, b"y", max_new=3, temperature=0.1, top_k=2, seed=4)
    assert calls[-1][1:5] == (b"y", 3, 0.1, 2) and torch.equal(calls[-1][5].get_state(), state(4))
    sampling.generate_text(run, b"y", top_k=0)  # 0: all bytes
    assert calls[-1][4] is None
