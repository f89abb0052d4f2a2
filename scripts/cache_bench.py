"""The response cache's two figures for bench.md.

`cost`: CPU the cache adds to one miss on the serving path, without sockets: `admit` (key, lookup
in the memory store, the recording tap installed), the tap called once per upstream read, and
`settle` (the entry handed to the writer). The writer's own work (sizing and storing the entry)
runs beside the relay and is reported apart. Best of --repeat runs, microseconds per request.

`ttft`: a gateway process (memory cache) in front of a fake provider process; one 1,000-token
answer is cached, then C concurrent clients (raw keep-alive HTTP/1.1 sockets, one process) ask
for it in a closed loop for --seconds: time from the request's first byte sent to the first
content byte received, p50/p99, and hits/s. Loopback only.

    python scripts/cache_bench.py cost [--reads 200] [--repeat 7] [--backend memory|sqlite] [--replay fast|original]
    python scripts/cache_bench.py ttft [--concurrency 100] [--seconds 10] [--tokens 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import orjson
import trio

from proxy.cache.policy import ResponseCache
from proxy.config import CacheConfig
from proxy.core.events import Chunk
from proxy.core.request import parse_chat_request
from proxy.server.exchange import OPEN, Exchange

BODY = orjson.dumps({"model": "gpt-4o-mini", "stream": True, "temperature": 0, "messages": [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France, and what is it known for?"}]})


async def cost(reads: int, n: int, backend: str = "memory", replay: str = "fast") -> tuple[float, float, float]:
    path = os.path.join(tempfile.mkdtemp(), "cache.db")
    cache = ResponseCache(CacheConfig(enabled=True, backend=backend, path=path, write_queue=8192, max_entries=1000,
                                      replay=replay))
    if backend == "sqlite":  # start the store's key set (the first request does), wait for it
        warm = parse_chat_request(BODY)
        await cache.admit(Exchange("r", "/", OPEN, 0.0, endpoint="chat", model=warm.model), warm)
        while cache.store._keys is None:
            await trio.sleep(0.01)
    chunk = Chunk(b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
                  b'[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}')
    batch = [chunk]
    hot = 0.0
    empty: list = []
    t = time.perf_counter()
    for _ in range(n):  # the endpoint's own loop over taps, there with or without a cache
        for _ in range(reads):
            for tap in empty:
                tap(batch)
    loop = (time.perf_counter() - t) / n
    cpu0 = time.process_time()
    for i in range(n):
        body = BODY.replace(b"France", str(i).encode())  # every request a miss
        request = parse_chat_request(body)
        x = Exchange("r", "/v1/chat/completions", OPEN, 0.0, endpoint="chat", model=request.model, stream=True)
        t = time.perf_counter()
        await cache.admit(x, request)
        for _ in range(reads):
            for tap in x.taps:
                tap(batch)
        x.outcome = "ok"
        cache.settle(x)
        hot += time.perf_counter() - t
        if i % 64 == 63:
            await trio.sleep(0)  # the writer stores what settle queued
    while cache.statistics().queued:
        await trio.sleep(0.001)
    total = time.process_time() - cpu0
    stats = cache.statistics()
    assert stats.writes >= n - 64 and stats.misses >= n, stats
    return (hot / n - loop) * 1e6, total / n * 1e6 - loop * 1e6, reads


async def baseline(n: int) -> float:
    cpu0 = time.process_time()
    for i in range(n):
        body = BODY.replace(b"France", str(i).encode())
        request = parse_chat_request(body)
        Exchange("r", "/v1/chat/completions", OPEN, 0.0, endpoint="chat", model=request.model, stream=True)
    return (time.process_time() - cpu0) / n * 1e6


def main_cost(args) -> None:
    runs = [trio.run(cost, args.reads, 5000, args.backend, args.replay) for _ in range(args.repeat)]
    base = min(trio.run(baseline, 5000) for _ in range(args.repeat))
    hot = min(r[0] for r in runs)
    whole = min(r[1] for r in runs) - base
    print(f"cache cost per miss ({args.reads} upstream reads, {args.backend} store, replay {args.replay}), "
          f"best of {args.repeat}:")
    print(f"  serving path (admit + {args.reads} tap calls + settle): {hot:.1f} us")
    print(f"  with the writer's work (sizing, storing, evicting):     {whole:.1f} us")
    print(f"  python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores (shared machine)")


# -- ttft --

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


async def client(port: int, request: bytes, until: float, ttfts: list[float]) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        while trio.current_time() < until:
            start = time.perf_counter()
            await stream.send_all(request)
            tail, got_first = b"", False
            while True:
                data = await stream.receive_some(262144)
                if not data:
                    return
                if not got_first and first_content(tail + data):
                    ttfts.append(time.perf_counter() - start)
                    got_first = True
                tail = data[-32:] if len(data) >= 32 else (tail + data)[-32:]  # no copy of the whole read
                if tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
                    break


def first_content(data: bytes) -> bool:
    """A non-empty "content" string (the role chunk's is empty)."""
    at = data.find(b'"content":"')
    while at >= 0:
        if data[at + 11:at + 12] not in (b'"', b""):
            return True
        at = data.find(b'"content":"', at + 11)
    return False


async def ttft_run(port: int, concurrency: int, seconds: float, request: bytes) -> tuple[list[float], float]:
    ttfts: list[float] = []
    begin = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client, port, request, begin + seconds, ttfts)
    return ttfts, trio.current_time() - begin


