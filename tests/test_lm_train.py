"""Byte LMs through the shared trainer: exact resume, the cosine LR schedule, `ditlab lm eval /
generate`, bad input, and the image path left as it was."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.config import load_config
from ditlab.data import build_dataset
from ditlab.data.text import ByteCorpus, sequential_batches
from ditlab.eval.lm import bits_per_byte
from ditlab.runs import load_run
from ditlab.sampling import generate_bytes
from ditlab.train.trainer import Trainer

TINY_LM = [
    "model.hidden_size=16", "model.depth=1", "model.num_heads=2", "model.mlp_ratio=2.0", "model.lm_seq_len=16",
    "optim.batch_size=4", "optim.lr=3e-3", "optim.warmup_steps=2", "optim.grad_clip=1.0", "train.ema_decay=0.9",
    "train.tensorboard=false", "train.progress=false", "train.log_every=2", "sample.max_new_bytes=8",
]
TINY_DIT = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    "objective.kind=flow", "optim.batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=3", "train.ema_decay=0.99",
    "train.tensorboard=false", "train.progress=false", "train.log_every=2", "sample.sampler=euler",
    "sample.steps=2", "sample.num_samples=10",
]
ROOT = Path(__file__).resolve().parents[1]
WORDS = b"the of and a to in is was for that with as by on from noun verb adj. see def. pl. n. v.".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 kB of dictionary-like words: the val split holds 2 kB, 15 windows of 128 bytes."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_bytes(b" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 10_000))[:40_000])
    return path


def lm_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    """`ditlab lm train` arguments: the packaged config shrunk to a tiny model and corpus."""
    return [*TINY_LM, f"data.path={corpus}", f"train.out_dir={out}", *extra]


def _checkpoint(step_dir: Path) -> tuple[dict, dict, dict]:
    state = torch.load(step_dir / "state.pt", weights_only=True)
    return load_file(step_dir / "model.safetensors"), load_file(step_dir / "ema.safetensors"), state["optimizer"]


@pytest.mark.parametrize("arch", [[], ["model.lm_attention=infini", "model.lm_segment_len=4"]],
                         ids=["vanilla", "infini"])
def test_lm_resume_is_bit_identical(tmp_path, corpus, arch):
    # Dropout draws from the global RNG and the cosine schedule depends on the step: both must replay.
    # (decay_steps fixes the schedule's horizon; by default it is train.steps, which differs here.)
    extra = [*arch, "model.lm_dropout=0.1", "optim.lr_schedule=cosine", "optim.min_lr=1e-4", "optim.decay_steps=6",
             "train.ckpt_every=3"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["lm", "train", *lm_args(full, corpus, "train.steps=6", *extra)]) == 0
    assert main(["lm", "train", *lm_args(half, corpus, "train.steps=3", *extra)]) == 0
    assert main(["lm", "train", *lm_args(half, corpus, "train.steps=6", *extra), "--resume"]) == 0
    a, b = _checkpoint(full / "checkpoints" / "step_0000006"), _checkpoint(half / "checkpoints" / "step_0000006")
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for s, t in zip(a[2]["state"].values(), b[2]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in s)
    mid = load_file(half / "checkpoints" / "step_0000003" / "model.safetensors")
    assert any(not torch.equal(mid[k], b[0][k]) for k in mid)  # the resumed half did train
    rows = list(csv.DictReader(open(full / "log.csv")))
    assert {"loss", "bpb", "bytes_per_s", "lr"} <= set(rows[0]) and "img_per_s" not in rows[0]
    assert float(rows[0]["bpb"]) == pytest.approx(float(rows[0]["loss"]) / math.log(2), rel=1e-6)
    assert (full / "samples" / "step_0000006.txt").read_bytes().startswith(b"The ")  # text, not a PNG grid
    assert not list((full / "samples").glob("*.png"))


def test_two_gloo_processes_match_one_with_two_micro_batches(tmp_path, corpus, run_ranks):
    """DDP: 2 ranks x 1 micro-batch read and draw (dropout) what 1 rank x 2 micro-batches do."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    extra = ["train.steps=3", "model.lm_dropout=0.1"]
    assert main(["lm", "train", *lm_args(single, corpus, *extra, "train.grad_accum=2")]) == 0
    run_ranks(["-m", "ditlab", "lm", "train", *lm_args(multi, corpus, *extra)], fresh=multi)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(run / "checkpoints" / "step_0000003" / name) for run in (single, multi))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{name}:{k}")


