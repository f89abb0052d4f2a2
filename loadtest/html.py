"""`--html PATH`: one self-contained report file: parameters, the step table, charts as inline SVG.

Rules:
- Nothing is loaded from anywhere: no script, no stylesheet or font link, no CDN; the charts are
  SVG drawn here (no matplotlib needed), so the file opens offline and can be mailed or archived.
- Every chart has zero-based axes, a legend and axis labels; distributions are CDFs with the p50
  and p99 of each step marked. A run where nothing succeeded says so at the top.
- Everything from the run (URLs, model names, error texts) is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from .report import STEP_COLUMNS, knee_text, step_rows
from .stats import origin, percentile

if TYPE_CHECKING:
    from .runner import RunResult
    from .sweep import Sweep

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")
CDF_POINTS = 200
W, H, LEFT, RIGHT, TOP, BOTTOM = 560, 300, 60, 150, 30, 45

Series = tuple[str, Sequence[float], Sequence[float]]  # label, xs, ys


def nice_max(value: float) -> float:
    """The top of a zero-based axis: 1, 2, 2.5 or 5 times a power of ten, at least `value`."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= value:
            return m * power
    return 10 * power


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:,.3g}"


def line_chart(title: str, xlabel: str, ylabel: str, series: list[Series], *,
               markers: list[tuple[str, float, float, str]] = (), step: bool = False,
               note: str = "") -> str:
    """An SVG line chart; `markers` are (color, x, y, label) dots (p50 / p99)."""
    xs_all = [x for _, xs, _ in series for x in xs if math.isfinite(x)]
    ys_all = [y for _, _, ys in series for y in ys if math.isfinite(y)]
    xmax, ymax = nice_max(max(xs_all, default=0.0)), nice_max(max(ys_all, default=0.0))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + pw * x / xmax

    def py(y: float) -> float:
        return TOP + ph * (1 - y / ymax)

    out = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'role="img" aria-label="{html.escape(title)}">',
           f'<text x="{W / 2 - RIGHT / 2}" y="18" text-anchor="middle" class="t">{html.escape(title)}</text>']
    for i in range(6):  # grid and tick labels, 0 included
        gx, gy = xmax * i / 5, ymax * i / 5
        out.append(f'<line x1="{px(gx):.1f}" y1="{TOP}" x2="{px(gx):.1f}" y2="{TOP + ph}" class="g"/>')
        out.append(f'<line x1="{LEFT}" y1="{py(gy):.1f}" x2="{LEFT + pw}" y2="{py(gy):.1f}" class="g"/>')
        out.append(f'<text x="{px(gx):.1f}" y="{TOP + ph + 14}" text-anchor="middle">{_num(gx)}</text>')
        out.append(f'<text x="{LEFT - 4}" y="{py(gy) + 4:.1f}" text-anchor="end">{_num(gy)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="f"/>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{TOP + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {TOP + ph / 2})">{html.escape(ylabel)}</text>')
    for n, (label, xs, ys) in enumerate(series):
        color = COLORS[n % len(COLORS)]
        points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        if step and points:
            stepped = [points[0]]
            for (x0, y0), (x1, y1) in zip(points, points[1:]):
                stepped += [(x1, y0), (x1, y1)]
            points = stepped
        if len(points) == 1:
            x, y = points[0]
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        elif points:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        ly = TOP + 4 + 16 * n
        out.append(f'<line x1="{W - RIGHT + 10}" y1="{ly + 5}" x2="{W - RIGHT + 28}" y2="{ly + 5}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - RIGHT + 32}" y="{ly + 9}">{html.escape(label)}</text>')
    for color, x, y, label in markers:
        if math.isfinite(x) and math.isfinite(y):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="white" stroke="{color}" '
                       f'stroke-width="1.6"><title>{html.escape(label)}</title></circle>')
    if markers:
        ly = TOP + 4 + 16 * len(series)
        out.append(f'<circle cx="{W - RIGHT + 19}" cy="{ly + 5}" r="3.5" fill="white" stroke="#333"/>'
                   f'<text x="{W - RIGHT + 32}" y="{ly + 9}">p50, p99</text>')
    if note or not ys_all:
        out.append(f'<text x="{LEFT + pw / 2}" y="{TOP + ph / 2}" text-anchor="middle" class="n">'
                   f'{html.escape(note or "no data")}</text>')
    out.append("</svg>")
    return "".join(out)


def cdf_series(values: list[float]) -> tuple[list[float], list[float]]:
    values = sorted(values)
    n = len(values)
    if n == 0:
        return [], []
    k = min(n, CDF_POINTS)
    qs = [i / (k - 1) if k > 1 else 1.0 for i in range(k)]
    return [percentile(values, q * 100) for q in qs], qs


def _distribution(title: str, xlabel: str, per_step: list[tuple[str, list[float]]]) -> str:
    series, markers = [], []
    for n, (label, values) in enumerate(per_step):
        xs, ys = cdf_series(values)
        series.append((label, xs, ys))
        color = COLORS[n % len(COLORS)]
        values.sort()
        for q in (50, 99):
            if values:
                markers.append((color, percentile(values, q), q / 100, f"{label}: p{q} {percentile(values, q):.2f}"))
    return line_chart(title, xlabel, "share of requests", series, markers=markers)


