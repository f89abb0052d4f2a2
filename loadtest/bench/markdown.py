"""The benchmark's output: machine and versions, one markdown table per scenario, and the charts.

Rules: every number in a table comes from the results JSON written next to it; "-" means not
measured (skipped or failed, with the reason in the notes), never zero. Ratios to the two floors
(floor-trio, floor-hypercorn: bare relays, see floor_trio.py) are shown as columns wherever a
figure has a floor (memory per held stream, CPU per relayed token), "-" when that floor's row is
missing from the results.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from . import peers


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_gb() -> str:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.0f} GB"
    except OSError:
        pass
    return "?"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def environment(cache: Path) -> dict[str, str]:
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        node = "?"
    return {
        "machine": f"{os.cpu_count()} cores ({_cpu()}), {_mem_gb()} RAM, Linux {platform.release()}",
        "python": platform.python_version(),
        "gateway": f"trio-llm-gateway {_version('trio-llm-gateway')} (trio {_version('trio')}, "
                   f"hypercorn {_version('hypercorn')}, httpx {_version('httpx')}, h11 {_version('h11')})",
        "litellm": peers.litellm_version(cache) if peers.litellm_installed(cache) else "not installed",
        "portkey": (peers.portkey_version(cache) + f", node {node}") if peers.portkey_installed(cache)
        else "not installed",
    }


def _v(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


SATURATED = 0.9  # cores: a floor (the provider, one Python process) this busy is itself the limit


def _floor(rows: list[dict], key: str, match: dict, floor: str = "fake") -> float | None:
    """`key` of the row of target `floor` that matches `match` (the same size), if measured."""
    for r in rows:
        if r.get("key") == floor and "failed" not in r and all(r.get(k) == v for k, v in match.items()):
            return r.get(key)
    return None


FLOOR_COLUMNS = (("floor-trio", "× trio floor"), ("floor-hypercorn", "× hypercorn floor"))


def _ratios(rows: list[dict], row: dict, key: str, match: dict) -> list[str]:
    """The row's `key` divided by each floor's at the same size: one cell per FLOOR_COLUMNS."""
    cells = []
    for floor, _ in FLOOR_COLUMNS:
        base, value = _floor(rows, key, match, floor), row.get(key)
        cells.append(_v(value / base, 2) if value is not None and base else "-")
    return cells


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def render(results: dict, charts: list[str]) -> str:
    rows = results["rows"]
    env = results["environment"]
    parts = [
        f"Date: {results['date']}  ",
        f"Machine: {env['machine']}  ",
        f"Python {env['python']}; {env['gateway']}  ",
        f"LiteLLM {env['litellm']}; Portkey {env['portkey']}  ",
        f"Command: `{results['command']}`",
        "",
        "Target command lines:",
        "",
        *[f"- {name}: `{cmd}`" for name, cmd in results["commands"].items()],
        "",
    ]
    if "a" in rows:
        lines = []
        for r in rows["a"]:
            if "failed" in r:
                lines.append([r["target"], "-", *["-"] * 9, r["failed"][:80]])
                continue
            f50 = _floor(rows["a"], "ttft_p50", {"streams": r["streams"]})
            f99 = _floor(rows["a"], "ttft_p99", {"streams": r["streams"]})
            add50 = r["ttft_p50"] - f50 if f50 is not None and r["ttft_p50"] is not None else None
            add99 = r["ttft_p99"] - f99 if f99 is not None and r["ttft_p99"] is not None else None
            if (_floor(rows["a"], "cores", {"streams": r["streams"]}) or 0) >= SATURATED:
                add50 = add99 = "n/a (floor saturated)"  # a difference to an overloaded floor means nothing
            lines.append([r["target"], _v(r["streams"]), _v(r["ttft_p50"]), _v(r["ttft_p99"]),
                          _v(add50), _v(add99), _v(r["itl_p50"]), _v(r["itl_p99"]),
                          _v(r["tokens_per_s"], 0), _v(r.get("cores"), 2), _v(r.get("loadgen_cores"), 2),
                          _v(r["errors"])])
        counts = sorted({r["streams"] for r in rows["a"] if r.get("streams")})
        shown = ", ".join(f"{n:,}" for n in counts[:-1]) + (" and " if len(counts) > 1 else "") + \
            (f"{counts[-1]:,}" if counts else "")
        parts += [f"### a. TTFT at {shown} concurrent streams",
                  "Provider: TTFT 100 ms, 50 tokens 20 ms apart. Closed loop, starts spread over "
                  "max(1 s, N/500 s), then steady for the measured window. \"Added\" is the target "
                  "minus the provider measured directly (the floor) in the same run. ms.", "",
                  _table(["target", "streams", "TTFT p50", "TTFT p99", "added p50", "added p99",
                          "ITL p50", "ITL p99", "tokens/s", "target cores", "load gen cores", "errors"],
                         lines), ""]
        for r in rows["a"]:
            for kind, what in (r.get("error_kinds") or {}).items():
                parts.append(f"- {r['target']} at {r['streams']:,} streams, {kind} x {what}")
        parts.append("")
    if "b" in rows:
        lines = [[r["target"], _v(r.get("streams")), _v(r.get("open_peak")), _v(r.get("rss_idle_mb")),
                  _v(r.get("rss_peak_mb")), _v(r.get("kb_per_stream")),
                  _v(r.get("errors")) + (f" {r['error_kinds']}" if r.get("error_kinds") else ""),
                  *_ratios(rows["b"], r, "kb_per_stream", {"streams": r.get("streams")}),
                  r.get("failed", "")[:80]] for r in rows["b"]]
        parts += ["### b. Memory per held stream",
                  "Streams held open (the provider sent its headers and role chunk, first token 10 min away; "
                  "this gateway holds the role chunk back until the first token). RSS of "
                  "the target's process tree; KB per stream = (RSS - idle) / open streams, median "
                  "over the plateau. × floor: KB / stream over the floor's at the same count.", "",
                  _table(["target", "streams", "open (peak)", "RSS idle MB", "RSS peak MB",
                          "KB / stream", "errors", *[c for _, c in FLOOR_COLUMNS], "note"], lines), ""]
    if "b2" in rows:  # never mixed with b: another per-stream profile (one connection per 100 streams)
        lines = []
        for r in rows["b2"]:
            match = {"streams": r.get("streams"), "connections": r.get("connections")}
            base = _floor(rows["b2"], "kb_per_stream", match, "floor-hypercorn")
            kb = r.get("kb_per_stream")
            kinds = r.get("error_kinds") or {}
            lines.append([r["target"], _v(r.get("streams")), _v(r.get("connections")), _v(r.get("open_peak")),
                          _v(r.get("held_at_end")), r.get("held_by", "-"), _v(r.get("held_after_s")),
                          _v(r.get("answered")), _v(r.get("rss_idle_mb")),
                          _v(r.get("rss_peak_mb")), _v(kb), _v(r.get("errors")) + (f" {kinds}" if kinds else ""),
                          _v(kb / base, 2) if kb is not None and base else "-", _v(r.get("loadgen_cores"), 2),
                          r.get("failed", "")[:80]])
        parts += ["### b over HTTP/2. Memory per held stream, N streams over C h2c connections",
                  "As b (same request, provider TTFT 10 min, ramp N/1000 s, then held 6 s), but the streams "
                  "are multiplexed over h2c connections (prior knowledge), 100 per connection (hypercorn's "
                  "h2_max_concurrent_streams, unchanged in both targets): the target holds one client "
                  "descriptor per connection, not per stream. Another per-stream profile than b's one "
                  "connection per stream: compare rows within this table only. Held: streams the target "
                  "confirms (the floor: 200 and the role chunk received; the gateway, which writes nothing "
                  "before a first token or its 15 s keep-alive: its /healthz count); the hold starts once "
                  "every stream is held (\"all held after\", s from the first stream). Answered: streams that "
                  "received 200 and DATA; on the gateway only those older than its 15 s keep-alive (the "
                  "comment is its first bytes: response headers sent). KB per stream = (RSS - idle) / held streams, "
                  "median over the plateau. × floor: over the hypercorn floor's at the same streams and connections.", "",
                  _table(["target", "streams", "connections", "held (peak)", "held at end", "held by",
                          "all held after s", "answered", "RSS idle MB", "RSS peak MB", "KB / stream", "errors",
                          "× hypercorn floor", "load gen cores", "note"], lines), ""]
    if "c" in rows:
        lines = [[r["target"], _v(r.get("streams_per_s")), _v(r.get("tokens_per_s"), 0),
                  _v(r.get("stream_cores"), 2), _v(r.get("loadgen_cores"), 2), _v(r.get("requests_per_s")),
                  _v(r.get("plain_cores"), 2), _v(r.get("errors")), r.get("failed", "")[:80]] for r in rows["c"]]
        parts += ["### c. Peak throughput (instant provider, 50 tokens, 100 clients)",
                  "Cores = target CPU seconds / wall seconds (1.0 = one core busy).", "",
                  _table(["target", "streams/s", "tokens/s", "target cores", "load gen cores",
                          "non-stream req/s", "target cores", "errors", "note"], lines), ""]
    if "d" in rows:
        lines = [[r["target"], _v(r.get("clients")), _v(r.get("read_rate")), _v(r.get("rss_idle_mb")),
                  _v(r.get("rss_peak_mb")), _v(r.get("kb_per_stream")), _v(r.get("provider_sent_mb")),
                  _v(r.get("clients_read_mb")), _v(r.get("in_flight_kb_per_stream")), _v(r.get("errors")),
                  r.get("failed", "")[:80]] for r in rows["d"]]
        parts += ["### d. Slow clients (reading at a tenth of the provider's rate)",
                  "Provider: 1,000-byte tokens every 50 ms (~23 KB/s per stream). In flight = bytes "
                  "the provider sent minus bytes the clients read (gateway buffers + kernel socket "
                  "buffers on both hops).", "",
                  _table(["target", "clients", "read B/s", "RSS idle MB", "RSS peak MB", "KB / stream",
                          "provider sent MB", "clients read MB", "in flight KB / stream", "errors",
                          "note"], lines), ""]
    if "e" in rows:
        lines = [[r["target"], _v(r.get("stalled")), _v(r.get("upstream_requests")), _v(r.get("hold_s")),
                  _v(r.get("released_during_hold")),
                  _v(r.get("release_p50_s"), 2), _v(r.get("release_max_s"), 2), _v(r.get("provider_completed")),
                  _v(r.get("provider_sent_mb")), _v(r.get("rss_peak_mb")), r.get("failed", "")[:80]]
                 for r in rows["e"]]
        parts += ["### e. Stalled clients",
                  "Each client stops reading after 5 events and holds its socket for the hold time. "
                  "Release = provider connection end minus the stall moment (seconds).", "",
                  _table(["target", "stalled", "upstream requests", "hold s", "released during hold", "release p50 s",
                          "release max s", "provider completed", "provider sent MB", "RSS peak MB",
                          "note"], lines), ""]
    if "f" in rows:
        base = next((r for r in rows["f"] if r.get("processes") == 1), None)
        lines = []
        for r in rows["f"]:
            ratio = (r["tokens_per_s"] / base["tokens_per_s"]) if base and base.get("tokens_per_s") else None
            lines.append([r["target"], _v(r.get("streams_per_s")), _v(r.get("tokens_per_s"), 0),
                          _v(r.get("stream_cores"), 2), _v(r.get("requests_per_s")), _v(ratio, 2)])
        parts += ["### f. Gateway workers: 1 vs 2",
                  "Scenario c against `serve --workers N` (forked processes sharing one listening "
                  "socket; the kernel spreads connections). Cores include every worker.", "",
                  _table(["target", "streams/s", "tokens/s", "cores", "non-stream req/s",
                          "tokens/s vs 1"], lines), ""]
    if "g" in rows:
        lines = []
        for r in rows["g"]:
            match = {"streams": r.get("streams")}
            lines.append([r["target"], _v(r.get("streams")), _v(r.get("tokens")), _v(r.get("cpu_s"), 2),
                          _v(r.get("cpu_us_per_token")), *_ratios(rows["g"], r, "cpu_us_per_token", match),
                          ", ".join(_v(x, 0) for x in r.get("cpu_us_per_token_runs") or []) or "-",
                          _v(r.get("cores"), 2), _v(r.get("loadgen_cores"), 2), _v(r.get("errors")),
                          r.get("failed", "")[:80]])
        parts += ["### g. CPU per relayed token",
                  "Provider: TTFT 100 ms, 50 tokens 40 ms apart (25 tokens/s per stream). N clients "
                  "started over 1 s, 4 requests each back to back on keep-alive connections (4 waves). "
                  "CPU µs / token = the target's CPU seconds over the whole run (request set-up "
                  "included) / content tokens the clients received; median over the runs (each run's "
                  "value listed). × floor: over the floor's µs / token.", "",
                  _table(["target", "streams", "tokens (median run)", "CPU s (median run)", "CPU µs / token",
                          *[c for _, c in FLOOR_COLUMNS], "µs / token per run", "target cores",
                          "load gen cores", "errors", "note"], lines), ""]
        for r in rows["g"]:
            for kind, what in (r.get("error_kinds") or {}).items():
                parts.append(f"- {r['target']}, {kind} x {what}")
        parts.append("")
    if "h" in rows:
        parts += _overload(rows["h"])
    for chart in charts:
        parts.append(f"![{Path(chart).stem}]({chart})")
    if results["notes"]:
        parts += ["", "Notes from this run:", *[f"- {n}" for n in dict.fromkeys(results["notes"])]]
    return "\n".join(parts)


def _limits(row: dict) -> str:
    """What besides the target was at its limit during an h window (the row then shows that limit too)."""
    out = []
    if (row.get("provider_cores") or 0) >= SATURATED:
        out.append("provider saturated")
    cpus = row.get("machine_cpus")
    if cpus and (row.get("machine_cores") or 0) >= SATURATED * cpus:
        out.append("machine saturated")
    return ", ".join(out)


def _overload(rows: list[dict]) -> list[str]:
    """h: new streams' TTFT idle vs under overload, next to the old streams' gaps and the cores."""
    lines = []
    for r in rows:
        if "failed" in r:
            lines.append([r["target"], *["-"] * 19, r["failed"][:80]])
            continue
        added, gap = r.get("added_p99"), r.get("old_itl_p99")
        lines.append([r["target"], _v(r.get("streams")), _v(r.get("offered_tokens_per_s")),
                      _v(r.get("old_tokens_per_s")), _v(r.get("cores"), 2),
                      _v(r.get("idle_ttft_p50")), _v(r.get("idle_ttft_p99")),
                      _v(r.get("ttft_p50")), _v(r.get("ttft_p99")), _v(r.get("added_p50")), _v(added),
                      f"{_v(r.get('no_first_token'))} / {_v(r.get('probes'))}",
                      _v(r.get("old_itl_p50")), _v(gap), _v(r.get("old_itl_max")),
                      _v(added / gap, 1) if added is not None and gap else "-",
                      _v(r.get("provider_cores"), 2), _v(r.get("loadgen_cores"), 2), _v(r.get("machine_cores"), 2),
                      _v((r.get("probe_errors") or 0) + (r.get("old_errors") or 0)), _limits(r)])
    first = next((r for r in rows if "failed" not in r), {})
    rate = first.get("probe_rate", 10.0)
    out = ["### h. Overload fairness: new streams' first token while old streams overload the target",
           "Old streams: N held open at 50 tokens/s each (N × 50 tokens/s offered), started over N/100 s, "
           f"each on its own connection. New streams: {_v(rate)}/s (open loop, constant gaps, each on a new "
           "connection; "
           "provider TTFT 100 ms, 5 tokens), first on the idle target, then on the same process once the "
           "old streams have run a few seconds. TTFT of a new stream is from its scheduled start, ms; "
           "\"added\" = loaded - idle. Delivered tokens/s, old-stream ITL (ms) and cores are over the new "
           "streams' window. \"no first token\": new streams cut without one. Starvation shows as added TTFT "
           "many times the old streams' ITL p99 (\"added p99 / old ITL p99\") or as new streams without a first token; "
           "fair scheduling keeps a new stream's extra wait near one old-stream gap. The floors show what "
           "the shared provider and load generator add at the same load. Machine busy cores: every "
           "process on the machine (other users' included); near the core count the machine, not the "
           "target, is the limit and the row says little about the target.", "",
           _table(["target", "old streams", "offered tok/s", "delivered tok/s", "target cores",
                   "new TTFT p50 idle", "p99 idle", "new TTFT p50 loaded", "p99 loaded", "added p50",
                   "added p99", "no first token", "old ITL p50", "old ITL p99", "old ITL max",
                   "added p99 / old ITL p99", "provider cores", "load gen cores", "machine busy cores",
                   "errors", "note"], lines), ""]
    for r in rows:
        for which, key in (("new streams", "error_kinds"), ("old streams", "old_error_kinds")):
            for kind, what in (r.get(key) or {}).items():
                out.append(f"- {r['target']}, {which}, {kind} x {what}")
    out.append("")
    return out


def write_charts(results: dict, folder: Path) -> list[str]:
    """TTFT CDF per target (scenario a, largest stream count) and KB per held stream (b)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["notes"].append("charts skipped: matplotlib is not installed")
        return []
    rows = results["rows"]
    if not rows.get("a") and not rows.get("b"):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    a = [r for r in rows.get("a", []) if r.get("ttft_cdf")]
    b = [r for r in rows.get("b", []) if r.get("kb_per_stream") is not None]
    targets = list(dict.fromkeys(r["target"] for r in a + b))
    colour = {t: f"C{i}" for i, t in enumerate(targets)}  # one colour per target in every panel
    counts = sorted({r["streams"] for r in a})[-2:]  # the two largest stream counts
    fig, axes = plt.subplots(1, len(counts) + 1, figsize=(6 * (len(counts) + 1), 4.5), squeeze=False)
    axes = axes[0]  # one row; a run of scenario b alone has a single panel
    for ax, n in zip(axes, counts):
        for r in a:
            if r["streams"] == n:
                values = r["ttft_cdf"]
                ax.plot(values, [i / (len(values) - 1) for i in range(len(values))], label=r["target"],
                        color=colour[r["target"]])
        ax.set(title=f"TTFT CDF at {n:,} streams (provider TTFT 100 ms)", xlabel="TTFT ms (log)",
               ylabel="fraction of requests", xscale="log")
        ax.legend()
        ax.grid(True, alpha=0.3)
    ax = axes[-1]
    if b:
        held = [t for t in targets if any(r["target"] == t for r in b)]
        sizes = sorted({r["streams"] for r in b})
        width = 0.8 / len(held)
        for i, t in enumerate(held):
            values = [next((r["kb_per_stream"] for r in b if r["target"] == t and r["streams"] == s), 0)
                      for s in sizes]
            ax.bar([j + i * width for j in range(len(sizes))], values, width, label=t, color=colour[t])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{s:,}" for s in sizes])
        ax.axhline(20, color="black", linestyle="--", linewidth=1, label="goal: 20 KB")
        ax.set(title="RSS per held stream", xlabel="held streams", ylabel="KB per stream")
        ax.legend()
    fig.tight_layout()
    path = folder / "bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
