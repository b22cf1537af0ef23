"""A torch thread count that follows the CPU load while training (`Trainer(adapt_threads=True)`).

Why: the intra-op threads of a small model meet at every op. Beside other CPU-bound processes,
2 threads on 2 cores spend their time waiting for the thread that lost its core: `ditlab
quickstart` measured 44-60 img/s that way against 443 on the idle machine, and at a load of ~6
one thread took 0.24 s a step where two took 5.8 s; on a quiet machine 2 threads beat 1 (247 vs
139 img/s at a load of ~1.4). A count chosen once at start is wrong as soon as jobs start or
stop during the run (field notes), so the trainer asks this module again every few seconds.

How (`ThreadTuner.after_step`, called once per training step):
1. Every `check_every_s` seconds it reads `others`: the cores that other processes keep busy.
   The default reader (`CpuOthers`) takes the busy time of /proc/stat (steal included: on a VM
   that is the host's other guests) minus this process's own CPU time over the interval, so the
   training itself does not count as load and there is no 1-minute lag. Without /proc/stat it
   falls back to the 1-minute load average minus our own threads.
2. Load rule with hysteresis (`load_target`): k threads fit while others <= cores - k + 1/2.
   The count moves up a level only when others is `margin` below that line and down only when
   it is `margin` above, so readings that wobble around a line do not flip the count.
3. Probe: a change the load rule asks for is tried, not trusted (load says little about how
   much our threads actually lose). The last `probe_steps` steps at the current count are the
   baseline; the candidate runs `probe_steps` steps (fewer when they take over `probe_max_s`,
   so probing a collapsed setting stays cheap). The candidate stays only if its median step is
   `min_gain` faster; otherwise the old count returns and the candidate is vetoed until the
   reading moves by more than 2 x margin or `veto_s` passes, so a machine where the rule and the
   measurement disagree is not probed at every check.

Everything the tuner sees comes through `clock` and `read_others`, so tests drive it with
simulated time and readings. Changing the thread count can change float rounding of reductions,
so a run with adaptive threads is not bit-reproducible (a fixed count is).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path


def load_target(others: float, cores: int, current: int, max_threads: int, margin: float = 0.25) -> int:
    """The thread count for `others` busy cores, moving from `current` only past the hysteresis band.

    k threads fit while others <= cores - k + 1/2; raise to k+1 when others < (cores - k - 1/2) - margin,
    drop from k when others > (cores - k + 1/2) + margin. Always between 1 and max_threads.
    """
    def line(k: int) -> float:
        return cores - k + 0.5

    n = max(1, min(current, max_threads))
    while n < max_threads and others < line(n + 1) - margin:
        n += 1
    while n > 1 and others > line(n) + margin:
        n -= 1
    return n


def _proc_stat() -> tuple[int, int] | None:
    """(total, idle) jiffies of all cores from /proc/stat (idle + iowait count as idle), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return sum(fields), fields[3] + fields[4]


class CpuOthers:
    """Reader: cores kept busy by other processes since the previous call (None on the first call).

    Busy share of /proc/stat x cores, minus this process's CPU time per wall second (all its
    threads). Without /proc/stat (macOS): the 1-minute load average minus our own threads.
    """

    def __init__(self, cores: int | None = None):
        self.cores = cores or os.cpu_count() or 1
        self.prev = self._sample()

    @staticmethod
    def _sample() -> tuple[tuple[int, int] | None, float, float]:
        return _proc_stat(), time.process_time(), time.monotonic()

    def __call__(self, current_threads: int) -> float | None:
        cur = self._sample()
        (stat0, own0, t0), (stat1, own1, t1) = self.prev, cur
        self.prev = cur
        if stat0 is None or stat1 is None:
            try:
                return max(0.0, os.getloadavg()[0] - current_threads)
            except OSError:
                return None
        ticks, wall = stat1[0] - stat0[0], t1 - t0
        if ticks <= 0 or wall <= 0:
            return None
        busy = self.cores * (1 - (stat1[1] - stat0[1]) / ticks)
        return min(float(self.cores), max(0.0, busy - (own1 - own0) / wall))


class ThreadTuner:
    """Decides the thread count after every training step (see the module docstring).

    `after_step()` returns the count to use from now on; the caller applies it
    (torch.set_num_threads). `changes` lists (time, old, new, why) for every switch.
    """

    def __init__(self, threads: int, *, cores: int | None = None, max_threads: int | None = None,
                 read_others: Callable[[int], float | None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 check_every_s: float = 10.0, margin: float = 0.25, probe: bool = True, probe_steps: int = 3,
                 probe_max_s: float = 10.0, min_gain: float = 0.05, veto_s: float = 300.0):
        self.cores = cores or os.cpu_count() or 1
        self.max_threads = max_threads or self.cores
        self.threads = max(1, min(threads, self.max_threads))
        self.read_others = read_others if read_others is not None else CpuOthers(self.cores)
        self.clock = clock
        self.check_every_s, self.margin, self.probe = check_every_s, margin, probe
        self.probe_steps, self.probe_max_s, self.min_gain, self.veto_s = max(1, probe_steps), probe_max_s, min_gain, veto_s
        self.changes: list[tuple[float, int, int, str]] = []
        self.last_others: float | None = None
        self._last = self._last_check = clock()
        self._recent: deque[float] = deque(maxlen=self.probe_steps)  # step times at the current count
        self._probe: dict | None = None  # {"from", "to", "others", "start", "base", "times"}
        self._veto: tuple[int, float, float] | None = None  # (candidate, others, time)

    def _switch(self, now: float, new: int, why: str) -> None:
        self.changes.append((now, self.threads, new, why))
        self.threads = new
        self._recent.clear()

    def after_step(self) -> int:
        now = self.clock()
        dt, self._last = now - self._last, now
        if self._probe is not None:
            return self._probe_step(now, dt)
        self._recent.append(dt)
        if now - self._last_check < self.check_every_s:
            return self.threads
        self._last_check = now
        others = self.read_others(self.threads)
        if others is None:
            return self.threads
        self.last_others = others
        target = load_target(others, self.cores, self.threads, self.max_threads, self.margin)
        if target == self.threads or self._vetoed(target, others, now):
            return self.threads
        if not self.probe:
            self._switch(now, target, f"others {others:.2f}")
        else:
            self._probe = {"from": self.threads, "to": target, "others": others, "start": now,
                           "base": statistics.median(self._recent), "times": []}
            self._switch(now, target, f"probe (others {others:.2f})")
        return self.threads

    def _vetoed(self, target: int, others: float, now: float) -> bool:
        if self._veto is None:
            return False
        candidate, at, when = self._veto
        if candidate == target and abs(others - at) <= 2 * self.margin and now - when < self.veto_s:
            return True
        self._veto = None
        return False

    def _probe_step(self, now: float, dt: float) -> int:
        p = self._probe
        p["times"].append(dt)
        if len(p["times"]) < self.probe_steps and now - p["start"] < self.probe_max_s:
            return self.threads
        self._probe = None
        took = statistics.median(p["times"])
        if took < p["base"] * (1 - self.min_gain):
            self.changes[-1] = (*self.changes[-1][:3], f"{p['to']} threads {p['base'] / took:.2f}x faster "
                                                      f"(others {p['others']:.2f})")
            self._recent.extend(p["times"])
        else:
            self._veto = (p["to"], p["others"], now)
            self._switch(now, p["from"], f"probe of {p['to']} threads not faster ({took:.3g} vs {p['base']:.3g} s/step)")
        self._last_check = now
        return self.threads