def _label(r: "RunResult") -> str:
    load = r.summary.load
    return f"rate {load['rate']:g}/s" if "rate" in load else f"concurrency {load.get('concurrency')}"


def charts(sweep: "Sweep") -> list[str]:
    steps = sweep.steps
    out = []
    if len(steps) > 1:
        xname = "rate (requests/s offered)" if "rate" in steps[0].summary.load else "concurrency"
        xs = [next(iter(r.summary.load.values())) for r in steps]
        series: list[Series] = [("requests/s", xs, [r.summary.requests_per_s for r in steps])]
        if steps[0].summary.slo is not None:
            series.append(("goodput req/s", xs, [r.summary.goodput_rps or 0.0 for r in steps]))
        out.append(line_chart("Throughput and goodput against load", xname, "requests/s", series))
        out.append(line_chart("Output tokens/s against load", xname, "tokens/s",
                              [("output tokens/s", xs, [r.summary.output_tokens_per_s for r in steps])]))
    ttft, itl, e2e = [], [], []
    for r in steps:
        ol = r.settings.shape.open_loop
        ttft.append((_label(r), [(s.first_token - origin(s, ol)) * 1000 for s in r.samples
                                 if not math.isnan(s.first_token)]))
        itl.append((_label(r), [g * 1000 for g in (r.itl or ())]))
        e2e.append((_label(r), [(s.ended - origin(s, ol)) * 1000 for s in r.samples if s.outcome == "ok"]))
    out.append(_distribution("Time to first token (CDF)", "TTFT ms", ttft))
    out.append(_distribution("Inter-token latency (CDF)", "ITL ms", itl))
    out.append(_distribution("End-to-end latency (CDF)", "e2e ms", e2e))
    memory = sorted(((r, m) for r in steps for m in r.memory), key=lambda rm: rm[1].at)  # run order
    if memory:
        t0 = min(r.started_at for r in steps)
        ts = [m.at - t0 for _, m in memory]
        out.append(line_chart("Target RSS over time", "seconds", "MB",
                              [("target RSS MB", ts, [m.rss_kb / 1024 for _, m in memory])]))
        cores_t, cores = [], []
        for (_, a), (_, b) in zip(memory, memory[1:]):
            if b.at > a.at:
                cores_t.append(b.at - t0)
                cores.append((b.cpu_s - a.cpu_s) / (b.at - a.at))
        out.append(line_chart("Target CPU over time", "seconds", "cores (CPU s per s)",
                              [("target cores", cores_t, cores)]))
    else:
        out.append(line_chart("Target RSS and CPU over time", "seconds", "MB", [],
                              note="not sampled: pass --target-pid"))
    return out


STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.params td{text-align:left}
svg{margin:6px;border:1px solid #eee}svg text{font-size:11px;fill:#333}svg .t{font-size:13px;font-weight:600}
svg .g{stroke:#eee}svg .f{fill:none;stroke:#999}svg .n{font-size:14px;fill:#c00}
.warn{color:#b00;font-weight:600}"""


def render(sweep: "Sweep", params: dict[str, Any]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>loadtest report</title>", f"<style>{STYLE}</style></head><body>",
             "<h1>loadtest report</h1>",
             f"<p>{e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))} &middot; "
             f"{len(sweep.steps)} step(s) &middot; {e(knee_text(sweep))}</p>"]
    if sweep.stopped:
        parts.append(f'<p class="warn">Stopped early: {e(sweep.stopped)}</p>')
    if not any(r.summary.ok for r in sweep.steps):
        parts.append('<p class="warn">No request succeeded: the latency charts are empty.</p>')
    parts.append("<h2>Parameters</h2><table class=\"params\">")
    parts += [f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in params.items()]
    parts.append("</table><h2>Steps</h2><table class=\"steps\"><tr>")
    parts += [f"<th>{e(c)}</th>" for c in STEP_COLUMNS]
    parts.append("</tr>")
    for row in step_rows(sweep):
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    if sweep.steps and sweep.steps[0].summary.slo is not None:
        slo = ", ".join(f"{k} &le; {v:g}" for k, v in sweep.steps[0].summary.slo.items())
        parts.append(f"<p>SLO per request: {slo}; goodput = requests meeting it per second.</p>")
    errors = {k: v for r in sweep.steps for k, v in r.summary.error_details.items() if v}
    if errors:
        parts.append("<h2>Errors (one example each)</h2><table class=\"params\">")
        parts += [f"<tr><td>{e(k)}</td><td>{e(v[:300])}</td></tr>" for k, v in errors.items()]
        parts.append("</table>")
    parts.append("<h2>Charts</h2><div>")
    parts += charts(sweep)
    parts.append("</div></body></html>")
    return "\n".join(parts)


def write_html(path: str, sweep: "Sweep", params: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(sweep, params))
