"""What the trainer really does to the weights: the EMA it saves, the learning rate the optimizer
uses, and gradient clipping, each checked against an independent recomputation.

One short run (4 steps, a checkpoint after every step, none pruned) is watched through the
optimizer's step pre-hook, which sees the learning rate in `param_groups` and the gradients
exactly as `optimizer.step()` uses them. From the saved raw weights of every step the EMA is
recomputed with the documented decay schedule min(d, (1 + n) / (10 + n)); from the first step's
gradients the first AdamW update is recomputed (bias-corrected, it is -lr g / (|g| + eps)), which
tells the learning rate in effect without reading any value the trainer computed.

Tolerances: u is float32 unit roundoff.
  - EMA: each float32 lerp rounds about 3 times at the scale of the larger of the two weights, so
    after n updates the saved EMA is within 3 n u max|w| of the float64 recomputation.
  - First AdamW step: about 8 rounded operations at the scale of the update (m, v, sqrt, bias
    corrections, eps, division, step size) plus one rounding of the new weight at its own scale.
  - Clipping: torch scales the gradients by c / (N + 1e-6) where N is their total norm, summed in
    float32; a sum of n terms is accurate to n u (the worst case of recursive summation), n being
    the size of the largest tensor, so the clipped norm matches c N / (N + 1e-6) to 2 n u.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from ditlab.config import load_config
from ditlab.train.trainer import Trainer
from test_train import tiny

U32 = torch.finfo(torch.float32).eps / 2
STEPS, LR, WARMUP, DECAY, CLIP = 4, 1e-3, 3, 0.99, 1e-4


@pytest.fixture
def watched_run(tmp_path):
    """Train 4 steps; record lr and gradients at every optimizer step; keep every checkpoint.

    One run per test (about 2 s), not one per module: a mutation tester that maps each function to
    the tests calling it (TESTING.md) would credit a shared run to the first test only.
    """
    return watch(tmp_path / "run", f"train.steps={STEPS}", f"optim.warmup_steps={WARMUP}")


def watch(out, *extra: str) -> dict:
    """Train the tiny config with `extra` overrides, watching every optimizer step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(None, tiny(out, "train.ckpt_every=1", "train.keep_last=0", "train.log_every=1",
                                 f"optim.lr={LR}", f"train.ema_decay={DECAY}", f"optim.grad_clip={CLIP}",
                                 "optim.weight_decay=0", *extra))
    trainer = Trainer(cfg)
    init = {k: v.detach().clone() for k, v in trainer.raw.state_dict().items()}
    names = {id(p): n for n, p in trainer.raw.named_parameters()}
    seen: list[dict] = []

    def pre_step(optimizer, args, kwargs):
        grads = {names[id(p)]: p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None}
        seen.append({"lr": [g["lr"] for g in optimizer.param_groups], "grads": grads})

    trainer.optimizer.register_step_pre_hook(pre_step)
    trainer.train(final_samples=False)
    torch.set_num_threads(threads)
    step_dirs = [out / "checkpoints" / f"step_{s:07d}" for s in range(1, cfg.train.steps + 1)]
    raw = [load_file(d / "model.safetensors") for d in step_dirs]
    ema = [load_file(d / "ema.safetensors") for d in step_dirs]
    log = list(csv.DictReader(open(out / "log.csv")))
    params = [n for n, _ in trainer.raw.named_parameters()]
    return {"init": init, "raw": raw, "ema": ema, "seen": seen, "log": log, "params": params}


def test_optimizer_uses_the_warmed_up_learning_rate(watched_run):
    # Linear warm-up over WARMUP steps, read where the optimizer reads it.
    lrs = [r["lr"] for r in watched_run["seen"]]
    assert len(lrs) == STEPS
    for step, group_lrs in enumerate(lrs):
        assert group_lrs == [pytest.approx(LR * min(1.0, (step + 1) / WARMUP), rel=1e-12)] * len(group_lrs)


def test_optimizer_follows_the_cosine_schedule(tmp_path):
    # The documented schedule (train/schedule.py), update n = step + 1 of T, warm-up W:
    #   n <= W: lr n / W;  n > W: min_lr + (lr - min_lr) (1 + cos(pi (n - W) / (T - W))) / 2
    T, W, floor = 6, 2, 1e-4
    seen = watch(tmp_path / "run", f"train.steps={T}", f"optim.warmup_steps={W}", "optim.lr_schedule=cosine",
                 f"optim.min_lr={floor}")["seen"]
    expected = [LR * n / W if n <= W else floor + (LR - floor) * (1 + math.cos(math.pi * (n - W) / (T - W))) / 2
                for n in range(1, T + 1)]
    assert [r["lr"][0] for r in seen] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == pytest.approx(floor)  # the last update is made at the floor


