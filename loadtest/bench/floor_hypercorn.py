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
(`proxy.core.http1.ResponseDecoder`, the decoder the gateway uses, ~0.65 µs per read) since
hypercorn frames the body again.

What it is not: a gateway. No auth, routing, JSON or SSE parsing, deadlines, disconnect watching
(a client that leaves is not noticed: hypercorn's `send` after a disconnect silently succeeds, so
the upstream stream runs to its end), limits or logs. Loopback only.
"""

from __future__ import annotations

import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from proxy.core.http1 import ResponseDecoder

from .floor_pipe import RECV_BYTES, Upstream, floor_main

BACKLOG = 65535  # hypercorn's default of 100 drops connections when thousands open at once


async def answer_lifespan(receive, send) -> None:
    """Answered, so hypercorn logs no "lifespan unsupported"."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_app(upstream: Upstream):
    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = b""
        while True:  # the whole body first (hypercorn queues at most 10 messages per request)
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream, data = await upstream.request(body)
        decoder = ResponseDecoder(b"POST")
        try:
            pieces = decoder.feed(data)
            while decoder.head is None:
                more = await stream.receive_some(RECV_BYTES)
                if not more:
                    raise trio.BrokenResourceError("upstream closed in the response head")
                pieces = decoder.feed(more)
            head = decoder.head
            headers = [(name.lower(), value) for name, value in head.raw_headers
                       if name.lower() != b"transfer-encoding"]  # hypercorn frames the body again
            await send({"type": "http.response.start", "status": head.status, "headers": headers})
            while True:
                await send({"type": "http.response.body", "body": b"".join(pieces),
                            "more_body": not decoder.done})
                if decoder.done:
                    return
                data = await stream.receive_some(RECV_BYTES)
                if not data:
                    raise trio.BrokenResourceError("upstream closed mid-response")
                pieces = decoder.feed(data)
        finally:
            upstream.release(stream, decoder.keep_alive)

    return app


def config(host: str, port: int) -> Config:
    c = Config()
    c.bind = [f"{host}:{port}"]
    c.backlog = BACKLOG
    c.read_timeout = None  # SSE clients send nothing after the request
    c.keep_alive_timeout = 75.0
    c.accesslog = None
    return c


async def _serve(host: str, port: int, upstream: Upstream) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, make_app(upstream), config(host, port))
        print(f"hypercorn floor listening on {binds[0]}/v1", flush=True)


def main(argv: list[str] | None = None) -> int:
    return floor_main("python -m loadtest.bench.floor_hypercorn", __doc__, _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
