"""What a run prints and writes: the live progress line, the final table, JSON and CSV.

Rules: the table and the JSON show the same numbers (each step of the JSON is
`Summary.to_json()` verbatim; a one-step run also has that step's keys at the top level); the CSV
has one row per request with every timestamp relative to the run's start, in ms, and a `step`.
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
    from .sweep import Sweep


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
        (f"output tokens/s ({s.tokenizer})", _fmt(s.output_tokens_per_s)),
        ("tokens out / in (counted)", f"{_fmt(s.output_tokens)} / {_fmt(s.input_tokens)}"),
        ("usage off the count > 2 %", _usage(s)),
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
    if s.slo is not None:
        rows[10:10] = [(f"SLO attainment ({_slo_text(s.slo)})", _pct(s.slo_attainment)),
                     ("goodput requests/s", _fmt(s.goodput_rps))]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for kind, detail in s.error_details.items():
        if detail:
            lines.append(f"  e.g. {kind}: {detail[:150]}")
    return "\n".join(lines)


def _usage(s: "Summary") -> str:
    if s.usage_mismatch is None:
        return "- (no usage reported)"
    return f"{_pct(s.usage_mismatch)} of {s.usage_checked:,} responses"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _slo_text(slo: dict[str, float]) -> str:
    return ", ".join(f"{k}<={v:g}" for k, v in slo.items())


def _load_text(load: dict[str, Any]) -> str:
    if "rate" in load:
        return f"{load['rate']:g}/s"
    return str(load.get("concurrency", "-"))


STEP_COLUMNS = ("load", "ok / requests", "errors", "req/s", "tokens/s", "TTFT p50 / p99 ms",
                "ITL p50 / p99 ms", "e2e p50 / p99 ms", "SLO met", "goodput req/s", "usage off")


def step_rows(sweep: "Sweep") -> list[list[str]]:
    rows = []
    for r in sweep.steps:
        s = r.summary
        rows.append([
            _load_text(s.load), f"{s.ok:,} / {s.requests:,}", _fmt(s.errors), _fmt(s.requests_per_s),
            _fmt(s.output_tokens_per_s), f"{_fmt(s.ttft_ms['p50'])} / {_fmt(s.ttft_ms['p99'])}",
            f"{_fmt(s.itl_ms['p50'])} / {_fmt(s.itl_ms['p99'])}",
            f"{_fmt(s.e2e_ms['p50'])} / {_fmt(s.e2e_ms['p99'])}", _pct(s.slo_attainment),
            _fmt(s.goodput_rps), _pct(s.usage_mismatch)])
    return rows


def knee_text(sweep: "Sweep") -> str:
    if sweep.knee is None:
        return f"knee: none ({sweep.knee_note})"
    k = sweep.knee
    load = _load_text({x: k[x] for x in ("rate", "concurrency") if x in k})
    what = "rate" if "rate" in k else "concurrency"
    return (f"knee: {what} {load}, {_fmt(k['requests_per_s'])} requests/s, TTFT p50 "
            f"{_fmt(k['ttft_p50_ms'])} ms ({sweep.knee_note})")


def sweep_table(sweep: "Sweep") -> str:
    """One row per step, then the knee; a one-step run prints the single-run table instead."""
    if len(sweep.steps) == 1:
        return table(sweep.steps[0].summary)
    rows = [list(STEP_COLUMNS)] + step_rows(sweep)
    widths = [max(len(row[i]) for row in rows) for i in range(len(STEP_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(knee_text(sweep))
    first = sweep.steps[0].summary
    if first.slo is not None:
        lines.append(f"SLO per request: {_slo_text(first.slo)}")
    return "\n".join(lines)


def write_json(path: str, summary: "Summary", extra: dict[str, Any] | None = None) -> None:
    data = summary.to_json()
    if extra:
        data.update(extra)
    with open(path, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def sweep_json(sweep: "Sweep", parameters: dict[str, Any], exit_code: int) -> dict[str, Any]:
    data: dict[str, Any] = {"parameters": parameters,
                            "steps": [dict(r.summary.to_json(), warmup_requests=r.warmup_requests)
                                      for r in sweep.steps],
                            "knee": sweep.knee, "knee_note": sweep.knee_note, "stopped": sweep.stopped,
                            "exit_code": exit_code}
    if len(sweep.steps) == 1:
        data = {**sweep.steps[0].summary.to_json(), **data}
    return data


def write_sweep_json(path: str, sweep: "Sweep", parameters: dict[str, Any], exit_code: int) -> None:
    with open(path, "wb") as f:
        f.write(orjson.dumps(sweep_json(sweep, parameters, exit_code), option=orjson.OPT_INDENT_2))


CSV_FIELDS = ("step", "index", "endpoint", "outcome", "status", "scheduled_ms", "connect_ms", "sent_ms",
              "ttft_ms", "e2e_ms", "tokens", "events", "bytes_in", "itl_mean_ms", "reused",
              "stalled_at_ms", "output_tokens", "input_tokens", "usage_tokens", "detail")


def write_csv(path: str, result: "RunResult | list[RunResult]") -> None:
    from .stats import origin

    results = result if isinstance(result, list) else [result]
    t0 = results[0].started_at if results else 0.0

    def ms(value: float) -> str:
        return "" if math.isnan(value) else f"{value * 1000:.3f}"

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for step, run in enumerate(results):
            open_loop = run.settings.shape.open_loop
            for s in run.samples:
                base = origin(s, open_loop)
                itl = (s.last_token - s.first_token) / (s.tokens - 1) if s.tokens > 1 else math.nan
                writer.writerow([
                    step, s.index, s.endpoint, s.outcome, s.status, ms(s.scheduled - t0),
                    ms(s.sent - s.connect_start), ms(s.sent - t0), ms(s.first_token - base),
                    ms(s.ended - base) if s.outcome == "ok" else "", s.tokens, s.events, s.bytes_in,
                    ms(itl), int(s.reused), ms(s.stalled_at - t0), s.output_tokens, s.input_tokens,
                    "" if s.usage_tokens < 0 else s.usage_tokens, s.detail,
                ])
