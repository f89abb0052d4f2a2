"""Raw trio floor: the least a Python/trio relay can do per request and per relayed read.

    python -m loadtest.bench.floor_trio --port P --upstream 127.0.0.1:U

What it is: `trio.serve_tcp`, one task per client connection. Per request: read the head and
the body (Content-Length), forward the body to the upstream's `POST /v1/chat/completions` on a
pooled keep-alive socket (`floor_pipe.Upstream`), then copy every upstream read to the client
unchanged, status line, headers and chunk framing included: one `receive_some`, one `send_all`.
The client connection stays open for its next request (the load generator keeps it alive).
A benchmark divides a target's CPU per relayed token by this one's: what is left is the target's
own work (parsing, routing, framing, ASGI, ...).

What it is not: a gateway. No auth, routing, header or JSON parsing, SSE decoding, deadlines,
disconnect watching (a client that leaves is noticed at the next write), limits or logs. Every
request goes to the one upstream path whatever the client asked. Never expose it: loopback only.
"""

from __future__ import annotations

import sys

import trio

from .floor_pipe import RECV_BYTES, ResponseEnd, Upstream, content_length, floor_main, split_head

BACKLOG = 65535  # held-stream scenarios open thousands of connections within a second


async def _read_request(client: trio.SocketStream, buf: bytes) -> tuple[bytes, bytes] | None:
    """(body, bytes already read past it), or None if the client closed between requests."""
    while (parts := split_head(buf)) is None:
        data = await client.receive_some(RECV_BYTES)
        if not data:
            return None
        buf += data
    head, rest = parts
    need = content_length(head) or 0
    while len(rest) < need:
        data = await client.receive_some(RECV_BYTES)
        if not data:
            return None
        rest += data
    return rest[:need], rest[need:]


async def _connection(client: trio.SocketStream, upstream: Upstream) -> None:
    buf = b""
    try:
        while (request := await _read_request(client, buf)) is not None:
            body, buf = request
            stream, data = await upstream.request(body)
            end, done = ResponseEnd(), False
            try:
                while True:
                    await client.send_all(data)
                    if end.feed(data):
                        done = True
                        break
                    data = await stream.receive_some(RECV_BYTES)
                    if not data:
                        break
            finally:
                upstream.release(stream, done)
            if not done:
                return  # the upstream ended mid-response: so does this client connection
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client (or the upstream) went away: nothing to tell anyone
    finally:
        client.socket.close()


async def serve(port: int, upstream: Upstream, host: str = "127.0.0.1", *,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(lambda client: _connection(client, upstream), listeners)


async def _serve(host: str, port: int, upstream: Upstream) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve, port, upstream, host)
        print(f"raw trio floor listening on http://{host}:{bound}/v1", flush=True)


def main(argv: list[str] | None = None) -> int:
    return floor_main("python -m loadtest.bench.floor_trio", __doc__, _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