def documented_lr(n: int, lr: float, warmup: int, schedule: str, min_lr: float, horizon: int) -> float:
    """train/schedule.py's docstring, written out for update n = 1, 2, ..."""
    if warmup and n <= warmup:
        return lr * n / warmup
    if schedule == "constant":
        return lr
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(1, (n - warmup) / (horizon - warmup)))) / 2


@pytest.mark.parametrize("warmup, schedule, decay_steps, total", [
    (0, "constant", None, 5),   # the default: no warm-up at all
    (0, "cosine", None, 5),     # cosine from the first update
    (2, "cosine", 3, 8),        # a one-update decay (horizon - warm-up = 1), then the floor past the horizon
    (2, "cosine", 5, 9),        # decay_steps, not train.steps, sets the horizon
    (3, "cosine", None, 7),
])
def test_lr_at_is_the_documented_schedule(warmup, schedule, decay_steps, total):
    from ditlab.train.schedule import lr_at

    lr, floor = 1e-3, 1e-5
    cosine = [f"optim.min_lr={floor}"] + ([f"optim.decay_steps={decay_steps}"] if decay_steps else [])
    o = load_config(None, [f"optim.lr={lr}", f"optim.warmup_steps={warmup}", f"optim.lr_schedule={schedule}"]
                    + (cosine if schedule == "cosine" else [])).optim
    horizon = decay_steps or total
    got = [lr_at(o, step, total) for step in range(total)]
    assert got == pytest.approx([documented_lr(n, lr, warmup, schedule, floor, horizon) for n in range(1, total + 1)],
                                rel=1e-12)
    if schedule == "cosine":
        assert got[horizon - 1:] == pytest.approx([floor] * (total - horizon + 1), rel=1e-12)


def test_first_update_is_adamw_with_the_warmed_up_rate(watched_run):
    # Bias-corrected Adam's first step is -lr g / (|g| + eps) per element: the moved distance is lr
    # wherever |g| >> eps, so the saved weights tell the rate in effect (LR / WARMUP, not LR).
    lr0, adam_eps = LR / WARMUP, 1e-8
    init, after, grads = watched_run["init"], watched_run["raw"][0], watched_run["seen"][0]["grads"]
    assert grads, "no gradients reached the optimizer"
    largest = 0.0
    for name in watched_run["params"]:
        p0, p1 = init[name].double(), after[name].double()
        if name not in grads:  # frozen (the fixed positional embedding): untouched
            assert torch.equal(after[name], init[name]), name
            continue
        g = grads[name].double()
        expected = p0 - lr0 * g / (g.abs() + adam_eps)
        bound = 8 * U32 * lr0 + 2 * U32 * torch.maximum(p0.abs(), p1.abs())
        assert torch.all((p1 - expected).abs() <= bound), name
        largest = max(largest, float((p1 - p0).abs().max()))
    # Some element has |g| >> eps: it moved by lr0 (to 1%: |g| / (|g| + eps) = 0.999 at |g| = 1e-5);
    # without the warm-up it would have moved by LR = 3 lr0.
    assert 0.99 * lr0 <= largest <= lr0 * (1 + 8 * U32) + 2 * U32  # weights here are below 1 in magnitude


def test_clipping_scales_the_gradients_the_optimizer_sees(watched_run):
    # log_every=1: each row holds that step's gradient norm before clipping.
    assert [int(r["step"]) for r in watched_run["log"]] == list(range(1, STEPS + 1))
    n_max = max(v.numel() for v in watched_run["init"].values())
    for row, seen in zip(watched_run["log"], watched_run["seen"]):
        before = float(row["grad_norm"])
        assert before > 100 * CLIP  # clipping is active at every step of this run
        after = math.sqrt(sum(float(g.double().square().sum()) for g in seen["grads"].values()))
        assert after == pytest.approx(CLIP * before / (before + 1e-6), rel=2 * n_max * U32)


