"""From raw samples to the numbers a run reports: percentiles, rates, memory per open stream.

Rules:
- Percentiles are exact (sorted data, linear interpolation between closest ranks, as numpy's
  default), never estimated from buckets: the accuracy claims in bench.md rest on them.
- Latency origin: open loop measures from each request's *scheduled* start (a late load
  generator cannot hide queueing: no coordinated omission); closed loop from just before the
  request's first byte is written. TTFT counts every request that received a content token;
  end-to-end only requests that ended "ok".
- Memory per open stream: the target's RSS above its idle RSS, divided by the open streams at
  the same instant, taken as the median over the plateau (samples with at least 90% of the peak
  open streams), so one GC spike or one slow sample cannot make the number.
- Tokens: `output_tokens_per_s` is from the tokenizer's count (`loadtest.tokens`), not events;
  `usage_mismatch` is the share of responses reporting usage whose usage is off the count by more
  than 2 % (None when no response reported usage).
- SLO attainment and goodput per `loadtest.slo`.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from statistics import median
from typing import TYPE_CHECKING, Any, Sequence

from .client import Sample, is_error
from .memory import MemorySample
from .tokens import disagrees

if TYPE_CHECKING:
    from .slo import SLO

PLATEAU = 0.9


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """q in [0, 100] over already sorted values; NaN when there are none."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = (n - 1) * q / 100.0
    lo = int(rank)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def _ms(values: list[float], qs: dict[str, float]) -> dict[str, float]:
    values.sort()
    out = {name: round(percentile(values, q) * 1000, 3) for name, q in qs.items()}
    return {k: (None if math.isnan(v) else v) for k, v in out.items()}


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    errors: int
    outcomes: dict[str, int]
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    output_tokens_per_s: float
    requests_per_s: float
    duration_s: float
    open_streams_peak: int
    target_rss_mb: dict[str, float | None]
    kb_per_stream: float | None
    target_cpu_s: float | None
    target_cpu_us_per_token: float | None  # target CPU seconds * 1e6 / tokens relayed
    loadgen_rss_mb_peak: float | None
    loadgen_cores: float | None  # the load generator's CPU seconds per wall second: near 1.0, it limits
    latency_origin: str
    error_details: dict[str, str] = field(default_factory=dict)  # one example per error kind
    load: dict[str, Any] = field(default_factory=dict)  # {"concurrency": N} or {"rate": R}
    tokenizer: str = "events"
    output_tokens: int = 0  # counted (see tokenizer)
    input_tokens: int = 0  # counted, of the measured requests' prompts
    usage_checked: int = 0  # responses that reported usage
    usage_mismatch: float | None = None  # share of those off the count by > 2 %
    slo: dict[str, float] | None = None
    slo_attainment: float | None = None  # share of requests meeting every bound
    goodput_rps: float | None = None  # requests/s meeting every bound
    # completions/s between the first and the last "ok" end: what the target delivered, free of
    # the latency at both ends of the window (a sweep's saturation test uses it)
    delivered_rps: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def origin(sample: Sample, open_loop: bool) -> float:
    return sample.scheduled if open_loop else sample.sent


