"""RSS and CPU of the target (a process and all its descendants), sampled from /proc while a run goes on.

Rules:
- Linux /proc only, no psutil: `VmRSS` from /proc/PID/status, utime+stime from /proc/PID/stat,
  children from /proc/PID/task/TID/children (re-read every sample: workers come and go).
- A process that vanishes between listing and reading is skipped, never an error.
- Each sample carries the load generator's own open-stream count at that instant, so memory per
  open stream is (RSS - idle RSS) / open streams over the plateau of the run (see `loadtest.stats`).
- Bounded: at most `MAX_SAMPLES` are kept; past that every other one is dropped and the interval
  doubles, so a long run keeps an even, coarser trace.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import trio

from .client import Live

MAX_SAMPLES = 20_000
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class MemorySample:
    at: float  # time.perf_counter()
    rss_kb: int  # target processes, summed
    cpu_s: float  # target processes, cumulative user+system seconds
    open_streams: int
    self_rss_kb: int  # the load generator itself
    self_cpu_s: float


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
                except OSError:
                    pass
        except OSError:
            pass
    return out


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(pids: tuple[int, ...]) -> tuple[int, float]:
    rss, cpu = 0, 0.0
    for root in pids:
        for p in descendants(root):
            rss += rss_kb(p)
            cpu += cpu_seconds(p)
    return rss, cpu


class MemorySampler:
    def __init__(self, pids: tuple[int, ...], interval: float, live: Live) -> None:
        self.pids, self.interval, self.live = pids, interval, live
        self.samples: list[MemorySample] = []
        self._me = os.getpid()

    def sample(self) -> MemorySample:
        rss, cpu = measure(self.pids)
        s = MemorySample(time.perf_counter(), rss, cpu, self.live.open_streams, rss_kb(self._me),
                         cpu_seconds(self._me))
        self.samples.append(s)
        if len(self.samples) > MAX_SAMPLES:
            del self.samples[1::2]
            self.interval *= 2
        return s

    async def run(self) -> None:
        """Sample until cancelled (a few /proc reads: cheap enough to do on the event loop)."""
        while True:
            self.sample()
            await trio.sleep(self.interval)