def assert_ema_folds(run: dict, decay_at) -> None:
    """Each saved EMA equals decay_at(n) * previous + (1 - decay_at(n)) * raw weights of step n."""
    init, raw, ema = run["init"], run["raw"], run["ema"]
    for name in run["params"]:
        avg = init[name].double()  # the EMA starts as a copy of the initial model
        scale = max(float(init[name].abs().max()), *(float(r[name].abs().max()) for r in raw))
        for n in range(len(raw)):
            d = decay_at(n)
            avg = d * avg + (1 - d) * raw[n][name].double()
            err = float((ema[n][name].double() - avg).abs().max())
            assert err <= 3 * (n + 1) * U32 * scale, (name, n, err)


def test_saved_ema_is_the_decay_schedule_folded_over_the_raw_weights(watched_run):
    assert_ema_folds(watched_run, lambda n: min(DECAY, (1 + n) / (10 + n)))
    # ... and the EMA is not the raw weights: the trained weights moved away from their average.
    raw, ema, last = watched_run["raw"], watched_run["ema"], STEPS - 1
    moved = max(float((ema[last][k].double() - raw[last][k].double()).abs().max()) for k in watched_run["params"])
    scale = max(float(raw[last][k].abs().max()) for k in watched_run["params"])
    assert moved > 100 * 3 * STEPS * U32 * scale  # 100 times the tolerance above


@pytest.mark.parametrize("decay, warmup", [(0.15, True), (0.9, False)], ids=["cap-binds", "no-warmup"])
def test_saved_ema_follows_the_configured_decay_and_warmup(tmp_path, decay, warmup):
    # 0.15 caps the warm-up (1 + n) / (10 + n) from the second update on; without warm-up, 0.9 throughout.
    run = watch(tmp_path / "run", "train.steps=3", f"train.ema_decay={decay}", f"train.ema_warmup={str(warmup).lower()}")
    assert_ema_folds(run, lambda n: min(decay, (1 + n) / (10 + n)) if warmup else decay)


def test_ema_defaults_and_frozen_copy():
    from ditlab.train.ema import EMA

    model = torch.nn.Linear(3, 2)
    model.register_buffer("seen", torch.zeros(1))
    ema = EMA(model)  # the DiT default: decay 0.9999, with the warm-up
    assert ema.num_updates == 0 and not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())  # an average, never trained
    assert all(p.requires_grad for p in model.parameters())  # the source is left as it was
    for n in (0, 1, 9, 1000, 89_990, 10**6):
        ema.num_updates = n
        assert ema.current_decay() == min(0.9999, (1 + n) / (10 + n))
    assert EMA(model, decay=0.5, warmup=False).current_decay() == 0.5
    # Buffers are copied, not averaged; the copy does not share storage with the source.
    ema.num_updates = 0
    model.seen.fill_(5.0)
    ema.update(model)
    assert ema.model.seen.item() == 5.0 and ema.num_updates == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(ema.model.weight, model.weight)


def test_train_result_reports_the_run_as_it_happened(tmp_path):
    """The TrainResult of a finished run: why it stopped, where its checkpoint is, its speed, and the
    logged loss as the mean over accumulation micro-batches (never their sum or difference)."""
    out = tmp_path / "run"
    cfg = load_config(None, tiny(out, "train.steps=3", "train.ckpt_every=2", "train.log_every=1", "train.grad_accum=2",
                                 "optim.batch_size=8"))
    result = Trainer(cfg).train(final_samples=False)
    assert (result.run_dir, result.step, result.stopped, result.signal) == (out, 3, "steps", None)
    assert result.checkpoint == out / "checkpoints" / "step_0000003" and result.checkpoint.is_dir()
    assert result.images_per_s == pytest.approx(3 * 8 / result.elapsed_s, rel=1e-12)
    assert result.bytes_per_s is None and 0 < result.elapsed_s < 600
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) == pytest.approx(result.last_loss) and result.last_loss > 0
    # A checkpoint saved at the last step is reported, not saved twice.
    again = Trainer(load_config(None, tiny(tmp_path / "run2", "train.steps=2", "train.ckpt_every=2"))).train(final_samples=False)
    assert again.checkpoint == tmp_path / "run2" / "checkpoints" / "step_0000002"
    # A time budget of zero stops after the first step, and says so.
    budget = Trainer(load_config(None, tiny(tmp_path / "run3", "train.steps=5", "train.time_budget_s=0"))).train(final_samples=False)
    assert (budget.step, budget.stopped) == (1, "time_budget")
