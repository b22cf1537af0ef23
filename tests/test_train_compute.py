"""Training-compute accounting: train_gflops = 3 x forward Gflops per image x images seen (the DiT
paper's convention), logged, checkpointed, restored on resume, and free of side effects on training."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditlab.config import load_config
from ditlab.eval.flops import gflops
from ditlab.models import build_model
from ditlab.train import trainer as trainer_module
from ditlab.train.trainer import Trainer

BATCH = 4
TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    "objective.kind=flow", "objective.time_sampling=logit_normal", f"optim.batch_size={BATCH}", "optim.lr=1e-3",
    "optim.warmup_steps=2", "train.ema_decay=0.99", "train.tensorboard=false", "train.progress=false",
    "train.log_every=1", "sample.sampler=euler", "sample.steps=2", "sample.num_samples=4",
    "data.random_flip=true", "model.class_dropout_prob=0.3",  # both draw from the RNGs
]


def cfg(out: Path, *extra: str):
    return load_config(None, [*TINY, f"train.out_dir={out}", *extra])


def last_row(run: Path) -> dict:
    return list(csv.DictReader(open(run / "log.csv")))[-1]


def state(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:07d}" / "state.pt", weights_only=True)


def test_train_gflops_is_three_forward_passes_per_image_seen(tmp_path):
    c = cfg(tmp_path / "run", "train.steps=3")
    fwd = gflops(build_model(c).eval())  # the counter on a real CPU model (the trainer counts on meta)
    result = Trainer(c).train(final_samples=False)
    expected = 3 * fwd * BATCH * 3
    assert result.fwd_gflops == pytest.approx(fwd, rel=1e-12) and result.fwd_gflops > 0
    assert result.train_gflops == pytest.approx(expected, rel=1e-12)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [float(r["train_gflops"]) for r in rows] == pytest.approx([3 * fwd * BATCH * s for s in (1, 2, 3)], rel=1e-12)
    st = state(tmp_path / "run", 3)
    assert st["fwd_gflops"] == pytest.approx(fwd, rel=1e-12) and st["train_gflops"] == pytest.approx(expected, rel=1e-12)


def test_resumed_run_counts_the_same_compute(tmp_path):
    full, half, old = tmp_path / "full", tmp_path / "half", tmp_path / "old"
    Trainer(cfg(full, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0")).train(final_samples=False)
    Trainer(cfg(half, "train.steps=2", "train.ckpt_every=2")).train(final_samples=False)
    resumed = Trainer(cfg(half, "train.steps=4", "train.ckpt_every=2"), resume=True).train(final_samples=False)
    assert float(last_row(half)["train_gflops"]) == float(last_row(full)["train_gflops"])
    assert state(half, 4)["train_gflops"] == state(full, 4)["train_gflops"] == resumed.train_gflops
    assert state(half, 2)["train_gflops"] == pytest.approx(state(full, 4)["train_gflops"] / 2, rel=1e-12)

    # A checkpoint of an older version (no train_gflops in state.pt) resumes as if at the current batch.
    Trainer(cfg(old, "train.steps=2", "train.ckpt_every=2")).train(final_samples=False)
    path = old / "checkpoints" / "step_0000002" / "state.pt"
    legacy = torch.load(path, weights_only=True)
    del legacy["fwd_gflops"], legacy["train_gflops"]
    torch.save(legacy, path)
    Trainer(cfg(old, "train.steps=4", "train.ckpt_every=2"), resume=True).train(final_samples=False)
    assert state(old, 4)["train_gflops"] == pytest.approx(state(full, 4)["train_gflops"], rel=1e-12)


def global_rng() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def same_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def greedy_counter(real):
    """The real counter, made to draw from every global RNG as a careless counter might."""
    def count(c):
        torch.rand(7), np.random.rand(7), random.random()
        build_model(c)  # a CPU build: initialises weights from the torch RNG
        return real(c)
    return count


@pytest.mark.parametrize("counter", ["real", "greedy"])
def test_accounting_leaves_training_bit_identical(tmp_path, monkeypatch, counter):
    real = trainer_module.measure_flops
    # The reference: no counting at all (the counter replaced by a constant that touches nothing).
    monkeypatch.setattr(trainer_module, "measure_flops", lambda c: {"gflops": 1.0})
    ref = Trainer(cfg(tmp_path / "ref", "train.steps=2"))
    ref_rng = global_rng()
    ref.train(final_samples=False)
    ref_weights = load_file(tmp_path / "ref" / "checkpoints" / "step_0000002" / "ema.safetensors")

    monkeypatch.setattr(trainer_module, "measure_flops", real if counter == "real" else greedy_counter(real))
    t = Trainer(cfg(tmp_path / "run", "train.steps=2"))
    assert same_rng(global_rng(), ref_rng)  # counting drew nothing that training could see
    assert t.fwd_gflops > 0
    t.train(final_samples=False)
    weights = load_file(tmp_path / "run" / "checkpoints" / "step_0000002" / "ema.safetensors")
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_a_model_the_counter_cannot_trace_trains_uncounted(tmp_path, monkeypatch):
    def untraceable(c):
        torch.rand(3)  # a draw before failing: the RNGs must still be restored
        raise RuntimeError("no meta kernel")

    monkeypatch.setattr(trainer_module, "measure_flops", lambda c: {"gflops": 1.0})
    Trainer(cfg(tmp_path / "ref", "train.steps=2"))
    ref_rng = global_rng()
    monkeypatch.setattr(trainer_module, "measure_flops", untraceable)
    with pytest.warns(UserWarning, match="training compute not counted: RuntimeError: no meta kernel"):
        t = Trainer(cfg(tmp_path / "run", "train.steps=2", "train.ckpt_every=2"))
    assert same_rng(global_rng(), ref_rng)
    result = t.train(final_samples=False)
    assert (result.step, result.fwd_gflops, result.train_gflops) == (2, None, None)
    assert "train_gflops" not in last_row(tmp_path / "run") and state(tmp_path / "run", 2)["train_gflops"] is None
