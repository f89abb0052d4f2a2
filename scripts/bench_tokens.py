"""Token counting costs, and whether counting a huge prompt stalls other streams.

1. CPU per request of counting a typical prompt (system + 9 turns of ~40 words), and of the whole
   accounting admit (route, count, window check, notes, tap); the tap's cost per relayed read; the
   settle of a cut stream (counting the kept text).
2. Encode time vs prompt size: inline; in slices with a checkpoint between (as shipped); in a
   worker thread — wall time and the longest stall of the event loop meanwhile; the thread
   hand-off's cost. Where leaving the inline path pays (tokens.LARGE_PROMPT_CHARS).
3. Inter-token gaps of N streams through the gateway (fake provider, 20 ms apart) while 5 requests
   with ~100k-token prompts arrive: counted in slices (shipped), in a thread, inline, or not at
   all (the floor: what carrying 0.6 MB prompts costs anyway); and without the big prompts. Gateway, fake provider and client are three
   processes on loopback.

    python scripts/bench_tokens.py [--streams 20] [--tokens 150] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import httpx
import orjson
import trio

from proxy.accounting import tokens
from proxy.accounting.policy import AccountingPolicy
from proxy.accounting.relayed import RelayedText
from proxy.config import parse_config
from proxy.core.events import Chunk
from proxy.core.request import parse_chat_request
from proxy.server.exchange import OPEN, Exchange

WORDS = ("the quick brown fox jumps over a lazy dog while the gateway counts every token of the "
         "prompt before any provider is paid and relays streams with backpressure").split()


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def typical_request():
    rng = random.Random(1)
    messages = [{"role": "system", "content": words(60, rng)}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": words(40, rng)} for i in range(9)]
    return parse_chat_request(orjson.dumps({"model": "gpt-4o", "messages": messages, "stream": True}))


def median_us(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def part1() -> None:
    request = typical_request()
    total = tokens.count_prompt(request, "o200k_base").total
    count_us = median_us(lambda: tokens.count_prompt(request, "o200k_base"), 3000)
    config = parse_config({"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                           "models": {"gpt-4o": {"deployments": [{"provider": "p"}]}}})
    policy = AccountingPolicy(config)

    async def admits():
        samples = []
        for _ in range(3000):
            x = Exchange("r", "/v1/chat/completions", OPEN, 0.0, endpoint="chat", stream=True)
            t0 = time.perf_counter()
            await policy.admit(x, request)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6

    admit_us = trio.run(admits)
    chunk = [Chunk(b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" word"}}]}')]
    tap = RelayedText()
    tap_ns = median_us(lambda: tap(chunk), 20000) * 1000
    full = RelayedText()
    while full.size < 16 * 1024:
        full(chunk)
    count = tokens.counter("o200k_base")
    settle_us = median_us(lambda: full.tokens(count, 400), 200)
    print(f"## 1. Per request ({total}-token prompt: system + 9 turns)\n")
    print("| what | median |\n|---|---|")
    print(f"| count_prompt (10 messages, o200k_base) | {count_us:.1f} µs |")
    print(f"| accounting admit (route, count, window, notes, tap) | {admit_us:.1f} µs |")
    print(f"| tap per relayed read, while keeping | {tap_ns:.0f} ns |")
    print(f"| settle of a cut stream (count {len(full.kept)} kept chunks + extrapolate) | {settle_us:.0f} µs |\n")


async def loop_stall_during(fn) -> tuple[float, float]:
    """(wall time of `await fn()`, the longest the event loop went without running a ticker)."""
    longest = 0.0
    done = False

    async def ticker():
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await trio.sleep(0)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.01)
        t0 = time.perf_counter()
        await fn()
        wall = time.perf_counter() - t0
        done = True
    return wall, longest


def part2() -> None:
    rng = random.Random(2)
    print("## 2. Encode time vs size: inline, in slices, in a worker thread\n")
    print("| prompt chars | tokens | inline (loop blocked) | slices: wall | slices: longest stall "
          "| thread: wall | thread: longest stall |")
    print("|---|---|---|---|---|---|---|")

    async def main():
        await trio.to_thread.run_sync(lambda: None)
        for chars in (1_000, 4_000, 16_000, 64_000, 256_000, 600_000):
            text = words(chars // 5, rng)[:chars]
            request = parse_chat_request(orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}))
            n = tokens.count_prompt(request, "o200k_base").total
            reps = max(3, 200_000 // chars)
            inline = median_us(lambda: tokens.count_prompt(request, "o200k_base"), reps)
            cells = []
            for way in ("slices", "thread"):
                async def count():
                    if way == "thread":
                        await trio.to_thread.run_sync(tokens.count_prompt, request, "o200k_base")
                    else:
                        known = {}
                        for piece in tokens.slices(text):
                            known[id(piece)] = (piece, tokens.counter("o200k_base")(piece))
                            await trio.lowlevel.checkpoint()
                walls, stalls = [], []
                for _ in range(min(reps, 30)):
                    wall, stall = await loop_stall_during(count)
                    walls.append(wall)
                    stalls.append(stall)
                cells.append(f"{statistics.median(walls) * 1e6:,.0f} µs | {statistics.median(stalls) * 1e6:,.0f} µs")
            print(f"| {chars:,} | {n:,} | {inline:,.0f} µs | {' | '.join(cells)} |")
        hand_off = []
        for _ in range(500):
            t0 = time.process_time()
            await trio.to_thread.run_sync(lambda: None)
            hand_off.append(time.process_time() - t0)
        print(f"\nThread hand-off (empty function): {statistics.median(hand_off) * 1e6:.0f} µs of CPU, median.\n")

    trio.run(main)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(fake_port: int, setup: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(f"""
