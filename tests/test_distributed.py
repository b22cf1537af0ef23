"""DDP / FSDP on CPU (gloo) through torchrun: 2 processes == 1 process with the same global batch.

The global batch of a step is cut into world_size x grad_accum micro-batches, each seeded by
(seed, step, micro-batch index); so 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the
same images, noise, times and label dropout, and must end with the same weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def torchrun(nproc: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ditlab", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


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
def test_two_gloo_processes_match_one(tmp_path, fsdp):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", *TINY, f"train.out_dir={single}", "train.grad_accum=2"]) == 0
    torchrun(2, [*TINY, f"train.out_dir={multi}", f"train.fsdp={str(fsdp).lower()}"])
    step = Path("checkpoints") / "step_0000003"
    assert_same_weights(single / step, multi / step)
    # Only rank 0 writes: one log with the rank-averaged loss, equal to the single process's.
    assert (single / "log.csv").read_text().splitlines()[1:] != []
    col = lambda p: [line.split(",")[1] for line in (p / "log.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert [float(x) for x in col(multi)] == pytest.approx([float(x) for x in col(single)], abs=1e-6)
    if fsdp:  # full-state-dict checkpoints resume under FSDP as well
        torchrun(2, [*TINY, f"train.out_dir={multi}", "train.fsdp=true", "train.steps=4", "--resume"])
        assert main(["train", *TINY, f"train.out_dir={single}", "train.grad_accum=2", "train.steps=4", "--resume"]) == 0
        assert_same_weights(single / "checkpoints" / "step_0000004", multi / "checkpoints" / "step_0000004")
