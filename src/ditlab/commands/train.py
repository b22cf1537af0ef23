"""`ditlab train CONFIG [key=value ...] [--resume [CKPT]]`: train from a YAML config.

Single process:  ditlab train configs/mnist.yaml optim.lr=2e-4
Multi-GPU:       torchrun --nproc_per_node 8 -m ditlab train configs/imagenet256_dit_xl2.yaml
"""

from __future__ import annotations

import argparse

import torch

from ditlab.config import load_config, split_config_args
from ditlab.errors import DitlabError
from ditlab.train import distributed
from ditlab.train.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=2e-4")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="continue the run in train.out_dir from its latest checkpoint (or from CKPT)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    config, overrides = split_config_args(args.config, list(args.overrides))
    cfg = load_config(config, overrides)
    try:
        trainer = Trainer(cfg, resume=args.resume, device=args.device)
        result = trainer.train()
        if trainer.env.is_main:
            why = "time budget reached" if result.stopped == "time_budget" else "done"
            print(f"{why}: step {result.step}, loss {result.last_loss:.4f}, {result.images_per_s:.0f} img/s, "
                  f"{result.elapsed_s:.0f} s; run in {result.run_dir}, checkpoint {result.checkpoint}")
    except torch.cuda.OutOfMemoryError:
        raise DitlabError("out of GPU memory: lower optim.batch_size, raise train.grad_accum or set "
                          "model.grad_checkpointing=true / train.fsdp=true") from None
    finally:
        distributed.cleanup()
    return 0

