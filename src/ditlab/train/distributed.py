"""DDP / FSDP through torchrun: process group from RANK/WORLD_SIZE/LOCAL_RANK, model wrapping.

Launch (one node, 8 GPUs):   torchrun --nproc_per_node 8 -m ditlab train CONFIG
Multi-node: the same command on every node with --nnodes N --node_rank i
--rdzv_endpoint HOST:PORT (or --master_addr/--master_port). Backend: nccl on CUDA, gloo on CPU.

Reproducibility across world sizes: the global batch of a step is cut into W * A micro-batches
(W ranks, A = train.grad_accum); micro-batch m reads a fixed slice of the step's indices and
draws its noise, time and label dropout from seeds keyed by (seed, step, m). Rank r runs
micro-batches r*A .. r*A + A - 1. So 1 process with grad_accum 2 and 2 processes with
grad_accum 1 compute the same global gradient (up to float summation order).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ditlab.errors import DitlabError
from ditlab.models.loading import load_weights

T = TypeVar("T")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (a no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in (None, "cpu", "cuda"):
        raise DitlabError(f"unknown --device '{device}' (choose cpu or cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise DitlabError("--device cuda requested but CUDA is not available")
    cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=30))
        except (RuntimeError, ValueError) as e:
            raise DitlabError(f"cannot join the process group (rank {rank}/{world}): {str(e).splitlines()[0]}") from None
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= env.world_size
    return x


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class DDP(DistributedDataParallel):
    """DDP that forwards attribute reads (num_classes, in_channels, ...) to the wrapped model."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _fsdp_policy(model: nn.Module):
    """Shard each transformer block (the repeated `blocks` children) as its own FSDP unit."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = getattr(model, "blocks", None)
    classes = {type(b) for b in blocks} if isinstance(blocks, nn.ModuleList) and len(blocks) else set()
    return ModuleWrapPolicy(classes) if classes else None


def wrap_fsdp(model: nn.Module, env: DistEnv) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not env.enabled:
        raise DitlabError("train.fsdp needs several processes (launch with torchrun --nproc_per_node N)")
    return FSDP(model, auto_wrap_policy=_fsdp_policy(model),
                device_id=env.device, use_orig_params=True)


def clip_gradients(model: nn.Module, max_norm: float | None, fsdp: bool) -> float | None:
    """Clip the gradient norm to max_norm (None/0: off) and return the norm before clipping.

    Under FSDP each rank holds a shard, so the norm has to come from the wrapper's own method.
    """
    if not max_norm:
        return None
    if fsdp:
        return float(model.clip_grad_norm_(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def full_state_dicts(model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool,
                     device: torch.device) -> tuple[dict, dict, dict]:
    """Full model, EMA and optimizer state dicts (collective under FSDP: rank 0 gets them).

    Without FSDP, `model` must be the unwrapped module (its keys carry no "module." prefix).
    """
    if not fsdp:
        return model.state_dict(), ema_model.state_dict(), optimizer.state_dict()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.fsdp")
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = device.type == "cuda"  # CPU offload of CPU tensors crashes (torch 2.13, gloo)
    full = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
    optim_full = FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, full, optim_full):
        model_sd = model.state_dict()
        optim_sd = FSDP.optim_state_dict(model, optimizer)
    with FSDP.state_dict_type(ema_model, StateDictType.FULL_STATE_DICT, full):
        ema_sd = ema_model.state_dict()
    return model_sd, ema_sd, optim_sd


def load_full_state_dicts(model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool,
                          device: torch.device, model_sd: dict, ema_sd: dict, optim_sd: dict, source: str) -> None:
    """Load what `full_state_dicts` returned, on every rank; one line if it does not fit."""
    if fsdp:
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.fsdp")
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        full = FullStateDictConfig(offload_to_cpu=device.type == "cuda", rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, full):
            load_weights(model, model_sd, source=f"{source}/model.safetensors")
            optim_sd = FSDP.optim_state_dict_to_load(model, optimizer, optim_sd)
        with FSDP.state_dict_type(ema_model, StateDictType.FULL_STATE_DICT, full):
            load_weights(ema_model, ema_sd, source=f"{source}/ema.safetensors")
    else:
        load_weights(model, model_sd, source=f"{source}/model.safetensors")
        load_weights(ema_model, ema_sd, source=f"{source}/ema.safetensors")
    try:
        optimizer.load_state_dict(optim_sd)
    except (ValueError, KeyError) as e:
        raise DitlabError(f"optimizer state in {source} does not fit this model/config: {e}") from None


def on_main(fn: Callable[[], T], env: DistEnv) -> T:
    """Run `fn` on rank 0 only; every rank returns its result, or raises the DitlabError it raised."""
    result, err = None, None
    if env.is_main:
        try:
            result = fn()
        except DitlabError as e:
            err = str(e)
    result, err = broadcast_object((result, err), env)
    if err:
        raise DitlabError(err)
    return result
