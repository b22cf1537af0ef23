"""The trainer: CLI run layout, exact resume, EMA/LR schedules, time budget, non-finite loss, bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.config import load_config
from ditlab.train.ema import EMA
from ditlab.train.order import StepSampler
from ditlab.train.trainer import Trainer

TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    "objective.kind=flow", "objective.time_sampling=logit_normal", "optim.batch_size=8", "optim.lr=1e-3",
    "optim.warmup_steps=3", "optim.grad_clip=1.0", "train.ema_decay=0.99", "train.tensorboard=false",
    "train.progress=false", "train.log_every=2", "sample.sampler=euler", "sample.steps=2", "sample.num_samples=10",
]


def tiny(out: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.out_dir={out}", *extra]


def test_train_cli_writes_run_layout(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", *tiny(run, "train.steps=4", "train.ckpt_every=2", "train.keep_last=1", "optim.lr=2e-4",
                             "train.tensorboard=true")])
    assert rc == 0, capsys.readouterr().err
    saved = load_config(run / "config.yaml")
    assert saved.optim.lr == 2e-4 and saved.model.hidden_size == 32  # the resolved config, overrides applied
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000004"]  # keep_last=1 pruned step 2
    step = ckpts / "step_0000004"
    assert {p.name for p in step.iterdir()} == {"model.safetensors", "ema.safetensors", "state.pt", "config.yaml"}
    assert load_config(step / "config.yaml").optim.lr == 2e-4
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(math.isfinite(float(r["loss"])) and float(r["img_per_s"]) > 0 for r in rows)
    assert float(rows[0]["lr"]) == pytest.approx(2e-4 * 2 / 3)  # linear warm-up over 3 steps, logged at step 2
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "samples" / "step_0000004.png").is_file()
    assert "step 4" in capsys.readouterr().out


def _weights(step_dir: Path) -> tuple[dict, dict, dict]:
    state = torch.load(step_dir / "state.pt", weights_only=True)
    return load_file(step_dir / "model.safetensors"), load_file(step_dir / "ema.safetensors"), state["optimizer"]


def test_resume_is_bit_identical(tmp_path):
    # Random flip and label dropout draw from the RNGs too: all of it must replay exactly.
    extra = ["data.random_flip=true", "model.class_dropout_prob=0.3", "train.ckpt_every=3"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["train", *tiny(full, "train.steps=6", *extra)]) == 0
    assert main(["train", *tiny(half, "train.steps=3", *extra)]) == 0
    # A fresh Trainer (as after a kill) resumes from the step-3 checkpoint.
    assert main(["train", *tiny(half, "train.steps=6", *extra), "--resume"]) == 0
    a = _weights(full / "checkpoints" / "step_0000006")
    b = _weights(half / "checkpoints" / "step_0000006")
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for s, t in zip(a[2]["state"].values(), b[2]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in s)
    # ... and the resumed half did train: its weights moved away from the step-3 checkpoint.
    mid = load_file(half / "checkpoints" / "step_0000003" / "model.safetensors")
    assert any(not torch.equal(mid[k], b[0][k]) for k in mid)
    losses = {r["step"]: r["loss"] for r in csv.DictReader(open(full / "log.csv"))}
    resumed = {r["step"]: r["loss"] for r in csv.DictReader(open(half / "log.csv"))}
    assert resumed["3"] and losses["2"] == resumed["2"] and losses["6"] == resumed["6"]  # same mean loss of steps 5-6


def test_step_sampler_is_a_seeded_permutation_per_epoch():
    order = StepSampler(num_samples=10, global_batch=4, seed=3)
    stream = torch.cat([order.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # each epoch has its own order
    assert torch.equal(StepSampler(10, 4, 3).indices(3), order.indices(3))  # resume = recompute from the step
    assert not torch.equal(StepSampler(10, 4, 4).indices(0), order.indices(0))
    assert order.position(3) == {"epoch": 1, "offset": 2, "step": 3}


def test_ema_warmup_matches_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.999, warmup=True)
    expected = 0.0
    with torch.no_grad():
        model.weight.fill_(1.0)
    for n in range(20):
        d = min(0.999, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * 1.0
        ema.update(model)
    assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)
    # Without warm-up the zero init keeps d^n of the average (the field notes' 0.999^1400 ~ 25%).
    plain = EMA(torch.nn.Linear(1, 1, bias=False).requires_grad_(False), decay=0.999, warmup=False)
    plain.model.weight.data.fill_(0.0)
    src = torch.nn.Linear(1, 1, bias=False)
    src.weight.data.fill_(1.0)
    for _ in range(1400):
        plain.update(src)
    assert 1 - plain.model.weight.item() == pytest.approx(0.999**1400, rel=1e-3)


def test_time_budget_stops_training(tmp_path):
    cfg = load_config(None, tiny(tmp_path / "run", "train.steps=1000", "train.time_budget_s=0"))
    result = Trainer(cfg).train(final_samples=False)
    assert result.stopped == "time_budget" and result.step == 1
    assert (tmp_path / "run" / "checkpoints" / "step_0000001" / "ema.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    from ditlab.objectives.flow import FlowObjective

    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2", "train.ckpt_every=2")]) == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_0000002").iterdir()}
    real = FlowObjective.loss
    calls = {"n": 0}

    def nan_after_one(self, model, x0, y, *, generator=None):
        calls["n"] += 1
        out = real(self, model, x0, y, generator=generator)
        return {**out, "loss": out["loss"] * float("nan")} if calls["n"] > 1 else out

    monkeypatch.setattr(FlowObjective, "loss", nan_after_one)
    capsys.readouterr()
    assert main(["train", *tiny(run, "train.steps=6", "train.ckpt_every=1"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss") and "step 4" in err and len(err.splitlines()) == 1
    # Step 3 was good and saved; the NaN step saved nothing and step 3 stays the latest.
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not (run / "checkpoints" / "step_0000004").exists()
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_0000002").iterdir()} == before


@pytest.mark.parametrize("extra, message", [
    (["data.image_size=32"], "has 28x28 images but data.image_size is 32"),
    (["model.input_size=32"], "but the model expects [1, 32, 32]"),
    (["model.num_classes=5"], "data has labels 0..9 but model.num_classes is 5"),
    (["train.precision=bf16"], "needs CUDA"),
    (["optim.batch_size=7", "train.grad_accum=2"], "not divisible"),
    (["data.source=nope"], "unknown data.source 'nope'"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, extra, message):
    assert main(["train", *tiny(tmp_path / "run", "train.steps=1", *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", *tiny(blocker / "run", "train.steps=1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not writable" in err and len(err.splitlines()) == 1


def test_existing_run_needs_resume_and_matching_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2")]) == 0
    capsys.readouterr()
    assert main(["train", *tiny(run, "train.steps=4")]) == 2  # would overwrite: refuse
    assert "pass --resume" in capsys.readouterr().err
    # Resuming with another architecture names the changed setting in one line (before loading weights).
    assert main(["train", *tiny(run, "train.steps=4", "model.hidden_size=48"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "would change the experiment" in err and "model.hidden_size: 32 -> 48" in err and len(err.splitlines()) == 1
    assert main(["train", *tiny(tmp_path / "empty", "train.steps=1"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_quickstart_cli_writes_class_grid_and_npz(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--budget", "0.5", "--threads", "1", "model.hidden_size=32",
               "model.depth=1", "model.num_heads=2", "sample.steps=2", "train.tensorboard=false",
               "train.progress=false"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert str(out / "quickstart_grid.png") in text and str(out / "quickstart_samples.npz") in text
    with np.load(out / "quickstart_samples.npz") as f:
        assert f["arr_0"].shape == (100, 28, 28, 1) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [c for c in range(10) for _ in range(10)]  # row = class
    assert Image.open(out / "quickstart_grid.png").size == (10 * 30 + 2, 10 * 30 + 2)
    assert (out / "checkpoints" / "latest").is_file() and load_config(out / "config.yaml").objective.kind == "flow"
    # A model trained for half a second draws no recognisable digit: both probes fail, the grid takes 5.
    assert "guidance 2: the classifier recognises" in text and "guidance 3: the classifier recognises" in text
    assert "sampled at guidance 5 in" in text and f"--ckpt {out} --cfg-scale 5" in text
    assert load_config(out / "config.yaml").sample.cfg_scale == 5.0


def test_quickstart_explicit_guidance_skips_the_probe(tmp_path, capsys):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--threads", "1", "model.hidden_size=32", "model.depth=1",
               "model.num_heads=2", "sample.steps=2", "train.steps=1", "train.time_budget_s=null",
               "train.tensorboard=false", "train.progress=false", "sample.cfg_scale=1.5"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "probe" not in text and "sampled at guidance 1.5 in" in text
    assert load_config(out / "config.yaml").sample.cfg_scale == 1.5


def test_data_workers_do_not_change_the_run(tmp_path):
    # Flips and noise are seeded in the main process per (step, micro-batch), so workers only load.
    for w in (0, 2):
        assert main(["train", *tiny(tmp_path / f"w{w}", "train.steps=3", f"data.num_workers={w}",
                                    "data.random_flip=true")]) == 0
    a, b = (load_file(tmp_path / f"w{w}" / "checkpoints" / "step_0000003" / "model.safetensors") for w in (0, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
