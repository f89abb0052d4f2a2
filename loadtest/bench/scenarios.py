"""The benchmark scenarios (a-h of the issues), each a function: target in, one result row out.

Rules:
- The provider's behaviour is set per request by a `fake:` directive in the prompt, so one
  provider process serves every scenario and every target gets the very same upstream.
- Every run is bounded: a request count, a duration, or both.
- Provider-side facts (bytes sent, when a connection ended) come from the fake provider's own
  records (`GET /_fake/requests`), reset before each scenario. Its timestamps are on its own
  clock, so only differences between them are used.
- Sizes come from `Sizes`; `--quick` shrinks them for a smoke run.
"""

from __future__ import annotations

import math
import os
import resource
import time
from array import array
from dataclasses import dataclass
from statistics import median
from typing import Any

import httpx
import trio

from ..client import Client, Live, Sample, is_error
from ..memory import measure as target_usage
from ..runner import RunResult, run
from ..stats import percentile
from ..settings import Behaviour, RunSettings, Sampling, Shape
from . import held_h2
from .targets import Running


@dataclass(frozen=True)
class Sizes:
    ttft_streams: tuple[int, ...] = (100, 200, 1000)
    ttft_seconds: float = 8.0
    held_streams: tuple[int, ...] = (1000, 2000, 5000, 10000)
    held_seconds: float = 6.0
    held_h2_streams: tuple[int, ...] = ()  # b over HTTP/2 (h2c): held streams, several per connection
    h2_streams_per_connection: int = 100  # hypercorn's h2_max_concurrent_streams (gateway and floor)
    h2_settle: float = 60.0  # b over HTTP/2: s after the ramp for the target to hold every stream
    throughput_concurrency: int = 100
    throughput_seconds: float = 10.0
    slow_clients: int = 1000
    slow_seconds: float = 30.0
    stalled_clients: int = 100
    stall_hold: float = 40.0
    cpu_streams: int = 100
    cpu_waves: int = 4
    # h: old streams x 50 tokens/s each; 300: 15,000 tokens/s offered, past one gateway process's
    # ~12,000 (held long streams cost it ~80 µs per token here, set-up excluded)
    overload_streams: tuple[int, ...] = (300,)
    overload_settle: float = 3.0  # h: seconds of full load before the new streams start
    probe_rate: float = 10.0  # h: new streams per second (open loop, constant gaps)
    probe_seconds: float = 12.0  # h: how long new streams arrive (idle, then under load)
    probe_grace: float = 8.0  # h: a new stream still without its end this long after the last arrival is cut
    repeat: int = 1


QUICK = Sizes(ttft_streams=(100, 200), ttft_seconds=4.0, held_streams=(1000, 2000), held_seconds=4.0,
              throughput_seconds=5.0, slow_clients=200, slow_seconds=12.0, stalled_clients=30,
              stall_hold=20.0, overload_settle=2.0, probe_seconds=5.0, probe_grace=5.0)

TTFT_PROMPT = 'fake: {"ttft": 0.1, "itl": 0.02, "tokens": 50}'
HELD_PROMPT = 'fake: {"ttft": 600, "tokens": 1}'
INSTANT_PROMPT = 'fake: {"ttft": 0, "itl": 0, "tokens": 50}'
SLOW_TOKEN_BYTES, SLOW_ITL = 1000, 0.05  # ~20 KB/s per stream from the provider
SLOW_PROMPT = f'fake: {{"tokens": 100000, "itl": {SLOW_ITL}, "token_bytes": {SLOW_TOKEN_BYTES}}}'
STALL_PROMPT = 'fake: {"tokens": 20000, "itl": 0.002, "token_bytes": 1000}'  # 20 MB, ~40 s
CPU_TOKENS, CPU_ITL = 50, 0.04  # 25 tokens/s per stream
CPU_PROMPT = f'fake: {{"ttft": 0.1, "itl": {CPU_ITL}, "tokens": {CPU_TOKENS}}}'
OVERLOAD_ITL = 0.02  # h: 50 tokens/s per old stream, as in a; tokens enough to outlast any run
OVERLOAD_PROMPT = f'fake: {{"ttft": 0.1, "itl": {OVERLOAD_ITL}, "tokens": 1000000}}'
PROBE_PROMPT = 'fake: {"ttft": 0.1, "itl": 0.02, "tokens": 5}'  # h: a new stream: first token 100 ms away


