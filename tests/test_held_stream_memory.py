"""Memory a held stream keeps in the whole gateway (bench.md 2b), end to end.

A real gateway in this process, the fake provider and the clients in child processes (so that
only the gateway's allocations are traced), HELD streams open on their own connections, each
waiting for a first token 10 minutes away: the Python allocations per held stream, as
tracemalloc counts them. The bound is today's figure plus a margin. What it guards is the trims
of a held stream: no channel and no writer task before the first item, keep-alives without the
writer, one-frame socket receives, the app queue, no watchdog task (the process's alarms), no
nursery of its own (the connection's), one cancel scope on the reader's path, lean locks, the
await chain's frames. The negative controls put the largest back (a watchdog task and a nursery
per stream, ~3.8 KiB; then hypercorn's memory channel, ~1.9 more); the smallest trims (a frame,
~0.25 KiB) are below what a bound can tell here."""

from __future__ import annotations

import gc
import os
import re
import select
import subprocess
import sys
import tracemalloc

import orjson
import pytest
import trio

from proxy.server import app_queue
from proxy.server.alarms import Alarms
from tests.conftest import MASTER_KEY, config_for, run_gateway

HELD = 200
# Measured 24.7 KiB per stream here (Python 3.11.7, trio 0.35, hypercorn 0.18, h11 0.16); 28.5 with
# a watchdog task per stream (and so a nursery of its own), 30.5 with that and hypercorn's memory
# channel, 38.4 before the second round's trims. A dependency upgrade may move it: re-measure
# then (the message says by how much).
BOUND_KIB = 26.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIENTS = """
import socket, sys, time
n, port, request = int(sys.argv[1]), int(sys.argv[2]), sys.stdin.buffer.read()
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    held.append(s)
print("open", flush=True)
time.sleep(600)
"""


def _spawn(argv: list[str], stdin: bytes | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    if stdin is not None:
        proc.stdin.write(stdin)
    proc.stdin.close()
    ready, _, _ = select.select([proc.stdout], [], [], 60)  # a bound on a broken child, not a wait
    line = proc.stdout.readline().decode() if ready else ""
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{argv} did not start")
    return proc, line


@pytest.fixture
def provider_port():
    proc, line = _spawn(["-m", "proxy", "fake-provider", "--port", "0"])
    try:
        yield int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    finally:
        proc.kill()
        proc.wait()


def _request() -> bytes:
    body = orjson.dumps({"model": "gpt-4o", "stream": True,
                         "messages": [{"role": "user", "content": 'fake: {"ttft": 600, "tokens": 1}'}]})
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + MASTER_KEY.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


async def _hold(gateway, port: int, n: int) -> subprocess.Popen:
    clients, _ = _spawn(["-c", CLIENTS, str(n), str(port)], stdin=_request())
    with trio.fail_after(60):
        while len(gateway.streams) < n:
            await trio.sleep(0.05)
    return clients


async def _release(gateway, clients: subprocess.Popen) -> None:
    clients.kill()
    clients.wait()
    with trio.fail_after(30):
        while gateway.streams:
            await trio.sleep(0.05)


async def held_kib(nursery, provider_port: int) -> float:
    running = await run_gateway(nursery, config_for(provider_port, provider={"max_concurrency": 100000}))
    port = int(running.url.rsplit(":", 1)[1])
    gateway = running.gateway
    await _release(gateway, await _hold(gateway, port, 20))  # warm: imports, pools, caches
    await trio.sleep(0.2)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        clients = await _hold(gateway, port, HELD)
        await trio.sleep(0.3)  # every stream past its upstream request, waiting
        gc.collect()
        per_stream = (tracemalloc.get_traced_memory()[0] - before) / HELD / 1024
    finally:
        tracemalloc.stop()
    await _release(gateway, clients)
    running.stop.set()
    return per_stream


async def test_a_held_stream_keeps_under_the_bound(nursery, provider_port):
    kib = await held_kib(nursery, provider_port)
    assert kib < BOUND_KIB, f"{kib:.1f} KiB per held stream (bound {BOUND_KIB})"


async def test_the_bound_catches_a_watchdog_task_per_stream(nursery, provider_port, monkeypatch):
    monkeypatch.setattr(Alarms, "run", lambda self, until: until.wait())  # never running: a task each
    kib = await held_kib(nursery, provider_port)
    assert kib >= BOUND_KIB, f"{kib:.1f} KiB per held stream with a watchdog task each"


async def test_the_bound_catches_the_app_queue_reverted(nursery, provider_port, monkeypatch):
    monkeypatch.setattr(app_queue, "apply", lambda: None)  # serve() installs it: not this time
    app_queue.revert()
    kib = await held_kib(nursery, provider_port)
    assert kib >= BOUND_KIB, f"{kib:.1f} KiB per held stream with hypercorn's memory channel"
