"""The upstream half of the two floor targets: pooled keep-alive sockets to the fake provider.

Shared by `floor_trio` and `floor_hypercorn` so both floors pay exactly the same upstream cost
and their difference is the client side alone (raw trio sockets vs hypercorn + ASGI).

What it is: a list of idle `trio.SocketStream`s to one host:port; `Upstream.request(body)` takes
one (or connects), writes `POST /v1/chat/completions` with the body as it came, and returns the
stream; the caller reads the response and hands the stream back with `release(stream, reusable)`.
Plus the least framing a relay needs to know where a response ends (`ResponseEnd`, for the raw
floor, which copies bytes unchanged; the ASGI floor decodes with the gateway's own decoder), and
the command line both floors share (`floor_main`).

What it is not: a general HTTP client. No deadlines, no retries beyond one fresh connection for
a pooled socket the upstream had already closed, no trailers, no `Connection: close` handling
(the fake provider keeps HTTP/1.1 connections open). `ResponseEnd` trusts that a chunked body is
an SSE stream: it ends at the first read that ends with `\\r\\n0\\r\\n\\r\\n` (an SSE chunk's data
ends with a blank line, so its framing ends `\\n\\n\\r\\n`, never `\\r\\n0\\r\\n\\r\\n`).
"""

from __future__ import annotations

import argparse
from typing import Awaitable, Callable

import trio

RECV_BYTES = 65536
_LAST_CHUNK = b"\r\n0\r\n\r\n"


def split_head(buf: bytes) -> tuple[bytes, bytes] | None:
    """(head without its blank line, the bytes after it), or None while the head is incomplete."""
    end = buf.find(b"\r\n\r\n")
    return None if end < 0 else (buf[:end], buf[end + 4:])


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


class ResponseEnd:
    """Fed every read of one response, unchanged: True once the response is complete."""

    __slots__ = ("_head", "_left", "_tail")

    def __init__(self) -> None:
        self._head = b""  # until the head is complete
        self._left: int | None = -1  # -1: head not seen yet; None: chunked; n: body bytes to go
        self._tail = b""  # the last bytes seen (the terminator may straddle two reads)

    def feed(self, data: bytes) -> bool:
        if self._left == -1:
            parts = split_head(self._head + data)
            if parts is None:
                self._head += data
                return False
            head, data = parts
            self._head = b""
            self._left = content_length(head)
            if self._left is not None:
                return self._count(data)
        if self._left is not None:
            return self._count(data)
        tail = data[-7:] if len(data) >= 7 else (self._tail + data)[-7:]
        self._tail = tail
        return tail == _LAST_CHUNK

    def _count(self, data: bytes) -> bool:
        self._left -= len(data)
        return self._left <= 0


class Upstream:
    """Idle keep-alive connections to one host:port (a LIFO list: the warmest socket first)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[trio.SocketStream] = []
        self._prefix = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\n"
                        b"content-type: application/json\r\ncontent-length: " % (host.encode(), port))

    async def request(self, body: bytes) -> tuple[trio.SocketStream, bytes]:
        """Write the request; returns the stream and its first read (non-empty)."""
        wire = self._prefix + b"%d\r\n\r\n" % len(body) + body
        while self._idle:
            stream = self._idle.pop()
            try:
                await stream.send_all(wire)
                first = await stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                first = b""
            if first:
                return stream, first
            stream.socket.close()  # the upstream closed it while idle: try the next one
        stream = await trio.open_tcp_stream(self.host, self.port)
        try:
            await stream.send_all(wire)
            first = await stream.receive_some(RECV_BYTES)
        except BaseException:
            stream.socket.close()
            raise
        if not first:
            stream.socket.close()
            raise trio.BrokenResourceError("upstream closed before answering")
        return stream, first

    def release(self, stream: trio.SocketStream, reusable: bool) -> None:
        """Back to the pool, or closed (synchronously: safe under cancellation and in finally)."""
        if reusable:
            self._idle.append(stream)
        else:
            stream.socket.close()


def parse_upstream(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


def floor_main(prog: str, doc: str | None, serve: Callable[[str, int, "Upstream"], Awaitable[None]],
               argv: list[str] | None) -> int:
    """A floor's command line: --host, --port (0: any, printed), --upstream host:port."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--upstream", required=True, help="host:port of the fake provider")
    args = p.parse_args(argv)
    host, port = parse_upstream(args.upstream)
    trio.run(serve, args.host, args.port, Upstream(host, port))
    return 0
