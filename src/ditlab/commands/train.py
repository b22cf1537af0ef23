"""`ditlab train CONFIG [key=value ...] [--resume [CKPT]]`: train from a YAML config.

Single process:  ditlab train configs/mnist.yaml optim.lr=2e-4
Multi-GPU:       torchrun --nproc_per_node 8 -m ditlab train configs/imagenet256_dit_xl2.yaml

Exit status: 0 done (or time budget reached); 2 bad input or a refused action (one line on
stderr); 128 + N after stop signal N (SIGTERM 143, SIGINT 130, SIGUSR1 138), once the current
step is finished and saved (`ditlab.train.stop`).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from ditlab.config import load_config, split_config_args
from ditlab.errors import DitlabError
from ditlab.runs import latest_checkpoint, release_run_dir
from ditlab.train import distributed
from ditlab.train.stop import signal_name
from ditlab.train.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=2e-4")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                        help="continue the run in train.out_dir from its latest checkpoint (or from CKPT)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def resume_and_overrides(resume: bool | str, overrides: list[str]) -> tuple[bool | str, list[str]]:
    """`--resume` takes an optional CKPT, so argparse hands it the `key=value` that follows it
    (`--resume train.steps=9`): such a value is an override, unless it names an existing path."""
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        return True, [*overrides, resume]
    return resume, overrides


def run(args: argparse.Namespace) -> int:
    resume, extra = resume_and_overrides(args.resume, list(args.overrides))
    config, overrides = split_config_args(args.config, extra)
    cfg = load_config(config, overrides)
    status = 0
    try:
        trainer = Trainer(cfg, resume=resume, device=args.device)
        result = trainer.train()
        # Rank 0 may still be writing the last samples: leave the process group together, as a
        # rank that tears down gloo while another still uses it can abort in native code.
        distributed.barrier(trainer.env)
        if result.signal is not None:
            # 128 + the signal number, as if the signal had killed us: schedulers and shells read it so.
            status = 128 + result.signal
            if trainer.env.is_main:
                latest = latest_checkpoint(cfg.train.out_dir)
                where = f"checkpoint {result.checkpoint}" if result.checkpoint else "no step finished, nothing new saved"
                command = ["ditlab", "train", *([config] if config else []), *overrides]
                if latest is not None:
                    command.append("--resume")
                elif resume:  # nothing saved here yet: start from the same checkpoint again
                    command += ["--resume", *([str(resume)] if resume is not True else [])]
                print(f"stopped by {signal_name(result.signal)} at step {result.step}: {where}; "
                      f"continue with: {shlex.join(command)}", flush=True)
            return status
        if trainer.env.is_main:
            why = "time budget reached" if result.stopped == "time_budget" else "done"
            speed = (f"{result.bytes_per_s:,.0f} bytes/s" if result.bytes_per_s is not None
                     else f"{result.images_per_s:.0f} img/s")
            print(f"{why}: step {result.step}, loss {result.last_loss:.4f}, {speed}, "
                  f"{result.elapsed_s:.0f} s; run in {result.run_dir}, checkpoint {result.checkpoint}")
    except torch.cuda.OutOfMemoryError:
        raise DitlabError("out of GPU memory: lower optim.batch_size, raise train.grad_accum or set "
                          "model.grad_checkpointing=true / train.fsdp=true") from None
    finally:
        release_run_dir(cfg.train.out_dir)
        distributed.cleanup()
    return status

