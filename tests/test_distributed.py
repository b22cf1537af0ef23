"""DDP / FSDP on CPU (gloo) through torchrun: 2 processes == 1 process with the same global batch.

The global batch of a step is cut into world_size x grad_accum micro-batches, each seeded by
(seed, step, micro-batch index); so 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the
same images, noise, times and label dropout, and must end with the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.train.order import MicroBatches as _MicroBatches, StepSampler

TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "objective.kind=flow",
    "optim.batch_size=8", "optim.lr=1e-3", "optim.grad_clip=1.0", "model.class_dropout_prob=0.25",
    "train.steps=3", "train.log_every=1", "train.tensorboard=false", "train.progress=false",
    "sample.sampler=euler", "sample.steps=2", "sample.num_samples=10",
]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=f"{name}:{k}")


def test_ranks_shard_the_global_batch():
    order = StepSampler(num_samples=50, global_batch=8, seed=0)
    one = list(_MicroBatches(order, 0, 3, micro=[0, 1], per_micro=4))  # 1 rank, grad_accum 2
    rank0 = list(_MicroBatches(order, 0, 3, micro=[0], per_micro=4))  # 2 ranks, grad_accum 1
    rank1 = list(_MicroBatches(order, 0, 3, micro=[1], per_micro=4))
    assert one[0::2] == rank0 and one[1::2] == rank1
    for step in range(3):  # the two ranks' micro-batches are disjoint and make up the global batch
        assert sorted(rank0[step] + rank1[step]) == sorted(order.indices(step).tolist())


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, fsdp, run_ranks):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", *TINY, f"train.out_dir={single}", "train.grad_accum=2"]) == 0
    run_ranks(["-m", "ditlab", "train", *TINY, f"train.out_dir={multi}", f"train.fsdp={str(fsdp).lower()}"], fresh=multi)
    step = Path("checkpoints") / "step_0000003"
    assert_same_weights(single / step, multi / step)
    # Only rank 0 writes: one log with the rank-averaged loss, equal to the single process's.
    assert (single / "log.csv").read_text().splitlines()[1:] != []
    col = lambda p: [line.split(",")[1] for line in (p / "log.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert [float(x) for x in col(multi)] == pytest.approx([float(x) for x in col(single)], abs=1e-6)
    if fsdp:  # full-state-dict checkpoints resume under FSDP as well
        run_ranks(["-m", "ditlab", "train", *TINY, f"train.out_dir={multi}", "train.fsdp=true", "train.steps=4", "--resume"])
        assert main(["train", *TINY, f"train.out_dir={single}", "train.grad_accum=2", "train.steps=4", "--resume"]) == 0
        assert_same_weights(single / "checkpoints" / "step_0000004", multi / "checkpoints" / "step_0000004")


RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from ditlab.objectives.flow import FlowObjective
from ditlab.objectives.gaussian import LossSecondMomentResampler

dist.init_process_group("gloo")
rank = dist.get_rank()
resampler = LossSecondMomentResampler(num_timesteps=4, history=2)
for step in range(3):  # rank r sees timesteps r and 2: both ranks add to t = 2's history
    resampler.update(torch.tensor([rank, 2]), torch.tensor([1.0 + 10 * step + rank, 5.0 + 10 * step + rank]))
flow = FlowObjective(data_std_target=1.0)
flow._maybe_measure_std(torch.arange(4.0) * (1 + rank))  # rank 0: var 5/3, rank 1: var 20/3
torch.save({"history": resampler.loss_history, "counts": resampler.loss_counts, "data_std": flow.data_std},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_ranks_share_the_objectives_statistics(tmp_path, run_ranks):
    """Under torch.distributed every rank records every rank's losses in the importance sampler
    (rank 0's first) and scales the data by one std, the mean of the ranks' variances."""
    from ditlab.objectives.gaussian import LossSecondMomentResampler

    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    run_ranks([str(script), str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = LossSecondMomentResampler(num_timesteps=4, history=2)
    for step in range(3):
        for rank in (0, 1):
            one.update(torch.tensor([rank, 2]), torch.tensor([1.0 + 10 * step + rank, 5.0 + 10 * step + rank]))
    for got in ranks:
        assert (got["history"] == one.loss_history).all() and (got["counts"] == [2, 2, 2, 0]).all()
        assert got["data_std"] == pytest.approx(((5 / 3 + 20 / 3) / 2) ** 0.5, rel=1e-6)
