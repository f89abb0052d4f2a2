"""Quick numbers for the streaming core (the full benchmarks live in `loadtest`).

1. TTFT added by the gateway: a closed loop of N concurrent clients (each running streams back
   to back on a keep-alive connection, with a random 0-500 ms pause before each), direct to the
   fake provider vs through the gateway, in alternating rounds; prints medians of per-round
   p50/p99 and their difference.
2. RSS per open idle stream: the gateway's RSS with M streams held open (waiting for a first
   token that takes minutes) minus its RSS after a warm-up, divided by M.
3. Disconnect: from a client closing a stream to the provider seeing the gateway close the
   upstream socket.

Both servers run as separate processes on loopback; the client is one trio process on raw
sockets (h11 framing is not needed: we only look for the first content token in the bytes).

    python scripts/core_numbers.py [--streams 100] [--rounds 5] [--idle 1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import orjson
import trio

FIRST_CONTENT = b'"content":"'  # the fake's role chunk carries "content":"" and does not count


def request_bytes(port: int, content: str) -> bytes:
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": content}]})
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def worker(port: int, payload: bytes, count: int, results: list[float]) -> None:
    """One client connection running `count` streams back to back (HTTP/1.1 keep-alive),
    reading each to its end and recording the time from sending the request to the first
    content token."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for _ in range(count):
            # Desynchronise the clients: with a deterministic provider a closed loop would
            # otherwise send all N requests in the same millisecond, every round, and measure
            # the queueing of that burst rather than the steady state of N open streams.
            await trio.sleep(random.uniform(0, 0.5))
            start = time.perf_counter()
            await stream.send_all(payload)
            seen = b""
            first = None
            while not seen.endswith(b"0\r\n\r\n"):  # the chunked terminator after [DONE]
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError("connection closed mid-stream")
                seen += data
                if first is None and FIRST_CONTENT in seen.replace(b'"content":""', b""):
                    first = time.perf_counter()
            results.append((first - start) * 1000)


async def ttft_round(port: int, n: int, content: str, per_worker: int = 3) -> list[float]:
    """Closed loop: n concurrent clients, each running streams back to back. The first stream of
    each client is a warm-up (connection set-up, arrival burst) and is not counted."""
    results: list[float] = []
    payload = request_bytes(port, content)
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(worker, port, payload, per_worker + 1, results)
    return sorted(results[n:])


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def hold(port: int, payload: bytes, opened: list[int], release: trio.Event) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        data = b""
        while b"\r\n\r\n" not in data:  # response headers: the stream is open and idle
            data += await stream.receive_some(65536)
        opened.append(1)
        await release.wait()


async def idle_rss(port: int, pid: int, m: int) -> tuple[int, int]:
    payload = request_bytes(port, 'fake: {"ttft": 600}')
    warm: list[int] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:  # warm-up: allocators and caches reach steady state
        for _ in range(50):
            nursery.start_soon(hold, port, payload, warm, release)
        while len(warm) < 50:
            await trio.sleep(0.05)
        release.set()
    await trio.sleep(1)
    before = rss_kb(pid)
    opened: list[int] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(m):
            nursery.start_soon(hold, port, payload, opened, release)
        while len(opened) < m:
            await trio.sleep(0.05)
        await trio.sleep(1)
        during = rss_kb(pid)
        release.set()
    return before, during


