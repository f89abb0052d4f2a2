"""`python -m loadtest.bench`: every scenario against every target in one run -> bench.md tables.

    python -m loadtest.bench                      # everything (about half an hour)
    python -m loadtest.bench --quick              # smaller sizes, a smoke run
    python -m loadtest.bench --targets fake,gateway --scenarios a,c --repeat 3
    python -m loadtest.bench --install-peers      # install LiteLLM / Portkey into .cache/peers first
    python -m loadtest.bench --install-only       # install them and run nothing
    python -m loadtest.bench --targets floor-trio,floor-hypercorn,gateway,portkey --scenarios g --repeat 3
    python -m loadtest.bench --targets floor-trio,floor-hypercorn,gateway,portkey --scenarios h
    python -m loadtest.bench --render             # redraw tables and chart from bench/results.json
    python -m loadtest.bench --targets floor-hypercorn,gateway --scenarios b --held 2000 --held-http2 2000,10000
    python -m loadtest.bench --targets gateway-w2 --scenarios b --held 2000,10000

Targets: fake (the provider direct: the TTFT floor), floor-trio and floor-hypercorn (bare relays:
the CPU and memory floors, see floor_trio.py / floor_hypercorn.py), gateway, litellm, portkey;
also gateway-wN, the gateway with `--workers N` (e.g. b at 10,000 HTTP/1.1 streams, which one
process cannot hold here: two descriptors per stream against a hard limit of 20,000).
Scenarios a-h as in bench.md (g: target CPU µs per relayed token; h: overload fairness, new
streams' TTFT while old streams overload the target). One fake provider process
serves all targets; each target is started, measured and stopped in turn, the load generator runs
in this process. Results go to `--out` (JSON), the markdown to stdout, charts to `--charts`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import traceback
from pathlib import Path

import trio

from ..runner import raise_fd_limit
from . import peers, scenarios
from .markdown import environment, render, write_charts
from .targets import (FLOORS, Running, child_fd_limit, scratch_dir, start_floor, start_gateway, start_litellm, start_portkey,
                      start_provider, wait_ready)

ALL_TARGETS = ("fake", "floor-trio", "floor-hypercorn", "gateway", "litellm", "portkey")
ALL_SCENARIOS = ("a", "b", "c", "d", "e", "f", "g", "h")
# e measures when a stalled client's upstream is released: a policy the floors leave out on purpose
# (they would hold every upstream stream for the whole hold time, 45 s of nothing to learn).
FLOOR_SKIPS = frozenset({"e"})
# b over HTTP/2 (h2c with prior knowledge): the targets served by hypercorn; the others (the fake
# provider, the raw trio floor, LiteLLM's uvicorn, Portkey's node) speak HTTP/1.1 only.
H2C_TARGETS = frozenset({"floor-hypercorn", "gateway"})


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(ALL_TARGETS))
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None, help="runs of the cheap scenarios (a, c, f, g); h runs once")
    p.add_argument("--held", default=None, help="held-stream counts for b, e.g. 1000,5000,10000")
    p.add_argument("--held-http2", default=None,
                   help="also b over HTTP/2 (h2c, several streams per connection) at these counts, e.g. 2000,10000")
    p.add_argument("--h2-streams-per-connection", type=int, default=None,
                   help="b over HTTP/2: streams per connection (default 100: hypercorn's h2_max_concurrent_streams)")
    p.add_argument("--ttft-streams", default=None, help="stream counts for a, e.g. 100,1000")
    p.add_argument("--overload-streams", default=None,
                   help="old-stream counts (50 tokens/s each) for h, e.g. 200,300; default 300")
    p.add_argument("--cache", default=".cache/peers", help="where peers are installed")
    p.add_argument("--install-peers", action="store_true",
                   help="install the peers among --targets that are missing, before measuring")
    p.add_argument("--install-only", action="store_true", help="--install-peers, then run nothing")
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--charts", default="bench")
    p.add_argument("--render", action="store_true",
                   help="run nothing: print the markdown (and redraw the charts) from --out")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of --out for the scenarios not run this time")
    return p.parse_args(argv)


async def bench(args: argparse.Namespace, results: dict) -> None:
    sizes = scenarios.QUICK if args.quick else scenarios.Sizes()
    if args.repeat:
        sizes = dataclasses.replace(sizes, repeat=args.repeat)
    if args.held:
        sizes = dataclasses.replace(sizes, held_streams=tuple(int(x) for x in args.held.split(",")))
    if args.held_http2:
        sizes = dataclasses.replace(sizes, held_h2_streams=tuple(int(x) for x in args.held_http2.split(",")))
    if args.h2_streams_per_connection:
        sizes = dataclasses.replace(sizes, h2_streams_per_connection=args.h2_streams_per_connection)
    if args.ttft_streams:
        sizes = dataclasses.replace(sizes, ttft_streams=tuple(int(x) for x in args.ttft_streams.split(",")))
    if args.overload_streams:
        sizes = dataclasses.replace(sizes, overload_streams=tuple(int(x) for x in args.overload_streams.split(",")))
    chosen = args.scenarios.split(",")
    cache = Path(args.cache).resolve()
    work = scratch_dir()
    notes, commands = results["notes"], results["commands"]
    fds = child_fd_limit()
    single = [x for x in args.targets.split(",") if not x.startswith("gateway-w")]
    if "b" in chosen and single and 2 * max(sizes.held_streams) + 200 > fds:
        notes.append(f"targets may open {fds:,} files (a hard limit this machine does not let us raise): "
                     f"a relay holding {max(sizes.held_streams):,} streams needs two sockets per stream, "
                     f"so its last few connections fail with EMFILE (counted as errors in b)")
    if "b" in chosen and sizes.held_h2_streams:
        skipped = [x for x in args.targets.split(",") if x not in H2C_TARGETS]
        if skipped:
            notes.append(f"b over HTTP/2 skipped for {', '.join(skipped)}: HTTP/1.1 only")
    provider = start_provider(work)
    commands["fake provider"] = provider.command
    try:
        await wait_ready(provider)
        upstream = provider.urls[0]
        control = scenarios.Provider(upstream)
        for name in args.targets.split(","):
            async def fresh(name: str = name, own_provider: bool = False) -> Running | None:
                # Every measurement gets a freshly started target: a process that already held
                # streams keeps its freed memory (no true idle RSS), and an overloaded one may
                # still be working off the previous scenario's backlog (LiteLLM was, for minutes).
                if name == "fake" and own_provider:
                    new = start_provider(work)
                    await wait_ready(new)
                    return new
                new = await _start(name, provider, work, cache, notes)
                if new is not None:
                    commands[new.name] = new.command
                return new

            print(f"== {name}", file=sys.stderr, flush=True)
            mine = [x for x in chosen if not (name in FLOORS and x in FLOOR_SKIPS)]
            await _scenarios(name, provider, mine, sizes, control, results["rows"], fresh)
        if "f" in chosen and "gateway" in args.targets.split(","):
            for workers in (1, 2):
                target = start_gateway(work, upstream, workers)
                commands[target.name] = target.command
                try:
                    await wait_ready(target)
                    print(f"== f: {target.name}", file=sys.stderr, flush=True)
                    row = await scenarios.throughput(target, sizes)
                    results["rows"].setdefault("f", []).append({"target": target.name, "processes": workers, **row})
                finally:
                    target.stop()
    finally:
        provider.stop()
    results["workdir"] = str(work)


def install(cache: Path, targets: list[str], notes: list[str]) -> None:
    """Install the missing peers among `targets` now, so a failure shows before any measuring."""
    for name, installed, do in (("litellm", peers.litellm_installed, peers.install_litellm),
                                ("portkey", peers.portkey_installed, peers.install_portkey)):
        if name in targets and not installed(cache):
            print(f"== installing {name} into {cache}", file=sys.stderr, flush=True)
            why = do(cache)
            if why:
                notes.append(why)
                print(f"   {why}", file=sys.stderr, flush=True)
        if name in targets:
            print(f"   {name}: {'installed' if installed(cache) else 'NOT installed'}", file=sys.stderr, flush=True)


async def _start(name: str, provider: Running, work: Path, cache: Path, notes: list[str]) -> Running | None:
    if name == "fake":
        return provider  # the floor: the same provider process, addressed directly
    upstream = provider.urls[0]
    target = None
    try:
        if name in FLOORS:
            target = start_floor(work, upstream, name)
        elif name == "gateway":
            target = start_gateway(work, upstream)
        elif name.startswith("gateway-w") and name.removeprefix("gateway-w").isdigit():
            target = start_gateway(work, upstream, int(name.removeprefix("gateway-w")))
        elif name == "litellm":
            if not peers.litellm_installed(cache):
                notes.append("LiteLLM skipped: not installed (run with --install-peers)")
                return None
            target = start_litellm(work, upstream, peers.litellm_venv(cache))
        elif name == "portkey":
            if not peers.portkey_installed(cache):
                notes.append("Portkey skipped: not installed (run with --install-peers)")
                return None
            target = start_portkey(work, upstream, peers.portkey_root(cache))
        else:
            notes.append(f"unknown target {name!r} skipped")
            return None
        await wait_ready(target)
        return target
    except Exception as exc:  # a peer that cannot start is a note in bench.md, not a crash
        notes.append(f"{name} skipped: {exc}")
        if target is not None:
            target.stop()
        return None


async def _scenarios(key: str, provider: Running, chosen: list[str], sizes: scenarios.Sizes,
                     control: scenarios.Provider, rows: dict, fresh) -> None:
    async def one(scenario: str, measure, *, own_provider: bool = False) -> None:
        target = await fresh(own_provider=own_provider)
        if target is None:
            return
        print(f"   {scenario} ...", file=sys.stderr, flush=True)
        try:
            row = await measure(target)
        except Exception as exc:
            traceback.print_exc()
            row = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            if target is not provider:
                target.stop()
        rows.setdefault(scenario, []).append({"target": target.name, "key": key, **row})
        print(f"   {scenario}: {json.dumps({k: v for k, v in row.items() if not k.endswith('ttft_cdf')})}",
              file=sys.stderr, flush=True)
        await trio.sleep(1.0)  # let sockets close and the provider settle

    if "a" in chosen:
        for n in sizes.ttft_streams:
            await one("a", lambda t, n=n: scenarios.ttft(t, sizes, n))
    if "b" in chosen:
        for n in sizes.held_streams:
            await one("b", lambda t, n=n: scenarios.held(t, sizes, n), own_provider=True)
        if key in H2C_TARGETS:
            for n in sizes.held_h2_streams:
                await one("b2", lambda t, n=n: scenarios.held_http2(t, sizes, n, healthz=key == "gateway"))
    if "c" in chosen:
        await one("c", lambda t: scenarios.throughput(t, sizes))
    if "d" in chosen:
        await one("d", lambda t: scenarios.slow_clients(t, sizes, control))
    if "e" in chosen:
        await one("e", lambda t: scenarios.stalled(t, sizes, control))
    if "g" in chosen:
        await one("g", lambda t: scenarios.cpu_per_token(t, sizes))
    if "h" in chosen:
        for n in sizes.overload_streams:
            await one("h", lambda t, n=n: scenarios.overload_fairness(t, sizes, n, provider))


def _row_id(row: dict) -> tuple:
    return row.get("key", row["target"]), row.get("streams"), row.get("processes")


def _row_order(row: dict) -> tuple:
    key = row.get("key", "gateway")
    rank = ALL_TARGETS.index(key) if key in ALL_TARGETS else len(ALL_TARGETS)
    return rank, row.get("streams") or 0, row.get("processes") or 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    notes: list[str] = []
    if args.install_peers or args.install_only:  # before `environment()`, which reads the versions
        install(Path(args.cache).resolve(), args.targets.split(","), notes)
        if args.install_only:
            return 1 if notes else 0
    if args.render:
        results = json.loads(Path(args.out).read_text())
        print(render(results, write_charts(results, Path(args.charts))))
        return 0
    raise_fd_limit()
    results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "command": "python -m loadtest.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                     "environment": environment(Path(args.cache)), "commands": {}, "notes": notes, "rows": {}}

    trio.run(bench, args, results)
    out = Path(args.out)
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        rows = old["rows"]
        for scenario, new in results["rows"].items():  # replace the (scenario, target, size) rows re-run
            redone = {_row_id(r) for r in new}
            kept = [r for r in rows.get(scenario, []) if _row_id(r) not in redone]
            rows[scenario] = sorted(kept + new, key=_row_order)
        results["rows"] = dict(sorted(rows.items()))
        results["commands"] = {**old["commands"], **results["commands"]}
        results["notes"] = old["notes"] + [n for n in results["notes"] if n not in old["notes"]]
        results["command"] = old["command"] + "  +  " + results["command"]
        results["date"] = old["date"] + " / " + results["date"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    charts = write_charts(results, Path(args.charts))
    print(render(results, charts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
