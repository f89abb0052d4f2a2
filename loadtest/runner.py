"""A run: schedule requests (closed or open loop), sample the target, collect samples, summarize.

Rules:
- Closed loop: `concurrency` clients, each sending its next request when the previous ends, over
  one keep-alive connection (unless `new_connection`). Ramp-up starts them evenly over `ramp_up`.
- Open loop: arrival k is due at Λ⁻¹(u_k), where Λ is the cumulative arrival rate (linear from 0
  during ramp-up, then `rate`) and u_k = k (constant) or a sum of Exp(1) draws (Poisson). One task
  per arrival, each on a fresh connection, latency measured from the due time. At most
  `max_in_flight` are in flight; an arrival beyond that fails at once as "client_limit" (the
  generator never queues work it cannot start: that queue would hide latency).
- Warm-up: requests started in the first `warmup` seconds run like any other but are marked and
  left out of every figure; `requests` counts measured requests only.
- `duration` is the measured window: in-flight requests are cancelled and reported as
  "cancelled" when it ends, or, with `cooldown`, no new request starts and the in-flight ones
  get `cooldown` more seconds to finish (so a sweep's next step starts on a quiet target).
- Fail fast (`loadtest.guard`): 20 responses in a row with the same 4xx, or an error rate above
  `stop_on_error_rate`, stop the run at once; `RunResult.stopped` says why.
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
from .guard import Guard
from .memory import MemorySample, MemorySampler
from .prompts import Picker
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
    itl: array | None = None  # every measured inter-token gap, seconds
    stopped: str | None = None  # why the run stopped early (fail fast), else None
    warmup_requests: int = 0


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
    warm: list[Sample] = []
    offset = trio.current_time() - time.perf_counter()
    client = Client(settings.target, settings.behaviour, live, itl, offset, timeout=shape.timeout)
    picker = Picker(client.prompts, seed)
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
            guard = Guard(cut, settings.stop_on_error_rate, settings.target.api_key is not None)
            client.on_done = guard.record
            stop_at = math.inf
            if shape.duration is not None:
                stop_at = start + shape.warmup + shape.duration
                cut.deadline = trio.current_time() + shape.warmup + shape.duration + shape.cooldown
            if shape.open_loop:
                await _open_loop(client, shape, start, stop_at, samples, warm, picker, random.Random(seed), cut)
            else:
                await _closed_loop(client, shape, start, stop_at, samples, warm, picker, cut)
        if sampler is not None:
            sampler.sample()  # one last sample: the state at the end
        nursery.cancel_scope.cancel()
    if settings.progress:
        print(progress_line(live, time.perf_counter() - start), file=sys.stderr, flush=True)
    memory = sampler.samples if sampler else []
    peak_open = max([peak[0]] + [m.open_streams for m in memory])
    summary = summarize(samples, itl, memory, open_loop=shape.open_loop, peak_open=peak_open,
                        slo=settings.slo, tokenizer=client.counter.name, load=shape.load)
    return RunResult(settings, summary, samples, memory, start, itl, guard.stopped, len(warm))


async def _closed_loop(client: Client, shape: Shape, start: float, stop_at: float,
                       samples: list[Sample], warm: list[Sample], picker: Picker,
                       cut: trio.CancelScope) -> None:
    counter = itertools.count()
    n_endpoints = len(client.target.endpoints)
    warm_until = start + shape.warmup

    async def worker(w: int) -> None:
        await client.sleep_until(start + shape.ramp_up * w / shape.concurrency)
        conn: Connection | None = None
        try:
            while True:
                now = time.perf_counter()
                if now >= stop_at or cut.cancel_called:  # a response that ended with the stop
                    return
                if now < warm_until:
                    sample = Sample(-1, w % n_endpoints, now, warmup=True)
                    warm.append(sample)
                else:
                    i = next(counter)
                    if shape.requests is not None and i >= shape.requests:
                        return
                    sample = Sample(i, w % n_endpoints, now)
                    samples.append(sample)
                sample.prompt = picker.next(w)
                conn = await client.request(sample, conn, keep=not shape.new_connection)
        finally:
            if conn is not None:
                conn.close()

    async with trio.open_nursery() as nursery:
        for w in range(shape.concurrency):
            nursery.start_soon(worker, w)


async def _open_loop(client: Client, shape: Shape, start: float, stop_at: float, samples: list[Sample],
                     warm: list[Sample], picker: Picker, rng: random.Random, cut: trio.CancelScope) -> None:
    n_endpoints = len(client.target.endpoints)
    live = client.live
    i = 0
    # Counted from the spawn, not from the task's start (`live.in_flight`): a late loop spawns
    # several arrivals before any of them runs, and each must see the ones before it.
    in_flight = 0

    async def arrival(sample: Sample) -> None:
        nonlocal in_flight
        try:
            await client.request(sample, None)
        finally:
            in_flight -= 1

    async with trio.open_nursery() as nursery:
        for k, due in enumerate(arrival_times(shape, rng)):
            if shape.requests is not None and i >= shape.requests or start + due >= stop_at:
                break
            await client.sleep_until(start + due)
            if cut.cancel_called:
                break
            if due < shape.warmup:
                sample = Sample(-1, k % n_endpoints, start + due, warmup=True)
                warm.append(sample)
            else:
                sample = Sample(i, k % n_endpoints, start + due)
                samples.append(sample)
                i += 1
            sample.prompt = picker.next(0)
            if in_flight >= shape.max_in_flight:
                sample.outcome, sample.ended = "client_limit", time.perf_counter()
                live.done += 1
                live.errors += 1
                continue
            in_flight += 1
            nursery.start_soon(arrival, sample)


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
