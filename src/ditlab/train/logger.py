"""Training scalars: RUN/log.csv and TensorBoard (RUN/tb), written by rank 0 only."""

from __future__ import annotations

import csv
import time
from pathlib import Path


class Logger:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "log.csv"
        self.fields: list[str] | None = None
        if self.path.is_file():
            with open(self.path) as f:
                self.fields = next(csv.reader(f), None)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

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
    """Means of the logged terms over the steps since the last log line, and images per second."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps, self.t0 = 0, time.time()

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def flush(self, batch_size: int) -> dict[str, float]:
        """The row to log (term means, img_per_s); starts a new window."""
        row = {k: v / self.steps for k, v in self.sums.items()}
        row["img_per_s"] = self.steps * batch_size / max(time.time() - self.t0, 1e-9)
        self.__init__()
        return row