class Provider:
    """The fake provider's control endpoints."""

    def __init__(self, v1: str) -> None:
        self.base = v1.rsplit("/v1", 1)[0]

    async def reset(self) -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            (await c.post(self.base + "/_fake/reset")).raise_for_status()

    async def records(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.get(self.base + "/_fake/requests")
            r.raise_for_status()
            return [x for x in r.json() if x["path"].endswith("/chat/completions")]


async def measure(target: Running, prompt: str, shape: Shape, *, behaviour: Behaviour = Behaviour(),
                  stream: bool = True, sample: bool = True, interval: float = 0.1) -> RunResult:
    sampling = Sampling(target_pids=target.pids, interval=interval) if sample else Sampling()
    settings = RunSettings(target=target.load_target(prompt, stream=stream), shape=shape,
                           behaviour=behaviour, sampling=sampling, progress=False)
    return await run(settings)


def _errors(result: RunResult) -> int:
    return result.summary.errors


def _cores(result: RunResult) -> float | None:
    s = result.summary
    return round(s.target_cpu_s / s.duration_s, 2) if s.target_cpu_s is not None and s.duration_s else None


async def ttft(target: Running, sizes: Sizes, n: int) -> dict[str, Any]:
    """a. TTFT (and inter-token gaps) at n concurrent streams; the ramp keeps starts spread."""
    ramp = max(1.0, n / 500)
    runs = []
    for _ in range(sizes.repeat):
        runs.append(await measure(target, TTFT_PROMPT, Shape(concurrency=n, ramp_up=ramp,
                                                             duration=ramp + sizes.ttft_seconds)))
        await trio.sleep(1)
    s = [r.summary for r in runs]
    return {
        "streams": n,
        "ttft_p50": _median(x.ttft_ms["p50"] for x in s), "ttft_p99": _median(x.ttft_ms["p99"] for x in s),
        "itl_p50": _median(x.itl_ms["p50"] for x in s), "itl_p99": _median(x.itl_ms["p99"] for x in s),
        "first_tokens": sum(1 for r in runs for x in r.samples if not math.isnan(x.first_token)),
        "error_kinds": _error_kinds(s),
        "requests": sum(x.requests for x in s),
        "tokens_per_s": median(x.output_tokens_per_s for x in s),
        "errors": sum(x.errors for x in s), "cores": median(_cores(r) or 0 for r in runs),
        "loadgen_cores": median(x.loadgen_cores or 0 for x in s),
        "runs": len(runs), "ttft_cdf": cdf(sorted(v for r in runs for v in _ttfts(r))),
    }


def _error_kinds(summaries) -> dict[str, str]:
    """Each error kind with its count and one example message."""
    out: dict[str, str] = {}
    for x in summaries:
        for kind, detail in x.error_details.items():
            out.setdefault(kind, detail[:120])
    counts = {k: sum(x.outcomes.get(k, 0) for x in summaries) for k in out}
    return {k: f"{counts[k]}: {v}" for k, v in out.items()}


def _median(values) -> float | None:
    """Median of the runs that measured something (None: no run did)."""
    present = [v for v in values if v is not None]
    return median(present) if present else None


def cdf(values: list[float], points: int = 201) -> list[float]:
    """The TTFT distribution as evenly spaced quantiles (for the chart; bounded size in the JSON)."""
    return [round(percentile(values, 100 * i / (points - 1)), 2) for i in range(points)] if values else []


def _ttfts(result: RunResult) -> list[float]:
    origin = (lambda x: x.scheduled) if result.settings.shape.open_loop else (lambda x: x.sent)
    return sorted((x.first_token - origin(x)) * 1000 for x in result.samples if not math.isnan(x.first_token))


async def held(target: Running, sizes: Sizes, n: int) -> dict[str, Any]:
    """b. RSS per open stream with n streams held open (headers sent, first token 10 min away)."""
    ramp = max(1.0, n / 1000)
    r = await measure(target, HELD_PROMPT, Shape(concurrency=n, requests=n, ramp_up=ramp,
                                                 duration=ramp + sizes.held_seconds, timeout=600),
                      interval=0.25)
    s = r.summary
    return {"streams": n, "open_peak": s.open_streams_peak, "rss_idle_mb": s.target_rss_mb["idle"],
            "rss_peak_mb": s.target_rss_mb["peak"], "kb_per_stream": s.kb_per_stream, "errors": s.errors,
            "error_kinds": {k: v for k, v in s.outcomes.items() if k not in ("ok", "cancelled")},
            "loadgen_rss_mb": s.loadgen_rss_mb_peak}


async def held_http2(target: Running, sizes: Sizes, n: int, *, healthz: bool = False) -> dict[str, Any]:
    """b over HTTP/2: n held streams multiplexed `h2_streams_per_connection` to an h2c connection.

    As `held` (same request, ramp and hold; RSS sampled the same way, KB per stream over the
    plateau), but the target needs one client descriptor per connection instead of per stream.
    `healthz`: the target is this gateway, whose `/healthz` tells how many streams it holds.
    """
    ramp = max(1.0, n / 1000)
    request = held_h2.H2Request.of(target.load_target(HELD_PROMPT))
    healthz_url = target.urls[0].rsplit("/v1", 1)[0] + "/healthz"
    async with httpx.AsyncClient(timeout=10) as http:
        async def count_open() -> int | None:
            try:
                r = await http.get(healthz_url)
                return r.json().get("open_streams") if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return None

        client, s = await held_h2.hold(target.pids, request, n, per_connection=sizes.h2_streams_per_connection,
                                       ramp=ramp, settle=sizes.h2_settle, hold_for=sizes.held_seconds,
                                       interval=0.25, count_open=count_open if healthz else None)
    return {"streams": n, "connections": client.connections, "sent_peak": client.peak,
            "open_peak": s.open_streams_peak, "answered": client.answered, "held_at_end": client.target_open,
            "held_after_s": client.held_after, "goaways": client.goaways,
            "rss_idle_mb": s.target_rss_mb["idle"], "rss_peak_mb": s.target_rss_mb["peak"],
            "kb_per_stream": s.kb_per_stream, "errors": s.errors, "error_kinds": client.error_kinds(),
            "error_details": {k: v[:120] for k, v in s.error_details.items()},
            "loadgen_rss_mb": s.loadgen_rss_mb_peak, "loadgen_cores": s.loadgen_cores,
            "held_by": "gateway /healthz" if healthz else "200 + role chunk"}


async def throughput(target: Running, sizes: Sizes) -> dict[str, Any]:
    """c. Peak rates with an instant provider: streams/s, tokens/s, then non-streaming requests/s."""
    c, secs = sizes.throughput_concurrency, sizes.throughput_seconds
    streams, plain = [], []
    for _ in range(sizes.repeat):
        streams.append(await measure(target, INSTANT_PROMPT, Shape(concurrency=c, duration=secs)))
        plain.append(await measure(target, INSTANT_PROMPT, Shape(concurrency=c, duration=secs), stream=False))
    return {
        "streams_per_s": median(r.summary.requests_per_s for r in streams),
        "tokens_per_s": median(r.summary.output_tokens_per_s for r in streams),
        "stream_cores": median(_cores(r) or 0 for r in streams),
        "loadgen_cores": median(r.summary.loadgen_cores or 0 for r in streams),
        "requests_per_s": median(r.summary.requests_per_s for r in plain),
        "plain_cores": median(_cores(r) or 0 for r in plain),
        "ttft_p50": _median(r.summary.ttft_ms["p50"] for r in streams),
        "errors": sum(r.summary.errors for r in streams + plain), "runs": len(streams),
    }


async def slow_clients(target: Running, sizes: Sizes, provider: Provider) -> dict[str, Any]:
    """d. Clients reading at a tenth of the provider's rate: does memory stay bounded?"""
    n = sizes.slow_clients
    provider_rate = (SLOW_TOKEN_BYTES + 150) / SLOW_ITL  # payload bytes/s of one stream, about
    await provider.reset()
    r = await measure(target, SLOW_PROMPT, Shape(concurrency=n, requests=n, ramp_up=2.0,
                                                 duration=2.0 + sizes.slow_seconds, timeout=600),
                      behaviour=Behaviour(read_rate=provider_rate / 10), interval=0.25)
    records = await provider.records()
    sent = sum(x["bytes_sent"] for x in records)
    read = sum(x.bytes_in for x in r.samples)
    s = r.summary
    return {"clients": n, "read_rate": round(provider_rate / 10), "rss_idle_mb": s.target_rss_mb["idle"],
            "rss_peak_mb": s.target_rss_mb["peak"], "kb_per_stream": s.kb_per_stream,
            "provider_sent_mb": round(sent / 1e6, 1), "clients_read_mb": round(read / 1e6, 1),
            "in_flight_kb_per_stream": round((sent - read) / 1e3 / n, 1), "errors": s.errors}


async def stalled(target: Running, sizes: Sizes, provider: Provider) -> dict[str, Any]:
    """e. Clients that stop reading after 5 events and hold the socket: when is upstream released?"""
    n, hold = sizes.stalled_clients, sizes.stall_hold
    await provider.reset()
    r = await measure(target, STALL_PROMPT, Shape(concurrency=n, requests=n, ramp_up=1.0,
                                                  duration=hold + 5, timeout=600),
                      behaviour=Behaviour(stall_after=5, hold=hold), interval=0.25)
    records = await provider.records()
    stalled_at = [x.stalled_at - x.sent for x in r.samples if not math.isnan(x.stalled_at)]
    life = [x["ended_at"] - x["started_at"] for x in records if x["ended_at"] is not None]
    offset = median(stalled_at) if stalled_at else math.nan
    # Only meaningful one upstream request per client: a target that retries upstream is reported
    # by its request count instead.
    released = [t - offset for t in life if t - offset < hold - 0.5] if len(records) == n else []
    return {
        "clients": n, "stalled": len(stalled_at), "hold_s": hold, "upstream_requests": len(records),
        "released_during_hold": len(released),
        "release_p50_s": round(median(released), 2) if released else None,
        "release_max_s": round(max(released), 2) if released else None,
        "provider_completed": sum(1 for x in records if x["completed"]),
        "provider_sent_mb": round(sum(x["bytes_sent"] for x in records) / 1e6, 1),
        "rss_peak_mb": r.summary.target_rss_mb["peak"], "errors": r.summary.errors,
    }


async def cpu_per_token(target: Running, sizes: Sizes) -> dict[str, Any]:
    """g. Target CPU µs per relayed token: n streams x 50 tokens at 25 tokens/s, `cpu_waves` waves.

    Closed loop: n clients, each sending `cpu_waves` requests back to back on its keep-alive
    connection, started over 1 s. The target's CPU time over the whole run (accepting, request
    set-up, relaying, teardown) divided by the content tokens the clients received; median over
    `repeat` runs on the same target process.
    """
    n, waves = sizes.cpu_streams, sizes.cpu_waves
    per_request = 0.1 + CPU_TOKENS * CPU_ITL
    runs = []
    for _ in range(sizes.repeat):
        # Bounded by the request count; the duration is only a backstop for a target that stalls.
        runs.append(await measure(target, CPU_PROMPT, Shape(concurrency=n, requests=n * waves, ramp_up=1.0,
                                                            duration=1.0 + 4 * waves * per_request + 30)))
        await trio.sleep(1)
    s = [r.summary for r in runs]
    tokens = [sum(x.tokens for x in r.samples) for r in runs]
    return {
        "streams": n, "waves": waves, "requests": sum(x.requests for x in s), "tokens": median(tokens),
        "expected_tokens": n * waves * CPU_TOKENS,
        "cpu_s": _median(x.target_cpu_s for x in s),
        "cpu_us_per_token": _median(x.target_cpu_us_per_token for x in s),
        "cpu_us_per_token_runs": [x.target_cpu_us_per_token for x in s],
        "cores": median(_cores(r) or 0 for r in runs),
        "loadgen_cores": median(x.loadgen_cores or 0 for x in s),
        "ttft_p50": _median(x.ttft_ms["p50"] for x in s), "itl_p99": _median(x.itl_ms["p99"] for x in s),
        "errors": sum(x.errors for x in s), "error_kinds": _error_kinds(s), "runs": len(runs),
    }


class _OldStreams:
    """h's background load: n long streams, started evenly over `ramp` s, each on its own connection.

    Built on `Client` rather than `run` so the scenario can read the old streams' counters at the
    edges of the measured window: the inter-token gaps are appended in arrival order, so a slice
    of `itl` between two marks is exactly the gaps that ended inside the window. A stream that
    ends (an error: none is meant to end) is replaced after 0.5 s, so a failing target is not
    hammered by a closed loop.
    """

    def __init__(self, target: Running, n: int, provider: Running | None = None) -> None:
        self.n, self.live, self.itl, self.samples = n, Live(), array("d"), []
        self.pids = target.pids
        self.provider_pids = provider.pids if provider is not None and provider is not target else ()
        self.client = Client(target.load_target(OVERLOAD_PROMPT), Behaviour(), self.live, self.itl,
                             trio.current_time() - time.perf_counter(), timeout=3600)

    async def run(self, ramp: float) -> None:
        await self.client.resolve()
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(self.n):
                nursery.start_soon(self._stream, start + ramp * w / self.n)

    async def _stream(self, at: float) -> None:
        await self.client.sleep_until(at)
        while True:
            sample = Sample(len(self.samples), 0, time.perf_counter())
            self.samples.append(sample)
            await self.client.request(sample, None, keep=False)
            if is_error(sample.outcome):
                await trio.sleep(0.5)

    def mark(self) -> dict[str, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {"at": time.perf_counter(), "itl": len(self.itl), "tokens": self.live.tokens,
                "cpu": target_usage(self.pids)[1] if self.pids else math.nan,
                "provider_cpu": target_usage(self.provider_pids)[1] if self.provider_pids else math.nan,
                "machine_cpu": _machine_busy_s(),
                "self_cpu": own.ru_utime + own.ru_stime, "open": self.live.open_streams}


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every process, ours or not): /proc/stat, all cores."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def _probe_ttft(result: RunResult) -> dict[str, Any]:
    """New streams: TTFT from each one's scheduled start (open loop: a late start cannot hide)."""
    s = result.summary
    return {"p50": s.ttft_ms["p50"], "p99": s.ttft_ms["p99"], "max": s.ttft_ms["max"],
            "no_first_token": sum(1 for x in result.samples if math.isnan(x.first_token)),
            "errors": s.errors, "error_kinds": _error_kinds([s]), "cdf": cdf(_ttfts(result))}


async def overload_fairness(target: Running, sizes: Sizes, n: int, provider: Running | None = None
                            ) -> dict[str, Any]:
    """h. Under overload, are NEW streams' first tokens starved behind the token flow of OLD ones?

    1. Idle: `probe_rate` new streams per second for `probe_seconds` (open loop, each on a new
       connection, provider TTFT 100 ms, 5 tokens): their TTFT on this idle target.
    2. Loaded: n old streams at 50 tokens/s each (15,000 tokens/s at 300: past what one Python
       relay process at ~80 µs per held-stream token can do, so a gateway is CPU-bound),
       started over n/100 s; after `overload_settle` s the same trickle of new streams again,
       on the same target process. Over the trickle's window: the old streams' inter-token gaps
       and delivered tokens/s, the cores (CPU s / wall s) of the target, of `provider` (the
       upstream, when it is not the target), of the load generator, and of the whole machine
       (near its core count, the machine and not the target is the limit).
    Starvation: new streams' added TTFT (loaded - idle) far above the old streams' gaps, or new
    streams without a first token before the cut (`probe_grace` s after the last arrival).
    Fair: a new stream waits about as long as an old one waits for its next token.
    One run per target and n, not repeated (~40 s at the default sizes, each bounded by them).
    """
    rate, window = sizes.probe_rate, sizes.probe_seconds
    shape = Shape(rate=rate, requests=max(1, round(rate * window)), duration=window + sizes.probe_grace,
                  timeout=window + sizes.probe_grace)
    idle = _probe_ttft(await measure(target, PROBE_PROMPT, shape, sample=False))
    await trio.sleep(0.5)
    old = _OldStreams(target, n, provider)
    ramp = n / 100
    async with trio.open_nursery() as nursery:
        nursery.start_soon(old.run, ramp)
        await trio.sleep(ramp + sizes.overload_settle)
        before = old.mark()
        loaded_run = await measure(target, PROBE_PROMPT, shape, sample=False)
        after = old.mark()
        nursery.cancel_scope.cancel()
    loaded = _probe_ttft(loaded_run)
    wall = after["at"] - before["at"]
    gaps = sorted(old.itl[int(before["itl"]):int(after["itl"])])

    def gap(q: float) -> float | None:
        return round(percentile(gaps, q) * 1000, 3) if gaps else None

    def minus(a: float | None, b: float | None) -> float | None:
        return round(a - b, 3) if a is not None and b is not None else None

    def rate_of(key: str) -> float | None:  # CPU seconds per wall second over the window
        used = after[key] - before[key]
        return round(used / wall, 2) if wall > 0 and not math.isnan(used) else None

    return {
        "streams": n, "offered_tokens_per_s": round(n / OVERLOAD_ITL), "probe_rate": rate,
        "probes": shape.requests, "window_s": round(wall, 2),
        "idle_ttft_p50": idle["p50"], "idle_ttft_p99": idle["p99"], "idle_no_first_token": idle["no_first_token"],
        "ttft_p50": loaded["p50"], "ttft_p99": loaded["p99"], "ttft_max": loaded["max"],
        "added_p50": minus(loaded["p50"], idle["p50"]), "added_p99": minus(loaded["p99"], idle["p99"]),
        "no_first_token": loaded["no_first_token"],
        "probe_errors": idle["errors"] + loaded["errors"],
        "error_kinds": {**idle["error_kinds"], **loaded["error_kinds"]},
        "old_open": int(after["open"]), "old_open_before": int(before["open"]),
        "old_tokens_per_s": round((after["tokens"] - before["tokens"]) / wall) if wall > 0 else None,
        "old_itl_p50": gap(50), "old_itl_p99": gap(99), "old_itl_max": gap(100),
        "old_errors": sum(1 for x in old.samples if is_error(x.outcome)),
        "old_error_kinds": _error_kinds_of(old.samples),
        "cores": rate_of("cpu"), "provider_cores": rate_of("provider_cpu"), "machine_cores": rate_of("machine_cpu"),
        "loadgen_cores": rate_of("self_cpu"), "machine_cpus": os.cpu_count(),
        "idle_ttft_cdf": idle["cdf"], "ttft_cdf": loaded["cdf"],
    }


def _error_kinds_of(samples: list[Sample]) -> dict[str, str]:
    out: dict[str, list] = {}
    for x in samples:
        if is_error(x.outcome):
            out.setdefault(x.outcome, [0, x.detail[:120]])[0] += 1
    return {k: f"{c}: {d}" for k, (c, d) in out.items()}