def summarize(samples: list[Sample], itl: array, memory: list[MemorySample], *, open_loop: bool,
              peak_open: int, slo: "SLO | None" = None, tokenizer: str = "events",
              load: dict[str, Any] | None = None) -> Summary:
    outcomes = Counter(s.outcome for s in samples)
    errors = sum(n for kind, n in outcomes.items() if is_error(kind))
    details: dict[str, str] = {}
    for s in samples:
        if is_error(s.outcome) and s.outcome not in details:
            details[s.outcome] = s.detail
    ttft = [s.first_token - origin(s, open_loop) for s in samples if not math.isnan(s.first_token)]
    e2e = [s.ended - origin(s, open_loop) for s in samples if s.outcome == "ok"]
    finished = [s for s in samples if not math.isnan(s.ended)]
    if finished:
        duration = max(s.ended for s in finished) - min(s.scheduled for s in samples)
    else:
        duration = 0.0
    tokens = sum(s.tokens for s in samples)  # content events: what the target relayed
    counted = sum(s.output_tokens for s in samples)
    reported = [s for s in samples if s.usage_tokens >= 0 and s.outcome == "ok"]
    mismatched = sum(1 for s in reported if disagrees(s.output_tokens, s.usage_tokens))
    ends = sorted(s.ended for s in samples if s.outcome == "ok")
    delivered = round((len(ends) - 1) / (ends[-1] - ends[0]), 2) if len(ends) > 1 and ends[-1] > ends[0] else None
    attainment = goodput = None
    if slo is not None:
        met = sum(1 for s in samples if slo.met(s, origin(s, open_loop)))
        attainment = round(met / len(samples), 4) if samples else None
        goodput = round(met / duration, 2) if duration > 0 else 0.0
    rss_idle, rss_peak, kb, cpu, self_peak = _memory(memory, samples)
    self_cores = None
    if len(memory) > 1 and memory[-1].at > memory[0].at:
        self_cores = round((memory[-1].self_cpu_s - memory[0].self_cpu_s) / (memory[-1].at - memory[0].at), 2)
    return Summary(
        requests=len(samples),
        ok=outcomes.get("ok", 0),
        errors=errors,
        outcomes=dict(outcomes),
        ttft_ms=_ms(ttft, {"p50": 50, "p90": 90, "p99": 99, "max": 100}),
        itl_ms=_ms(list(itl), {"p50": 50, "p90": 90, "p99": 99, "max": 100}),
        e2e_ms=_ms(e2e, {"p50": 50, "p90": 90, "p99": 99, "max": 100}),
        output_tokens_per_s=round(counted / duration, 1) if duration > 0 else 0.0,
        requests_per_s=round(outcomes.get("ok", 0) / duration, 2) if duration > 0 else 0.0,
        duration_s=round(duration, 3),
        open_streams_peak=peak_open,
        target_rss_mb={"idle": rss_idle, "peak": rss_peak},
        kb_per_stream=kb,
        target_cpu_s=cpu,
        target_cpu_us_per_token=cpu_per_token(memory, tokens),
        loadgen_rss_mb_peak=self_peak,
        loadgen_cores=self_cores,
        latency_origin="scheduled start" if open_loop else "request write",
        error_details=details,
        load=dict(load or {}),
        tokenizer=tokenizer,
        output_tokens=counted,
        input_tokens=sum(s.input_tokens for s in samples),
        usage_checked=len(reported),
        usage_mismatch=round(mismatched / len(reported), 4) if reported else None,
        slo=slo.to_json() if slo is not None else None,
        slo_attainment=attainment,
        goodput_rps=goodput,
        delivered_rps=delivered,
    )


def cpu_per_token(memory: list[MemorySample], tokens: int) -> float | None:
    """µs of target CPU per content token received; from the unrounded CPU seconds."""
    if len(memory) < 2 or tokens <= 0:
        return None
    return round((memory[-1].cpu_s - memory[0].cpu_s) * 1e6 / tokens, 2)


def _memory(memory: list[MemorySample], samples: list[Sample]
            ) -> tuple[float | None, float | None, float | None, float | None, float | None]:
    if not memory:
        return None, None, None, None, None
    sent = [s.sent for s in samples if not math.isnan(s.sent)]
    first_sent = min(sent) if sent else math.inf
    before = [m.rss_kb for m in memory if m.at < first_sent and m.open_streams == 0] or [memory[0].rss_kb]
    idle = median(before)
    peak = max(m.rss_kb for m in memory)
    top = max(m.open_streams for m in memory)
    kb = None
    if top > 0:
        plateau = [(m.rss_kb - idle) / m.open_streams for m in memory
                   if m.open_streams >= PLATEAU * top]
        kb = round(median(plateau), 2)
    cpu = round(memory[-1].cpu_s - memory[0].cpu_s, 2)
    self_peak = round(max(m.self_rss_kb for m in memory) / 1024, 1)
    return round(idle / 1024, 1), round(peak / 1024, 1), kb, cpu, self_peak
