"""Hypercorn floor: the raw trio floor's pipe as a bare ASGI app under hypercorn's trio worker.

    python -m loadtest.bench.floor_hypercorn --port P --upstream 127.0.0.1:U

What it is: one process, `hypercorn.trio.serve` called programmatically (one worker), serving an
ASGI app that reads the request body, forwards it upstream on a pooled keep-alive socket (the
very code the raw floor uses: `floor_pipe.Upstream`), and turns every upstream read into one
`http.response.body` send (the first read also gives `http.response.start`). The difference
between this floor and `floor_trio` is what hypercorn + ASGI cost; the difference between the
gateway and this floor is what the gateway itself adds on top of the server it runs on.

The one thing it does beyond the raw floor, because ASGI demands it: the upstream status and
headers become an `http.response.start` message, and the upstream's chunk framing comes off
(`floor_pipe.Dechunker`) since hypercorn frames the body again. Both are a few µs per read.

What it is not: a gateway. No auth, routing, JSON or SSE parsing, deadlines, disconnect watching
(a client that leaves is not noticed: hypercorn's `send` after a disconnect silently succeeds, so
the upstream stream runs to its end), limits or logs. Loopback only.
"""

from __future__ import annotations

import argparse
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from .floor_pipe import RECV_BYTES, Dechunker, Upstream, content_length, parse_upstream, split_head

BACKLOG = 65535  # hypercorn's default of 100 drops connections when thousands open at once


def make_app(upstream: Upstream):
    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # answered, so hypercorn logs no "lifespan unsupported"
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:  # the whole body first (hypercorn queues at most 10 messages per request)
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream, data = await upstream.request(body)
        done = False
        try:
            while (parts := split_head(data)) is None:
                more = await stream.receive_some(RECV_BYTES)
                if not more:
                    raise trio.BrokenResourceError("upstream closed in the response head")
                data += more
            head, data = parts
            lines = head.split(b"\r\n")
            headers = [(name.strip().lower(), value.strip())
                       for name, _, value in (line.partition(b":") for line in lines[1:])]
            left = content_length(head)
            dechunk = None if left is not None else Dechunker()
            headers = [h for h in headers if h[0] != b"transfer-encoding"]  # hypercorn frames it
            await send({"type": "http.response.start", "status": int(lines[0].split(b" ", 2)[1]),
                        "headers": headers})
            while True:
                if dechunk is None:
                    left -= len(data)
                    done = left <= 0
                else:
                    data = dechunk.feed(data)
                    done = dechunk.done
                await send({"type": "http.response.body", "body": data, "more_body": not done})
                if done:
                    return
                data = await stream.receive_some(RECV_BYTES)
                if not data:
                    raise trio.BrokenResourceError("upstream closed mid-response")
        finally:
            upstream.release(stream, done)

    return app


def config(host: str, port: int) -> Config:
    c = Config()
    c.bind = [f"{host}:{port}"]
    c.backlog = BACKLOG
    c.read_timeout = None  # SSE clients send nothing after the request
    c.keep_alive_timeout = 75.0
    c.accesslog = None
    return c


async def _main(args: argparse.Namespace) -> None:
    host, port = parse_upstream(args.upstream)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, make_app(Upstream(host, port)),
                                    config(args.host, args.port))
        print(f"hypercorn floor listening on {binds[0]}/v1", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.floor_hypercorn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--upstream", required=True, help="host:port of the fake provider")
    trio.run(_main, p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
