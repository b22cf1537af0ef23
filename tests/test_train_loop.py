"""The training loop's bookkeeping: why it stops, what each log row says, when it saves and samples, and
what a resume reads back from a checkpoint."""

from __future__ import annotations

import csv
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditlab.config import load_config, save_config
from ditlab.errors import DitlabError
from ditlab.train.order import mix_seed
from ditlab.train.stop import STOP_SIGNALS
from ditlab.train.trainer import Trainer

from test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps_of(trainer: Trainer, method: str) -> list[int]:
    """The step at each call of `trainer.<method>` (write_samples, save), which still runs."""
    steps: list[int] = []
    original = getattr(trainer, method)

    def recorded():
        steps.append(trainer.step)
        return original()

    setattr(trainer, method, recorded)
    return steps


def _grids(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "samples").glob("*.png")) if (run / "samples").is_dir() else []


def test_a_stop_request_saves_the_step_it_ended_and_samples_nothing(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny(run, "train.steps=50", "train.ckpt_every=0")))
    samples = _steps_of(trainer, "write_samples")
    update = trainer.ema.update

    def signalled_after_two(model):  # the signal arrives during step 2, as a Ctrl-C would
        update(model)
        if trainer.ema.num_updates == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.ema.update = signalled_after_two
    handler = signal.getsignal(signal.SIGTERM)
    result = trainer.train(final_samples=True)
    assert (result.step, result.stopped, result.signal) == (2, "signal", signal.SIGTERM)
    assert result.checkpoint == run / "checkpoints" / "step_0000002" and result.checkpoint.is_dir()
    assert samples == [] and _grids(run) == []  # a stopped run writes no final grid
    assert signal.getsignal(signal.SIGTERM) is handler  # the handler is given back


def test_a_budget_not_yet_spent_runs_every_step(tmp_path):
    result = Trainer(load_config(None, tiny(tmp_path / "run", "train.steps=3", "train.time_budget_s=3600"))).train(
        final_samples=False)
    assert (result.step, result.stopped) == (3, "steps")


def test_log_rows_carry_the_time_since_the_start(tmp_path):
    run = tmp_path / "run"
    result = Trainer(load_config(None, tiny(run, "train.steps=4", "train.log_every=1"))).train(final_samples=False)
    elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert len(elapsed) == 4 and elapsed == sorted(elapsed)
    assert 0 < elapsed[0] and elapsed[-1] <= result.elapsed_s


@pytest.mark.parametrize("steps, grids", [(4, [2, 4]), (5, [2, 4, 5])])
def test_samples_every_n_steps_and_once_at_the_end(tmp_path, steps, grids):
    """A grid at each multiple of sample_every, plus the last step's unless it was one of them."""
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny(run, f"train.steps={steps}", "train.sample_every=2")))
    samples = _steps_of(trainer, "write_samples")
    trainer.train(final_samples=True)
    assert samples == grids
    assert _grids(run) == [f"step_{s:07d}.png" for s in grids]


def test_no_final_samples_when_asked_for_none(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny(run, "train.steps=3", "train.sample_every=0")))
    samples = _steps_of(trainer, "write_samples")
    trainer.train(final_samples=False)
    assert samples == [] and _grids(run) == []


def test_resuming_a_finished_run_saves_and_samples_nothing(tmp_path):
    run = tmp_path / "run"
    args = tiny(run, "train.steps=2", "train.ckpt_every=0")
    Trainer(load_config(None, args)).train(final_samples=True)
    saved = run / "checkpoints" / "step_0000002"
    stamps = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    again = Trainer(load_config(None, args), resume=True)
    samples = _steps_of(again, "write_samples")
    result = again.train(final_samples=True)
    assert (result.step, result.stopped, result.checkpoint) == (2, "steps", None)
    assert samples == [] and {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == stamps


def test_a_resumed_run_reports_the_speed_of_its_own_steps(tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny(run, "train.steps=3"))).train(final_samples=False)
    result = Trainer(load_config(None, tiny(run, "train.steps=5")), resume=True).train(final_samples=False)
    assert result.step == 5
    assert result.images_per_s == pytest.approx(2 * 8 / result.elapsed_s, rel=1e-12)  # 2 new steps of batch 8


def test_micro_batches_are_seeded_apart_and_their_gradients_averaged(tmp_path):
    """With grad_accum=2: each micro-batch's noise comes from its own seed mix_seed(seed, step, micro),
    the logged loss is the mean of the two losses, and the gradient norm the optimizer clips is that of
    the mean of the two gradients (each taken here independently, by autograd on its own loss)."""
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny(run, "train.steps=2", "train.grad_accum=2", "train.log_every=1",
                                             "train.seed=7")))
    params = [p for p in trainer.raw.parameters() if p.requires_grad]
    seeds, losses, grads, loss = [], [], [], trainer.objective.loss

    def recorded(*args, generator, **kwargs):
        seeds.append(generator.initial_seed())
        out = loss(*args, generator=generator, **kwargs)
        losses.append(out["loss"].item())
        grads.append(torch.autograd.grad(out["loss"], params, retain_graph=True, allow_unused=True))
        return out

    trainer.objective.loss = recorded
    result = trainer.train(final_samples=False)
    assert seeds == [mix_seed(7, step, m) for step in (0, 1) for m in (0, 1)]
    rows = list(csv.DictReader(open(run / "log.csv")))
    logged = [float(r["loss"]) for r in rows]
    assert losses[0] != losses[1]
    # float32 mean of two float32 losses: within one rounding of each term and of their sum
    assert logged == pytest.approx([(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2], rel=3e-7)
    assert result.last_loss == logged[-1]
    mean = [(a + b) / 2 for a, b in zip(grads[0], grads[1]) if a is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in mean])).item()
    assert float(rows[0]["grad_norm"]) == pytest.approx(norm, rel=1e-5)  # float32 sums of ~1e4 terms