async def disconnect_latency(trials: int) -> list[float]:
    """ms from the client closing a stream to the provider seeing its upstream socket close.

    The provider runs in this process so both ends read the same trio clock; the gateway is a
    separate process in between."""
    from proxy.testing.fake import FakeProvider, FakeSettings

    fake = FakeProvider(FakeSettings(itl=0.05, tokens=10_000))
    results = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fake.serve)
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(f'[server]\nport = 0\n[auth]\nmaster_key_env = "CORE_NUMBERS_UNSET_KEY"\n'
                    f'[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
                    f'[models."*"]\ndeployments = [{{ provider = "fake" }}]\n')
        gateway, line = start([sys.executable, "-m", "proxy", "serve", "--config", f.name])
        gw_port = int(line.split("http://127.0.0.1:", 1)[1].split()[0].strip(","))
        try:
            for _ in range(trials):
                stream = await trio.open_tcp_stream("127.0.0.1", gw_port)
                await stream.send_all(request_bytes(gw_port, "hi"))
                seen = b""
                while FIRST_CONTENT not in seen.replace(b'"content":""', b""):
                    seen += await stream.receive_some(65536)
                record = fake.records[-1]
                closed_at = trio.current_time()
                await stream.aclose()
                await record.closed.wait()
                results.append((record.ended_at - closed_at) * 1000)
        finally:
            gateway.terminate()
            gateway.wait(timeout=40)
            os.unlink(f.name)
            nursery.cancel_scope.cancel()
    return sorted(results)


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return p, p.stdout.readline()


async def main_async(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fake, line = start([sys.executable, "-m", "proxy", "fake-provider", "--port", "0",
                        "--ttft", "0.1", "--itl", str(args.itl), "--tokens", "50"])
    fake_port = int(line.rsplit(":", 1)[1].split("/")[0])
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f'[server]\nport = 0\n[auth]\nmaster_key_env = "CORE_NUMBERS_UNSET_KEY"\n'
                f'[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:{fake_port}/v1"\n'
                f'[models."*"]\ndeployments = [{{ provider = "fake" }}]\n')
    gateway, line = start([sys.executable, "-m", "proxy", "serve", "--config", f.name,
                           "--workers", str(args.workers)])
    gw_port = int(line.split("http://127.0.0.1:", 1)[1].split()[0].strip(","))
    try:
        direct, through = [], []
        for _ in range(args.rounds):
            direct.append(await ttft_round(fake_port, args.streams, "hi"))
            through.append(await ttft_round(gw_port, args.streams, "hi"))
        d50 = statistics.median(pct(r, 0.5) for r in direct)
        g50 = statistics.median(pct(r, 0.5) for r in through)
        d99 = statistics.median(pct(r, 0.99) for r in direct)
        g99 = statistics.median(pct(r, 0.99) for r in through)
        before, during = await idle_rss(gw_port, gateway.pid, args.idle) if args.workers == 1 else (0, 0)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"trio {version('trio')}, hypercorn {version('hypercorn')}, httpx {version('httpx')}")
        print(f"command: python scripts/core_numbers.py --streams {args.streams} --rounds {args.rounds} "
              f"--idle {args.idle} --workers {args.workers} --itl {args.itl}")
        print(f"TTFT at {args.streams} concurrent streams (provider TTFT 100 ms, 50 tokens "
              f"{args.itl * 1000:.0f} ms apart), median of {args.rounds} rounds:")
        print(f"  direct  p50 {d50:.2f} ms  p99 {d99:.2f} ms")
        print(f"  gateway p50 {g50:.2f} ms  p99 {g99:.2f} ms")
        print(f"  added   p50 {g50 - d50:.2f} ms  p99 {g99 - d99:.2f} ms")
        closes = await disconnect_latency(20)
        print(f"client disconnect -> provider sees its socket close: median {statistics.median(closes):.2f} ms, "
              f"max {closes[-1]:.2f} ms over {len(closes)} streams")
        if args.workers == 1:
            print(f"RSS: gateway {before / 1024:.1f} MB warm, {during / 1024:.1f} MB with {args.idle} open idle "
                  f"streams -> {(during - before) / args.idle:.1f} KB per stream")
    finally:
        for p in (gateway, fake):
            p.terminate()
            p.wait(timeout=40)
        os.unlink(f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--itl", type=float, default=0.02, help="provider seconds between tokens")
    parser.add_argument("--workers", type=int, default=1, help="gateway workers (RSS is measured with 1 only)")
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
