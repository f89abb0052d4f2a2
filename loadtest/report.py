"""What a run prints and writes: the live progress line, the final table, JSON and CSV.

Rules: the table and the JSON show the same numbers (the JSON is `Summary.to_json()` verbatim);
the CSV has one row per request with every timestamp relative to the run's start, in ms.
"""

from __future__ import annotations

import csv
import math
from typing import TYPE_CHECKING, Any

import orjson

from .client import Live

if TYPE_CHECKING:
    from .runner import RunResult
    from .stats import Summary


def progress_line(live: Live, elapsed: float) -> str:
    rate = live.done / elapsed if elapsed > 0 else 0.0
    return (f"[{elapsed:7.1f}s] done {live.done} ok {live.ok} errors {live.errors} "
            f"open streams {live.open_streams} rate {rate:.1f} req/s tokens {live.tokens}")


def _fmt(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if abs(value) < 100 else f"{value:,.1f}{unit}"
    return f"{value:,}{unit}"


def table(summary: "Summary") -> str:
    s = summary
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes.items()) if k != "ok") or "none"
    rows = [
        ("requests", _fmt(s.requests)),
        ("ok", _fmt(s.ok)),
        ("errors", f"{s.errors} ({errors})"),
        ("TTFT ms p50 / p90 / p99 / max", " / ".join(_fmt(s.ttft_ms[k]) for k in ("p50", "p90", "p99", "max"))),
        ("inter-token ms p50 / p99", " / ".join(_fmt(s.itl_ms[k]) for k in ("p50", "p99"))),
        ("end-to-end ms p50 / p99", " / ".join(_fmt(s.e2e_ms[k]) for k in ("p50", "p99"))),
        ("output tokens/s", _fmt(s.output_tokens_per_s)),
        ("requests/s", _fmt(s.requests_per_s)),
        ("duration s", _fmt(s.duration_s)),
        ("open streams peak", _fmt(s.open_streams_peak)),
        ("target RSS MB idle / peak", f"{_fmt(s.target_rss_mb['idle'])} / {_fmt(s.target_rss_mb['peak'])}"),
        ("KB per open stream", _fmt(s.kb_per_stream)),
        ("target CPU s", _fmt(s.target_cpu_s)),
        ("target CPU µs per token", _fmt(s.target_cpu_us_per_token)),
        ("load generator RSS MB peak / cores", f"{_fmt(s.loadgen_rss_mb_peak)} / {_fmt(s.loadgen_cores)}"),
        ("latency measured from", s.latency_origin),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for kind, detail in s.error_details.items():
        if detail:
            lines.append(f"  e.g. {kind}: {detail[:150]}")
    return "\n".join(lines)


def write_json(path: str, summary: "Summary") -> None:
    with open(path, "wb") as f:
        f.write(orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2))


CSV_FIELDS = ("index", "endpoint", "outcome", "status", "scheduled_ms", "connect_ms", "sent_ms",
              "ttft_ms", "e2e_ms", "tokens", "events", "bytes_in", "itl_mean_ms", "reused",
              "stalled_at_ms", "detail")


def write_csv(path: str, result: "RunResult") -> None:
    from .stats import origin

    t0 = result.started_at
    open_loop = result.settings.shape.open_loop

    def ms(value: float) -> str:
        return "" if math.isnan(value) else f"{value * 1000:.3f}"

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for s in result.samples:
            base = origin(s, open_loop)
            itl = (s.last_token - s.first_token) / (s.tokens - 1) if s.tokens > 1 else math.nan
            writer.writerow([
                s.index, s.endpoint, s.outcome, s.status, ms(s.scheduled - t0),
                ms(s.sent - s.connect_start), ms(s.sent - t0), ms(s.first_token - base),
                ms(s.ended - base) if s.outcome == "ok" else "", s.tokens, s.events, s.bytes_in,
                ms(itl), int(s.reused), ms(s.stalled_at - t0), s.detail,
            ])
