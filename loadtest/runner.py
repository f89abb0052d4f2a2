"""A run: schedule requests (closed or open loop), sample the target, collect samples, summarize.

Rules:
- Closed loop: `concurrency` clients, each sending its next request when the previous ends, over
  one keep-alive connection (unless `new_connection`). Ramp-up starts them evenly over `ramp_up`.
- Open loop: arrival k is due at Λ⁻¹(u_k), where Λ is the cumulative arrival rate (linear from 0
  during ramp-up, then `rate`) and u_k = k (constant) or a sum of Exp(1) draws (Poisson). One task
  per arrival, each on a fresh connection, latency measured from the due time. At most
  `max_in_flight` are in flight; an arrival beyond that fails at once as "client_limit" (the
  generator never queues work it cannot start: that queue would hide latency).
- `duration` cuts the run: in-flight requests are cancelled and reported as "cancelled".
- The fd limit is raised to the hard limit first: 10,000 streams need 10,000 sockets.
- All tasks live in nurseries under this function; it returns only when everything stopped.

Memory bound: exact percentiles and the per-request CSV need every sample, so a run keeps one
`Sample` per request (~0.5 KB with its floats) and 8 bytes per inter-token gap: about 0.5 GB per
million requests of 50 tokens. That is the price of exactness; split longer soak tests into runs.
The memory trace is bounded separately (`loadtest.memory.MAX_SAMPLES`).
"""

from __future__ import annotations

import itertools
import math
import random
import resource
import sys
import time
from array import array
from dataclasses import dataclass

import trio

from .client import Client, Connection, Live, Sample
from .memory import MemorySample, MemorySampler
from .report import progress_line
from .settings import RunSettings, Shape
from .stats import Summary, summarize


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class RunResult:
    settings: RunSettings
    summary: Summary
    samples: list[Sample]
    memory: list[MemorySample]
    started_at: float  # perf_counter of the run's start: the zero of every time series


def arrival_times(shape: Shape, rng: random.Random):
    """Seconds from the start at which arrivals are due (an infinite generator)."""
    rate, ramp = shape.rate, shape.ramp_up
    u = 0.0
    ramp_mass = rate * ramp / 2  # arrivals expected during the ramp
    while True:
        if u < ramp_mass:
            yield math.sqrt(2 * ramp * u / rate)
        else:
            yield ramp + (u - ramp_mass) / rate
        u += rng.expovariate(1.0) if shape.poisson else 1.0


async def run(settings: RunSettings, *, seed: int | None = None) -> RunResult:
    raise_fd_limit()
    shape = settings.shape
    live = Live()
    itl = array("d")
    samples: list[Sample] = []
    offset = trio.current_time() - time.perf_counter()
    client = Client(settings.target, settings.behaviour, live, itl, offset, timeout=shape.timeout)
    await client.resolve()
    sampler = None
    peak = [0]
    async with trio.open_nursery() as nursery:
        if settings.sampling.target_pids:
            sampler = MemorySampler(settings.sampling.target_pids, settings.sampling.interval, live)
            nursery.start_soon(sampler.run)
            await trio.sleep(settings.sampling.idle_wait)  # idle RSS before any request
        start = time.perf_counter()
        nursery.start_soon(_watch, live, shape, start, settings.progress, peak)
        with trio.CancelScope() as cut:
            if shape.duration is not None:
                cut.deadline = trio.current_time() + shape.duration
            if shape.open_loop:
                await _open_loop(client, shape, start, samples, random.Random(seed))
            else:
                await _closed_loop(client, shape, start, samples)
        if sampler is not None:
            sampler.sample()  # one last sample: the state at the end
        nursery.cancel_scope.cancel()
    if settings.progress:
        print(progress_line(live, time.perf_counter() - start), file=sys.stderr, flush=True)
    memory = sampler.samples if sampler else []
    peak_open = max([peak[0]] + [m.open_streams for m in memory])
    summary = summarize(samples, itl, memory, open_loop=shape.open_loop, peak_open=peak_open)
    return RunResult(settings, summary, samples, memory, start)


async def _closed_loop(client: Client, shape: Shape, start: float, samples: list[Sample]) -> None:
    counter = itertools.count()
    n_endpoints = len(client.target.endpoints)

    async def worker(w: int) -> None:
        await client.sleep_until(start + shape.ramp_up * w / shape.concurrency)
        conn: Connection | None = None
        try:
            while True:
                i = next(counter)
                if shape.requests is not None and i >= shape.requests:
                    return
                sample = Sample(i, w % n_endpoints, time.perf_counter())
                samples.append(sample)
                conn = await client.request(sample, conn, keep=not shape.new_connection)
        finally:
            if conn is not None:
                conn.close()

    async with trio.open_nursery() as nursery:
        for w in range(shape.concurrency):
            nursery.start_soon(worker, w)


async def _open_loop(client: Client, shape: Shape, start: float, samples: list[Sample],
                     rng: random.Random) -> None:
    n_endpoints = len(client.target.endpoints)
    live = client.live
    async with trio.open_nursery() as nursery:
        for i, due in enumerate(arrival_times(shape, rng)):
            if shape.requests is not None and i >= shape.requests:
                break
            await client.sleep_until(start + due)
            sample = Sample(i, i % n_endpoints, start + due)
            samples.append(sample)
            if live.in_flight >= shape.max_in_flight:
                sample.outcome, sample.ended = "client_limit", time.perf_counter()
                live.done += 1
                live.errors += 1
                continue
            nursery.start_soon(client.request, sample, None)


async def _watch(live: Live, shape: Shape, start: float, show: bool, peak: list[int]) -> None:
    """Track the peak of open streams (cheaply, 20x a second) and print the progress line."""
    tty = sys.stderr.isatty()
    every = 1.0 if tty else 5.0
    last = time.perf_counter()
    while True:
        await trio.sleep(0.05)
        peak[0] = max(peak[0], live.open_streams)
        now = time.perf_counter()
        if show and now - last >= every:
            last = now
            end = "\r" if tty else "\n"
            print(progress_line(live, now - start), end=end, file=sys.stderr, flush=True)
