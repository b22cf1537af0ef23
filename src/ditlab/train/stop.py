"""Graceful stops: SIGTERM, SIGINT and SIGUSR1 end training after the current step.

A cluster scheduler preempts a job with SIGTERM (SLURM can send SIGUSR1 some time ahead), a
user presses Ctrl-C (SIGINT). Dying in the middle of a step would lose everything since the
last checkpoint, so the first signal only sets a flag: the trainer finishes the step it is in,
saves a checkpoint and returns; the command exits with 128 + the signal number (143 for
SIGTERM, 130 for SIGINT, 138 for SIGUSR1), as a process killed by that signal would. A second
signal stops at once (the previous handler runs: Python's KeyboardInterrupt for SIGINT, the
default termination otherwise); the atomic checkpoint writer leaves `latest` loadable either way.

Under DDP every rank must stop after the same step (the checkpoint save is collective), so the
ranks all-reduce their flags each step, as they do for the time budget.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ditlab.train.distributed import DistEnv

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Catch the stop signals while installed (main thread only; elsewhere Python cannot)."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal, once one arrived
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue  # e.g. SIGINT of a background job (`cmd &`): whoever ignored it meant it
            self._previous[sig] = current
            signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            return
        # The second signal: stop now, the way the process would have without us.
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker init: Ctrl-C reaches the whole process group, and a worker that died of it
    would crash the step the main process is finishing. The main process decides when to stop."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def agreed_stop(env: DistEnv, over_budget: bool, signals: StopSignals) -> tuple[bool, int | None]:
    """(any rank over its time budget, the stop signal any rank received or None), the same on every rank."""
    flags = torch.tensor([float(over_budget), float(signals.received or 0)])
    if env.enabled:
        flags = flags.to(env.device)  # NCCL reduces device tensors only
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # one rank's signal stops all of them
        flags = flags.cpu()
    signum = int(flags[1].item())
    return bool(flags[0].item() > 0), (signum or None)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
