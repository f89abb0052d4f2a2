"""What metrics and logging cost: settle CPU per request, scrape time at 100 models x 10 deployments,
gateway CPU per request and per token with [metrics] on and off, ITL of open streams during scrapes.

    .venv/bin/python scripts/metrics_bench.py [--streams 200] [--requests 300]

Prints the tables that go into bench.md (medians; the machine is shared: read the ratios).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

MODELS, DEPLOYMENTS = 100, 10


def big_config(provider_port: int, **sections) -> dict:
    models = {f"model-{m}": {"deployments": [{"provider": "fake", "name": f"d{m}-{d}", "model": f"m{m}-{d}"}
                                            for d in range(DEPLOYMENTS)], "allow_deployment_header": True}
              for m in range(MODELS)}
    return {"server": {"port": 0}, "auth": {"master_key_env": "UNSET_FOR_BENCH"},
            "providers": {"fake": {"kind": "openai", "base_url": f"http://127.0.0.1:{provider_port}/v1"}},
            "models": models, **sections}


def populate(metrics) -> None:
    """Every series a busy day would make: each model streamed and plain, each deployment ok and failed."""
    from proxy.core.usage import Usage
    from proxy.routing.failover import Served
    from proxy.server.exchange import OPEN, Exchange

    now = time.perf_counter()
    for m in range(MODELS):
        for d in range(DEPLOYMENTS):
            for stream, tried, status in ((True, [(f"d{m}-{d}", "ok", 0.0, 0.0)], 200),
                                          (False, [(f"d{m}-{d}", "upstream_error", 0.0, 0.0), (f"d{m}-{(d + 1) % 10}", "ok", 0.0, 0.0)], 200),
                                          (False, [(f"d{m}-{d}", "upstream_timeout", 0.0, 0.0)], 504)):
                x = Exchange("r", "/v1/chat/completions", OPEN, now - 1.0, endpoint="chat", model=f"model-{m}",
                             stream=stream, status=status, outcome="ok" if status == 200 else "error",
                             usage=Usage(prompt_tokens=100, completion_tokens=50, cached_tokens=10),
                             served=Served(deployment=tried[-1][0], tried=tried), cost_usd=0.001)
                x.first_token_at = now - 0.5 if stream else None
                x.notes["metrics"] = now - 0.999
                metrics.settle(x)


def settle_and_scrape(multiprocess: bool) -> dict:
    """In a fresh process (the value store is chosen per process): settle CPU per request, scrape time."""
    from proxy.observability.exposition import render, run

    from proxy.config import parse_config
    from proxy.observability.metrics import Metrics, share_across_workers
    from proxy.routing.router import Router
    from proxy.server.streams import Streams

    if multiprocess:
        share_across_workers()
    config = parse_config(big_config(9))
    metrics = Metrics(config, Router(config, environ={}), Streams(config.server))
    populate(metrics)
    if multiprocess:  # a second worker's files: the scrape merges both
        pid = os.fork()
        if pid == 0:
            metrics._families = None
            populate(metrics)
            os._exit(0)
        os.waitpid(pid, 0)
    x_cost = []
    for _ in range(5):
        started = time.process_time()
        populate(metrics)
        x_cost.append((time.process_time() - started) / (MODELS * DEPLOYMENTS * 3) * 1e6)
    from proxy.observability.slo import SLOs
    from proxy.server.exchange import OPEN, Exchange

    slos, exchanges = SLOs(config), []
    for _ in range(20000):
        x = Exchange("r", "/v1/chat/completions", OPEN, time.perf_counter() - 1, endpoint="chat", model="model-1",
                     stream=True, outcome="ok", cost_usd=0.001)
        x.first_token_at = x.started + 0.3
        exchanges.append(x)
    started = time.process_time()
    for x in exchanges:
        slos.settle(x)
    slo_us = (time.process_time() - started) / len(exchanges) * 1e6
    families = metrics.families()
    render(run(families.collect()))  # the first scrape of a process parses every key once (cached after)
    scrapes, cpu, size = [], [], 0
    for _ in range(7):
        started, started_cpu = time.perf_counter(), time.process_time()
        size = len(render(run(families.collect())))
        scrapes.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    lines = render(run(families.collect())).count(b"\n")
    return {"settle_us": statistics.median(x_cost), "slo_us": slo_us, "scrape_ms": statistics.median(scrapes),
            "scrape_cpu_ms": statistics.median(cpu), "bytes": size,
            "lines": lines}


def log_cost() -> dict:
    """CPU per log line: the old basicConfig format vs ours (request id, bounded), text and JSON."""
    from proxy.observability.logs import BoundedFormatter, JSONFormatter, TEXT_FORMAT, install_request_ids

    out = {}
    devnull = open(os.devnull, "w")
    logger = logging.getLogger("bench")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for name, formatter in (("before (plain basicConfig format)",
                             logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")),
                            ("text + request id, bounded", BoundedFormatter(TEXT_FORMAT)),
                            ("json + request id, bounded", JSONFormatter())):
        if name.startswith("text"):
            install_request_ids()
        handler = logging.StreamHandler(devnull)
        handler.setFormatter(formatter)
        logger.handlers = [handler]
        n = 20000
        started = time.process_time()
        for i in range(n):
            logger.info("%s model=%s deployment=%s/%s attempts=%d stream=%s outcome=%s bytes_out=%s ms=%.1f",
                        "chat", "gpt-4o", "openai", "gpt-4o", 1, True, "ok", 1234, 12.5)
        out[name] = (time.process_time() - started) / n * 1e6
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    return process, line


async def cpu_per_request(provider_port: int, requests: int) -> list[tuple]:
    import httpx
    import trio

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for metrics_on in (False, True, False, True):
            path = os.path.join(tmp, f"g{metrics_on}.toml")
            with open(path, "w") as f:
                f.write(f'[server]\nport = 0\n[auth]\nmaster_key_env = "UNSET_FOR_BENCH"\n'
                        f'[metrics]\nenabled = {"true" if metrics_on else "false"}\n'
                        f'[slo]\nenabled = {"true" if metrics_on else "false"}\n'
                        f'[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:{provider_port}/v1"\n'
                        '[models."m"]\ndeployments = [{ provider = "fake" }]\n')
            gateway, line = start([sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--config", path])
            url = line.split(" on ", 1)[1].split(" ", 1)[0]
            try:
                async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
                    for tokens, stream in ((1, False), (200, True)):
                        body = {"model": "m", "stream": stream, "messages": [
                            {"role": "user", "content": f'fake: {{"tokens": {tokens}}}'}]}
                        await client.post(url + "/v1/chat/completions", json=body)  # warm
                        before = cpu_seconds(gateway.pid)

                        async def one() -> None:
                            response = await client.post(url + "/v1/chat/completions", json=body)
                            assert response.status_code == 200

                        async with trio.open_nursery() as nursery:
                            limiter = trio.CapacityLimiter(16)

                            async def limited() -> None:
                                async with limiter:
                                    await one()

                            for _ in range(requests):
                                nursery.start_soon(limited)
                        rows.append((metrics_on, stream, tokens, (cpu_seconds(gateway.pid) - before) / requests))
            finally:
                gateway.terminate()
                gateway.wait()
    return rows


async def itl_during_scrapes(provider_port: int, streams: int) -> list[tuple]:
    """`streams` open streams (10 tokens/s each) through a gateway with 1,000 deployments; inter-token
    gaps seen by the clients without scrapes, then with a scrape every 250 ms."""
    import httpx
    import trio

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.toml")
        config = big_config(provider_port)
        with open(path, "w") as f:
            f.write('[server]\nport = 0\n[auth]\nmaster_key_env = "UNSET_FOR_BENCH"\n'
                    f'[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:{provider_port}/v1"\n')
            for name, model in config["models"].items():
                deployments = ", ".join(f'{{ provider = "fake", name = "{d["name"]}", model = "{d["model"]}" }}'
                                        for d in model["deployments"])
                f.write(f'[models."{name}"]\nallow_deployment_header = true\ndeployments = [{deployments}]\n')
        gateway, line = start([sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--config", path])
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        try:
            limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                # every deployment once: the series of a busy server
                async with trio.open_nursery() as nursery:
                    limiter = trio.CapacityLimiter(32)

                    async def fill(m: int, d: int) -> None:
                        async with limiter:
                            await client.post(url + "/v1/chat/completions", headers={"x-gateway-deployment": f"d{m}-{d}"},
                                              json={"model": f"model-{m}", "stream": d % 2 == 0,
                                                    "messages": [{"role": "user", "content": "hi"}]})

                    for m in range(MODELS):
                        for d in range(DEPLOYMENTS):
                            nursery.start_soon(fill, m, d)
                scrape_ms = []
                for _ in range(7):
                    started = time.perf_counter()
                    response = await client.get(url + "/metrics")
                    scrape_ms.append((time.perf_counter() - started) * 1000)
                rows.append(("scrape over HTTP, idle gateway (ms)", statistics.median(scrape_ms), len(response.content)))
                for scraping in (False, True):
                    gaps: list[float] = []
                    during: list[float] = []

                    async def stream(i: int) -> None:
                        body = {"model": f"model-{i % MODELS}", "stream": True, "messages": [
                            {"role": "user", "content": 'fake: {"tokens": 40, "itl": 0.1}'}]}
                        last = None
                        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                            async for _ in r.aiter_raw():  # one read per relayed event (10 a second)
                                now = time.perf_counter()
                                if last is not None:
                                    gaps.append(now - last)
                                last = now

                    async with trio.open_nursery() as nursery:
                        for i in range(streams):
                            nursery.start_soon(stream, i)
                        if scraping:
                            await trio.sleep(0.5)
                            for _ in range(12):
                                started = time.perf_counter()
                                await client.get(url + "/metrics")
                                during.append((time.perf_counter() - started) * 1000)
                                await trio.sleep(0.25)
                    gaps.sort()
                    rows.append((f"{streams} streams, {'scrape every 250 ms' if scraping else 'no scrape'}: ITL p50/p99/max (ms)",
                                 f"{gaps[len(gaps) // 2] * 1000:.0f} / {gaps[int(len(gaps) * 0.99)] * 1000:.0f} / "
                                 f"{gaps[-1] * 1000:.0f}", f"scrape {statistics.median(during):.0f} ms" if during else ""))
        finally:
            gateway.terminate()
            gateway.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--child", choices=("single", "multi"))
    args = parser.parse_args()
    if args.child:
        print(settle_and_scrape(args.child == "multi"))
        return
    import ast

    import trio

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print("\n| store (100 models x 10 deployments, every series populated) | metrics settle CPU per request | "
          "SLO settle | scrape: CPU / wall | exposition |\n|---|---|---|---|---|")
    for mode in ("single", "multi"):
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
        r = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        label = "one process" if mode == "single" else "multiprocess (2 workers' files)"
        print(f"| {label} | {r['settle_us']:.1f} µs | {r['slo_us']:.1f} µs | "
              f"{r['scrape_cpu_ms']:.0f} ms / {r['scrape_ms']:.0f} ms | "
              f"{r['lines']:,} lines, "
              f"{r['bytes'] / 1024:.0f} KiB |")
    print("\n| log line (the per-request line of the chat endpoint) | CPU |\n|---|---|")
    for name, us in log_cost().items():
        print(f"| {name} | {us:.1f} µs |")

    fake, line = start([sys.executable, "-m", "proxy", "fake-provider", "--port", "0"])
    port = int(line.rsplit(":", 1)[1].split()[0].split("/")[0])
    try:
        rows = trio.run(cpu_per_request, port, args.requests)
        print("\n| gateway process CPU per request | metrics+SLO off | on | difference |\n|---|---|---|---|")
        for stream, tokens in ((False, 1), (True, 200)):
            off = statistics.median(r[3] for r in rows if not r[0] and r[1] == stream)
            on = statistics.median(r[3] for r in rows if r[0] and r[1] == stream)
            what = f"stream, {tokens} tokens" if stream else "plain answer"
            extra = f" ({(on - off) / tokens * 1e6:.2f} µs per token)" if stream else ""
            print(f"| {what} | {off * 1e6:.0f} µs | {on * 1e6:.0f} µs | {(on - off) * 1e6:+.0f} µs{extra} |")
        print("\n| 1,000 deployments, series populated | value | |\n|---|---|---|")
        for row in trio.run(itl_during_scrapes, port, args.streams):
            print(f"| {row[0]} | {row[1] if isinstance(row[1], str) else f'{row[1]:.1f}'} | {row[2]} |")
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
