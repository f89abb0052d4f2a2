"""A floor beside the cache-hit TTFT figure: the same cached answer from the least a Python server does.

    python scripts/cache_floor.py [--seconds 6] [--tokens 1000] [--clients 1,10,100]

What it measures: a gateway process (memory cache) in front of a fake provider process, started
as `cache_bench.py ttft` starts them; one request fills the cache, the next one's response (a
hit) is captured and its SSE body (1,000 content events + role, finish and usage events,
~170 KB) is served unchanged by two floor servers, each a child process:

- floor-trio: `trio.serve_tcp`, one task per connection; read the request head and its
  Content-Length body, then two `send_all`s of bytes framed once at start (status line, headers,
  the events up to the first content one as one chunk; the rest as a second chunk, the last chunk).
- floor-hypercorn: a bare ASGI app under stock `hypercorn.trio.serve`; any POST gets 200,
  text/event-stream, the events up to the first content one in one `http.response.body`, the rest
  in a second (hypercorn frames the chunks), as the gateway's replay sends its first batch alone.

Each target (floor-trio, floor-hypercorn, gateway) is then driven with `cache_bench`'s
load generator (C raw keep-alive HTTP/1.1 clients in one process, closed loop, --seconds each):
time from the request's first byte sent to the first content byte received (p50/p99), hits/s,
and the target's CPU per hit (user + system from /proc), beside the load generator's own.
Loopback only; the load generator shares the machine's cores with the target.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

import trio  # noqa: E402

from cache_bench import cpu_seconds, first_content, free_port, start_cached_gateway, ttft_run, wait_port  # noqa: E402
from loadtest.bench.floor_hypercorn import answer_lifespan  # noqa: E402

LAST_CHUNK = b"0\r\n\r\n"


def split_body(sse: bytes) -> tuple[bytes, bytes]:
    """(the events up to and including the first with content, the rest): the replay's first batch."""
    at = 0
    while (end := sse.find(b"\n\n", at)) >= 0:
        at = end + 2
        if first_content(sse[:at]):
            return sse[:at], sse[at:]
    raise SystemExit("no content event in the captured body")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def dechunk(body: bytes) -> bytes:
    out, at = [], 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2:end + 2 + size])
        at = end + 2 + size + 2


# -- the floor servers (child processes) --

async def serve_trio(port: int, first: bytes, rest: bytes) -> None:
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    opening, closing = head + chunk(first), chunk(rest) + LAST_CHUNK  # framed once, sent per hit

    async def connection(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while (end := buf.find(b"\r\n\r\n")) < 0:
                    if not (data := await stream.receive_some(65536)):
                        return
                    buf += data
                need = end + 4
                for line in buf[:end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        need += int(value)
                while len(buf) < need:
                    if not (data := await stream.receive_some(65536)):
                        return
                    buf += data
                buf = buf[need:]
                await stream.send_all(opening)
                await stream.send_all(closing)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away

    await trio.serve_tcp(connection, port, host="127.0.0.1", backlog=4096)


async def serve_hypercorn(port: int, first: bytes, rest: bytes) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):  # the request body, read and dropped
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096
    config.read_timeout = None
    config.keep_alive_timeout = 75.0
    config.accesslog = None
    await serve(app, config)


# -- the driver --

def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fetch(port: int, request: bytes) -> tuple[bytes, bytes]:
    """(response head, decoded chunked body) of one request on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while not data.endswith(b"\r\n" + LAST_CHUNK):
            more = s.recv(262144)
            if not more:
                raise SystemExit("the gateway closed mid-response")
            data += more
    head, _, body = data.partition(b"\r\n\r\n")
    return head, dechunk(body)


def measure(name: str, proc: subprocess.Popen, port: int, request: bytes, clients: list[int],
            seconds: float) -> list[dict]:
    trio.run(ttft_run, port, 1, 0.5, request)  # connections, caches, code paths warm
    rows = []
    for c in clients:
        cpu, own = cpu_seconds(proc.pid), time.process_time()
        ttfts, took = trio.run(ttft_run, port, c, seconds, request)
        cpu, own = cpu_seconds(proc.pid) - cpu, time.process_time() - own
        n = len(ttfts)
        rows.append(dict(target=name, clients=c, p50=statistics.median(ttfts) * 1000,
                         p99=(statistics.quantiles(ttfts, n=100)[98] if n >= 2 else ttfts[0]) * 1000,
                         rate=n / took, cpu=cpu / n * 1000, own=own / n * 1000))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--clients", default="1,10,100")
    parser.add_argument("--serve", choices=("trio", "hypercorn"), help=argparse.SUPPRESS)  # a floor child
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with open(args.body, "rb") as f:
            first, rest = split_body(f.read())
        trio.run(serve_trio if args.serve == "trio" else serve_hypercorn, args.port, first, rest)
        return
    clients = [int(c) for c in args.clients.split(",")]
    folder = tempfile.mkdtemp()
    procs: list[subprocess.Popen] = []
    try:
        gateway, gw_port, request = start_cached_gateway(folder, args.tokens)
        procs += gateway
        fetch(gw_port, request)  # the miss: the cache's writer stores it beside the relay
        time.sleep(0.3)
        head, sse = fetch(gw_port, request)
        first, rest = split_body(sse)
        body_file = os.path.join(folder, "body.sse")
        with open(body_file, "wb") as f:
            f.write(sse)
        status = head.split(b"\r\n")[0].decode()
        print(f"captured hit: {status}, SSE body {len(sse):,} bytes, "
              f"{sse.count(b'data: ')} events, first batch {len(first)} bytes")
        rows = []
        for name in ("trio", "hypercorn"):
            port = free_port()
            procs.append(start([__file__, "--serve", name, "--port", str(port), "--body", body_file]))
            wait_port(port)
            rows += measure(f"floor-{name}", procs[-1], port, request, clients, args.seconds)
        rows += measure("gateway", procs[1], gw_port, request, clients, args.seconds)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    floor = {r["clients"]: r["cpu"] for r in rows if r["target"] == "floor-hypercorn"}
    print(f"\ncache-hit TTFT, {args.tokens}-token streamed answer, closed loop, {args.seconds:g} s per row, loopback\n")
    print("| target | clients | TTFT p50 ms | TTFT p99 ms | hits/s | CPU ms per hit | × hypercorn floor (CPU per hit) "
          "| load generator CPU ms per hit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']} | {r['clients']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rate']:.0f} | {r['cpu']:.3f} "
              f"| {r['cpu'] / floor[r['clients']]:.2f} | {r['own']:.3f} |")
    print(f"\npython {platform.python_version()}, {os.cpu_count()} cores (shared machine: others' work runs beside it); "
          f"a target serving each hit whole, one at a time, gives TTFT ≈ clients × CPU per hit at saturation")


if __name__ == "__main__":
    main()