def start_cached_gateway(folder: str, tokens: int) -> tuple[list[subprocess.Popen], int, bytes]:
    """A fake provider and a gateway with a memory cache, each a child process; the request of a
    `tokens`-token streamed answer (its first ask fills the cache)."""
    fake_port, gw_port = free_port(), free_port()
    config = os.path.join(folder, "gateway.toml")
    with open(config, "w") as f:
        f.write(f"""[server]\nhost = "127.0.0.1"\nport = {gw_port}\n[auth]\nmaster_key_env = "NO_SUCH_VAR_SET"
[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:{fake_port}/v1"
[models."m"]\ndeployments = [{{provider = "fake"}}]
[cache]\nenabled = true\nbackend = "memory"\n""")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-m", "proxy", "fake-provider", "--port", str(fake_port)], env=env,
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--config", config],
                              env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    wait_port(fake_port), wait_port(gw_port)
    body = orjson.dumps({"model": "m", "stream": True, "temperature": 0, "stream_options": {"include_usage": True},
                         "messages": [{"role": "user", "content": f'fake: {{"tokens": {tokens}}}\nhello'}]})
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return procs, gw_port, request


def main_ttft(args) -> None:
    procs, gw_port, request = start_cached_gateway(tempfile.mkdtemp(), args.tokens)
    try:
        if os.environ.get("CACHE_BENCH_PAUSE"):
            print("gateway on", gw_port, "request:", request)
            time.sleep(float(os.environ["CACHE_BENCH_PAUSE"]))
        warm, _ = trio.run(ttft_run, gw_port, 1, 0.5, request)  # the miss, then hits
        single, _ = trio.run(ttft_run, gw_port, 1, 2.0, request)
        cpu = cpu_seconds(procs[1].pid)
        ttfts, took = trio.run(ttft_run, gw_port, args.concurrency, args.seconds, request)
        cpu = cpu_seconds(procs[1].pid) - cpu
        def ms(values, q):
            return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else values[0] * 1000
        print(f"cache hit TTFT, {args.tokens}-token streamed answer, loopback, gateway 1 process:")
        print(f"  1 client:   p50 {statistics.median(single) * 1000:.2f} ms  p99 {ms(single, 99):.2f} ms "
              f"({len(single)} hits)")
        print(f"  {args.concurrency} clients: p50 {statistics.median(ttfts) * 1000:.2f} ms  p99 {ms(ttfts, 99):.2f} ms "
              f"({len(ttfts)} hits, {len(ttfts) / took:.0f} hits/s, gateway CPU "
              f"{cpu / len(ttfts) * 1000:.2f} ms per hit, {cpu / took:.2f} cores)")
        print(f"  python {platform.python_version()}, {os.cpu_count()} cores (shared machine)")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--reads", type=int, default=200)
    c.add_argument("--repeat", type=int, default=7)
    c.add_argument("--backend", choices=("memory", "sqlite"), default="memory")
    c.add_argument("--replay", choices=("fast", "original"), default="fast")
    t = sub.add_parser("ttft")
    t.add_argument("--concurrency", type=int, default=100)
    t.add_argument("--seconds", type=float, default=10)
    t.add_argument("--tokens", type=int, default=1000)
    args = parser.parse_args()
    main_cost(args) if args.what == "cost" else main_ttft(args)


if __name__ == "__main__":
    main()