[server]
host = "127.0.0.1"
port = {port}
[auth]
master_key_env = "BENCH_UNSET_MASTER_KEY"
[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:{fake_port}/v1"
[models."gpt-4o"]
deployments = [{{provider = "fake"}}]
""")
    config.close()
    code = (f"{setup}; from proxy.cli import main; main(['--log-level', 'WARNING', 'serve', '--config', {config.name!r}])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


async def wait_up(port: int) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(600):  # a loaded machine starts a process slowly
            try:
                await client.get(f"http://127.0.0.1:{port}/healthz")
                return
            except httpx.HTTPError:
                await trio.sleep(0.05)
    raise RuntimeError(f"nothing on port {port}")


async def stream_gaps(client: httpx.AsyncClient, url: str, n_tokens: int, gaps: list[float]) -> None:
    body = {"model": "gpt-4o", "stream": True,
            "messages": [{"role": "user", "content": f'fake: {{"itl": 0.02, "tokens": {n_tokens}}}'}]}
    last = None
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now


async def itl_run(gw_port: int, streams: int, n_tokens: int, big: bytes | None) -> tuple[list[float], list[float]]:
    url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    gaps: list[float] = []
    big_times: list[float] = []
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one_big():
            t0 = time.perf_counter()
            r = await client.post(url, content=big, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text[:200]
            big_times.append(time.perf_counter() - t0)

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(stream_gaps, client, url, n_tokens, gaps)
            if big is not None:
                await trio.sleep(n_tokens * 0.02 / 3)
                for _ in range(5):
                    nursery.start_soon(one_big)
    return gaps, big_times


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


VARIANTS = (  # (label, code run in the gateway process before it starts, send the big prompts)
    ("no big prompts", "pass", False),
    ("big prompts, not counted (accounting off: the floor)",
     "import proxy.accounting.policy as p; p.AccountingPolicy.admit = lambda self, x, r: __import__('trio').sleep(0)",
     True),
    ("big prompts, counted in slices (shipped)", "pass", True),
    ("big prompts, counted in a worker thread", "import proxy.accounting.tokens as t; t.LARGE_PROMPTS = 'thread'", True),
    ("big prompts, counted inline", "import proxy.accounting.tokens as t; t.LARGE_PROMPT_CHARS = 10**9", True),
)


def part3(streams: int, n_tokens: int, repeat: int) -> None:
    rng = random.Random(3)
    text = words(100_000, rng)
    request = parse_chat_request(orjson.dumps({"model": "gpt-4o", "max_tokens": 1,
                                               "messages": [{"role": "user", "content": 'fake: {"tokens": 1}\n' + text}]}))
    n = tokens.count_prompt(request, "o200k_base").total
    big = orjson.dumps(request.body)
    fake_port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "proxy", "fake-provider", "--port", str(fake_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"## 3. Inter-token gaps of {streams} streams (20 ms apart) while 5 prompts of {n:,} tokens "
          f"({len(big) / 1e6:.1f} MB) arrive\n")
    print(f"Medians over {repeat} rounds (variants alternate within a round) of each round's figure.\n")
    print("| run | gaps per round | p50 | p99 | max | the 5 big requests' latency |\n|---|---|---|---|---|---|")
    results: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label, _, _ in VARIANTS}
    try:
        for _ in range(repeat):
            for label, setup, with_big in VARIANTS:
                gw, gw_port = start_gateway(fake_port, setup)
                try:
                    trio.run(wait_up, gw_port)
                    trio.run(itl_run, gw_port, streams, 20, None)  # warm-up
                    gaps, big_times = trio.run(itl_run, gw_port, streams, n_tokens, big if with_big else None)
                finally:
                    gw.terminate()
                    gw.wait()
                results[label].append((pct(gaps, 0.5), pct(gaps, 0.99), max(gaps),
                                       statistics.median(big_times) if big_times else 0.0))
                print(f"  round: {label}: p50 {pct(gaps, 0.5) * 1000:.1f} p99 {pct(gaps, 0.99) * 1000:.1f} "
                      f"max {max(gaps) * 1000:.1f} ms", file=sys.stderr)
    finally:
        fake.terminate()
        fake.wait()
    for label, rows in results.items():
        p50, p99, most, latency = (statistics.median(column) * 1000 for column in zip(*rows))
        shown = f"{latency:.0f} ms" if latency else "-"
        print(f"| {label} | {streams * (n_tokens - 1)} | {p50:.1f} ms | {p99:.1f} ms | {most:.1f} ms | {shown} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=150, help="tokens per stream in part 3")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of part 3")
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, tiktoken {version('tiktoken')}, trio {version('trio')}, "
          f"{os.cpu_count()} cores (shared machine); `python scripts/bench_tokens.py --streams {args.streams} "
          f"--tokens {args.tokens} --repeat {args.repeat}`\n")
    part1()
    part2()
    part3(args.streams, args.tokens, args.repeat)


if __name__ == "__main__":
    main()
