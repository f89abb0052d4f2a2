"""`--plot PATH`: one PNG of a run or a sweep, titled with its parameters.

Panels: TTFT and inter-token latency CDFs (one line per step, p50 and p99 marked), throughput and
goodput against load (a sweep) or open streams over time (one step), and the target's RSS over
time with open streams. Every axis starts at zero; every panel has a legend; a run where nothing
succeeded says so across the figure.

matplotlib is optional (the `[plot]` extra); the command line checks for it before the run
starts. It is imported here only, with the non-interactive Agg backend: no display needed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import RunResult
    from .sweep import Sweep


def title(params: dict[str, Any]) -> str:
    keys = ("url", "model", "concurrency", "rate", "sweep", "duration", "requests", "warmup",
            "prompts", "max_tokens", "tokenizer", "slo")
    shown = []
    for k in keys:
        v = params.get(k)
        if v not in (None, [], ""):
            if isinstance(v, list):
                v = ",".join(str(x) for x in v)
            shown.append(f"{k.replace('_', '-')} {v}")
    lines, line = [], "loadtest:"
    for part in shown:  # wrapped, never cut: the title is the run's record
        if len(line) + len(part) > 130:
            lines.append(line)
            line = ""
        line = f"{line} {part};" if line else f"{part};"
    return "\n".join(lines + [line.rstrip(";")])


def plot_run(result: "RunResult", path: str, params: dict[str, Any] | None = None) -> None:
    from .sweep import Sweep, knee

    sweep = Sweep([result])
    sweep.knee, sweep.knee_note = knee(sweep.steps)
    plot_sweep(sweep, path, params or {"url": ",".join(result.settings.target.urls),
                                       "model": result.settings.target.model, **result.summary.load})


def _cdf(ax, per_step: list[tuple[str, list[float]]], xlabel: str, name: str) -> None:
    """CDF lines with p50/p99 markers (values written out when there is one line to label)."""
    from .stats import percentile

    for label, values in per_step:
        values.sort()
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        (line,) = ax.plot(values, ys, label=label)
        for q, marker in ((50, "o"), (99, "^")):
            x = percentile(values, q)
            ax.plot([x], [q / 100], marker=marker, color=line.get_color(), markerfacecolor="white",
                    linestyle="none")
            if len(per_step) == 1:
                ax.annotate(f"p{q} {x:.1f}", (x, q / 100), textcoords="offset points", xytext=(5, -10),
                            fontsize=7, color=line.get_color())
    ax.plot([], [], marker="o", color="gray", markerfacecolor="white", linestyle="none", label="p50")
    ax.plot([], [], marker="^", color="gray", markerfacecolor="white", linestyle="none", label="p99")
    ax.set(title=name, xlabel=xlabel, ylabel="share of requests")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3)


def plot_sweep(sweep: "Sweep", path: str, params: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import origin

    steps = sweep.steps
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ttft_ax, itl_ax), (load_ax, mem_ax) = axes
    fig.suptitle(title(params), fontsize=10)

    def label(r: "RunResult") -> str:
        load = r.summary.load
        return f"rate {load['rate']:g}/s" if "rate" in load else f"concurrency {load.get('concurrency')}"

    _cdf(ttft_ax, [(label(r), [(s.first_token - origin(s, r.settings.shape.open_loop)) * 1000
                               for s in r.samples if not math.isnan(s.first_token)]) for r in steps],
         "TTFT ms", "Time to first token (CDF)")
    _cdf(itl_ax, [(label(r), [g * 1000 for g in (r.itl or ())]) for r in steps],
         "inter-token ms", "Inter-token latency (CDF)")
    if len(steps) > 1:
        xs = [next(iter(r.summary.load.values())) for r in steps]
        load_ax.plot(xs, [r.summary.requests_per_s for r in steps], marker="o", label="requests/s")
        if steps[0].summary.slo is not None:
            load_ax.plot(xs, [r.summary.goodput_rps or 0 for r in steps], marker="s", label="goodput requests/s")
        if sweep.knee is not None:
            kx = sweep.knee.get("rate", sweep.knee.get("concurrency"))
            load_ax.axvline(kx, color="gray", linestyle="--", label=f"knee ({kx:g})")
        xname = "rate offered (requests/s)" if "rate" in steps[0].summary.load else "concurrency"
        load_ax.set(title="Throughput and goodput against load", xlabel=xname, ylabel="requests/s")
    else:
        r = steps[0] if steps else None
        t0 = r.started_at if r else 0.0
        events = sorted([(s.sent - t0, 1) for s in (r.samples if r else []) if not math.isnan(s.sent)] +
                        [(s.ended - t0, -1) for s in (r.samples if r else []) if not math.isnan(s.sent)])
        level, xs, ys = 0, [], []
        for at, step in events:
            level += step
            xs.append(at)
            ys.append(level)
        load_ax.step(xs, ys, where="post", label="open streams")
        load_ax.set(title="Open streams over time", xlabel="seconds", ylabel="open streams")
    load_ax.set_xlim(left=0)
    load_ax.set_ylim(bottom=0)
    load_ax.legend(fontsize=8)
    load_ax.grid(True, alpha=0.3)
    memory = sorted((m for r in steps for m in r.memory), key=lambda m: m.at)  # run order
    if memory:
        t0 = min(r.started_at for r in steps)
        t = [m.at - t0 for m in memory]
        mem_ax.plot(t, [m.rss_kb / 1024 for m in memory], color="tab:blue", label="target RSS MB")
        streams = mem_ax.twinx()
        streams.plot(t, [m.open_streams for m in memory], color="tab:orange", label="open streams")
        streams.set_ylabel("open streams")
        streams.set_ylim(bottom=0)
        handles = mem_ax.get_legend_handles_labels()[0] + streams.get_legend_handles_labels()[0]
        mem_ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower right")
        mem_ax.set(title="Target RSS and open streams", xlabel="seconds", ylabel="target RSS MB")
    else:
        mem_ax.text(0.5, 0.5, "target not sampled: pass --target-pid", ha="center", va="center",
                    transform=mem_ax.transAxes)
        mem_ax.set(title="Target RSS", xlabel="seconds", ylabel="target RSS MB")
    mem_ax.set_xlim(left=0)
    mem_ax.set_ylim(bottom=0)
    mem_ax.grid(True, alpha=0.3)
    if not any(r.summary.ok for r in steps):
        fig.text(0.5, 0.5, "No request succeeded", ha="center", va="center", fontsize=28, color="red",
                 alpha=0.6)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