def test_text_windows_are_the_evaluation_windows(corpus):
    cfg = load_config(None, [*TINY_LM, "model.name=byte-lm", "objective.kind=next-byte", "data.source=text",
                             f"data.path={corpus}", "data.split=val"])
    dataset = build_dataset(cfg)
    x, y = next(sequential_batches(ByteCorpus(corpus, "val").data, 16, batch_size=len(dataset), drop_last=True))
    assert len(dataset) == len(x)
    for i in (0, 1, len(dataset) - 1):
        assert torch.equal(dataset[i][0], x[i]) and torch.equal(dataset[i][1], y[i])


def _recorded_lrs(trainer: Trainer) -> list[float]:
    """The lr the optimizer actually holds at each of its steps."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def test_cosine_schedule_sets_the_closed_form_lr(tmp_path, corpus):
    lr, min_lr, warmup, steps = 3e-3, 1e-4, 3, 11
    cfg = load_config(str(ROOT / "configs" / "lm_gcide.yaml"),
                      lm_args(tmp_path / "run", corpus, f"optim.lr={lr}", f"optim.min_lr={min_lr}",
                              f"optim.warmup_steps={warmup}", f"train.steps={steps}", "train.ckpt_every=0"))
    assert cfg.optim.lr_schedule == "cosine"
    trainer = Trainer(cfg)
    seen = _recorded_lrs(trainer)
    trainer.train(final_samples=False)
    for n, got in enumerate(seen, start=1):  # update n of `steps`
        if n <= warmup:
            want = lr * n / warmup
        else:
            want = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (n - warmup) / (steps - warmup)))
        assert got == pytest.approx(want, rel=1e-12, abs=0), n
    assert len(seen) == steps and seen[warmup - 1] == lr and seen[-1] == pytest.approx(min_lr, rel=1e-12)
    logged = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))}
    assert all(logged[n] == seen[n - 1] for n in logged)


def test_lm_runs_count_their_speed_in_bytes(tmp_path, corpus):
    """batch x lm_seq_len bytes per step: exact in the result; in the log a rate over the last window only,
    held to the same order of magnitude (batch / lm_seq_len instead would be 256x off here)."""
    cfg = load_config(str(ROOT / "configs" / "lm_gcide.yaml"),
                      lm_args(tmp_path / "run", corpus, "train.steps=4", "train.ckpt_every=0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "training compute not counted": the image-model counter is not tried
        trainer = Trainer(cfg)
    result = trainer.train(final_samples=False)
    assert result.bytes_per_s == pytest.approx(result.images_per_s * 16, rel=1e-12)
    assert result.images_per_s == pytest.approx(4 * 4 / result.elapsed_s, rel=1e-12)
    assert result.fwd_gflops is None and result.train_gflops is None  # compute is counted for image models
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert "img_per_s" not in rows[0]
    assert 1 / 16 < float(rows[-1]["bytes_per_s"]) / result.bytes_per_s < 16


def test_image_runs_keep_the_constant_schedule_and_grids(tmp_path):
    """The default schedule is the old one (linear warm-up, then constant), and an image run
    still checks its data, logs img/s and writes PNG grids."""
    cfg = load_config(None, [*TINY_DIT, f"train.out_dir={tmp_path / 'run'}", "train.steps=5", "train.ckpt_every=0"])
    trainer = Trainer(cfg)
    seen = _recorded_lrs(trainer)
    result = trainer.train()
    assert seen == [1e-3 * min(1.0, n / 3) for n in range(1, 6)]
    assert result.bytes_per_s is None and result.images_per_s > 0
    assert "img_per_s" in next(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [p.name for p in (tmp_path / "run" / "samples").iterdir()] == ["step_0000005.png"]


def test_cli_eval_and_generate_on_a_tiny_run(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    infini = ["model.lm_seq_len=128", "model.lm_attention=infini", "model.lm_segment_len=64", "optim.batch_size=2"]
    assert main(["lm", "train", *lm_args(run, corpus, "train.steps=3", *infini)]) == 0
    out = tmp_path / "eval.json"
    assert main(["lm", "eval", "--ckpt", str(run), "--split", "val", "--by-position", "--passkey",
                 "--passkey-trials", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "protocol: non-overlapping windows of 128 bytes" in printed and "2 segment(s) of 64 bytes" in printed
    assert "distance 0 left out" in printed and "distance 1 segment(s)" in printed
    result = json.loads(out.read_text())
    loaded = load_run(run)
    assert result["bits_per_byte"] == pytest.approx(bits_per_byte(loaded.model, ByteCorpus(corpus, "val"), 128, 16),
                                                     rel=1e-12)
    assert [s["positions"] for s in result["by_position"]["spans"]] == [[0, 64], [64, 128]]
    first = result["by_position"]["spans"][0]
    assert first["memory"] == pytest.approx(first["reset"], rel=1e-12)  # the memory is empty in segment 0
    assert set(result["passkey"]["by_distance"]) == {"1"}

    args = ["lm", "generate", "--ckpt", str(run), "--prompt", "the ", "--max-new", "12", "--temperature", "0"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == text  # greedy: the same text again
    want = b"the " + generate_bytes(loaded.model, b"the ", 12, temperature=0)
    assert text.rstrip("\n") == want.decode("utf-8", errors="replace")
    assert main(["lm", "generate", "--ckpt", str(run), "--prompt", "a", "--max-new", "5", "--seed", "1"]) == 0


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["model.norm=batchnorm"], "unknown norm 'batchnorm'"),
    (["model.lm_attention=sparse"], "unknown attention 'sparse'"),
    (["model.lm_attention=infini", "model.lm_segment_len=5"], "model.lm_seq_len=16 is not divisible by model.lm_segment_len=5"),
    (["model.lm_attention=infini"], "model.lm_attention=infini needs model.lm_segment_len"),
    (["model.lm_segment_len=4"], "model.lm_segment_len applies to model.lm_attention=infini only"),
    (["data.path=/nonexistent/corpus.txt"], "text corpus not found: /nonexistent/corpus.txt"),
    (["model.num_classes=0"], "model.num_classes=0 is an image-model setting"),
    (["objective.kind=flow"], "needs model.name=byte-lm, objective.kind=next-byte and data.source=text together"),
    (["optim.min_lr=1e-2"], "optim.min_lr must be in [0, optim.lr=0.003]"),
])
def test_bad_lm_input_is_one_line_exit_2(tmp_path, corpus, capsys, extra, message):
    args = lm_args(tmp_path / "run", corpus, "train.steps=1", *extra)
    if not any(a.startswith("data.path=") for a in extra):
        args.append(f"data.path={corpus}")
    assert main(["lm", "train", *args]) == 2
    assert message in _one_line_error(capsys)


def test_lm_commands_refuse_the_other_kind_of_model(tmp_path, corpus, capsys):
    assert main(["lm", "train", str(ROOT / "configs" / "mnist_flow.yaml")]) == 2
    assert "describes an image model" in _one_line_error(capsys)
    assert main(["lm", "train", "model.name=DiT-S/4"]) == 2  # overrides of the packaged LM config
    assert "needs model.name=byte-lm, objective.kind=next-byte and data.source=text" in _one_line_error(capsys)
    assert main(["train", *TINY_DIT, "sample.prompt=hello"]) == 2
    assert "sample.prompt='hello' is a byte-language-model setting" in _one_line_error(capsys)
    run = tmp_path / "run"
    assert main(["lm", "train", *lm_args(run, corpus, "train.steps=1")]) == 0
    assert main(["sample", "--ckpt", str(run), "--no-progress"]) == 2
    assert "use `ditlab lm generate" in _one_line_error(capsys)
    assert main(["lm", "eval", "--ckpt", str(run), "--max-bytes", "0"]) == 2
    assert "--max-bytes must be >= 1" in _one_line_error(capsys)
    assert main(["lm", "eval", "--ckpt", str(run), "--seq-len", "32"]) == 2
    assert "longer than this vanilla model's context (16 bytes)" in _one_line_error(capsys)
    assert main(["lm", "generate", "--ckpt", str(run), "--prompt", "a", "--temperature", "-1"]) == 2
    assert "temperature >= 0" in _one_line_error(capsys)


def test_repo_lm_config_is_the_packaged_one():
    from ditlab.commands.lm import packaged_config

    assert (ROOT / "configs" / "lm_gcide.yaml").read_text() == packaged_config().read_text()
    cfg = load_config(packaged_config())
    assert cfg.model.name == "byte-lm" and cfg.optim.lr_schedule == "cosine"