def test_random_flip_mirrors_some_images_and_changes_nothing_else(tmp_path):
    seen = {}
    for flip in ("false", "true"):
        trainer = Trainer(load_config(None, tiny(tmp_path / flip, "train.steps=1", f"data.random_flip={flip}")))
        loss = trainer.objective.loss

        def recorded(model, x, *args, **kwargs):
            seen[flip] = x.clone()
            return loss(model, x, *args, **kwargs)

        trainer.objective.loss = recorded
        trainer.train(final_samples=False)
    plain, flipped = seen["false"], seen["true"]
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and not all(same) and any(same)


# ---- what a resume reads back ----------------------------------------------------------------


def _two_steps(run: Path, *extra: str) -> Path:
    Trainer(load_config(None, tiny(run, "train.steps=2", "train.ckpt_every=2", *extra))).train(final_samples=False)
    return run / "checkpoints" / "step_0000002"


def test_resume_continues_the_saved_compute_count(tmp_path):
    step = _two_steps(tmp_path / "run")
    state = torch.load(step / "state.pt", weights_only=True)
    state["train_gflops"] = 1234.5  # not what the batch size would give: it must be read, not recomputed
    torch.save(state, step / "state.pt")
    assert Trainer(load_config(None, tiny(tmp_path / "run", "train.steps=3")), resume=True).train_gflops == 1234.5


def test_resume_of_an_older_checkpoint_takes_the_data_std_from_its_config(tmp_path):
    """Older versions kept a flow's measured data std in the step folder's config.yaml, not in state.pt."""
    args = ("train.steps=3", "objective.data_std_target=1.0")
    step = _two_steps(tmp_path / "run", *args[1:])
    state = torch.load(step / "state.pt", weights_only=True)
    assert state.pop("objective")["data_std"] != 0.375
    torch.save(state, step / "state.pt")
    old = load_config(step / "config.yaml")
    old.objective.data_std = 0.375
    save_config(old, step / "config.yaml")
    trainer = Trainer(load_config(None, tiny(tmp_path / "run", *args)), resume=True)
    assert trainer.objective.data_std == 0.375


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors"])
def test_a_checkpoint_that_does_not_fit_names_its_file(tmp_path, name):
    step = _two_steps(tmp_path / "run")
    weights = load_file(step / name)
    weights.pop(sorted(weights)[0])
    save_file(weights, step / name)
    with pytest.raises(DitlabError, match=re.escape(str(step / name))):
        Trainer(load_config(None, tiny(tmp_path / "run", "train.steps=3")), resume=True)


class _WorkerSignalProbe(torch.utils.data.Dataset):
    """Each item says whether the process that loaded it ignores every stop signal."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
        return torch.tensor(float(ignored)), torch.tensor(0)


def test_data_workers_leave_stopping_to_the_main_process(tmp_path):
    """Ctrl-C reaches the whole process group: a worker that died of it would crash the step."""
    trainer = Trainer(load_config(None, tiny(tmp_path / "run", "train.steps=1", "data.num_workers=1")))
    trainer.dataset = _WorkerSignalProbe(len(trainer.dataset))
    handlers = [signal.getsignal(s) for s in STOP_SIGNALS]
    ignored, _ = next(iter(trainer._loader(1)))
    assert ignored.tolist() == [1.0] * 8
    assert [signal.getsignal(s) for s in STOP_SIGNALS] == handlers  # the main process keeps its handlers


def test_a_checkpoint_at_the_last_step_is_written_once(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny(run, "train.steps=4", "train.ckpt_every=2")))
    saved = _steps_of(trainer, "save")
    result = trainer.train(final_samples=False)
    assert saved == [2, 4] and result.checkpoint == run / "checkpoints" / "step_0000004"


# ---- what the trainer builds ------------------------------------------------------------------


def test_the_optimizer_is_fused_adamw_with_the_configured_settings(tmp_path):
    trainer = Trainer(load_config(None, tiny(tmp_path / "run", "optim.betas=[0.8,0.95]", "optim.weight_decay=0.01")))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["fused"] is True  # CPU: the fused kernel, ~3.5x the per-parameter loop
    group = trainer.optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"]) == ((0.8, 0.95), 0.01)


def test_compile_wraps_the_model_the_loss_calls(tmp_path):
    trainer = Trainer(load_config(None, tiny(tmp_path / "run", "train.compile=true")))
    assert isinstance(trainer.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.forward_model._orig_mod is trainer.model  # compiled lazily, at its first call
    plain = Trainer(load_config(None, tiny(tmp_path / "plain")))
    assert plain.forward_model is plain.model
