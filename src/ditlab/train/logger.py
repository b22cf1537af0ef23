"""Training scalars: RUN/log.csv and TensorBoard (RUN/tb), written by rank 0 only.

A run resumed from step S continues the log after S: rows (and TensorBoard events) of later
steps, written before a kill but after the checkpoint, are dropped first, so the log holds each
step once and matches the weights that are saved.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from ditlab.io import write_atomic


class Logger:
    def __init__(self, run_dir: Path, tensorboard: bool, start_step: int = 0):
        self.path = run_dir / "log.csv"
        self.fields: list[str] | None = None
        if self.path.is_file():
            self._truncate(start_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events of steps after the checkpoint that an earlier process logged.
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def _truncate(self, start_step: int) -> None:
        """Keep the rows of steps <= start_step (none for a new run); drop later and torn ones."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        header, kept = (rows[0] if rows else None), []
        for row in rows[1:]:
            try:
                if row and len(row) == len(header) and int(row[0]) <= start_step:
                    kept.append(row)
            except ValueError:
                pass  # a line cut short by a kill
        if not kept:
            self.path.unlink()
            return
        self.fields = header
        if len(kept) < len(rows) - 1:
            buf = io.StringIO()
            csv.writer(buf).writerows([header, *kept])
            write_atomic(self.path, buf.getvalue().encode())

    def log(self, step: int, row: dict[str, float]) -> None:
        row = {"step": step, **row}
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Window:
    """Means of the logged terms over the steps since the last log line, and the throughput."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps, self.t0 = 0, time.time()

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def flush(self, per_step: int, unit: str = "img") -> dict[str, float]:
        """The row to log (term means, {unit}_per_s for per_step units a step); starts a new window."""
        row = {k: v / self.steps for k, v in self.sums.items()}
        row[f"{unit}_per_s"] = self.steps * per_step / max(time.time() - self.t0, 1e-9)
        self.__init__()
        return row
