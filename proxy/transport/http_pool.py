"""An httpx transport with an O(1) keep-alive pool, for many concurrent upstream streams.

Why not httpcore's pool: `AsyncConnectionPool` re-examines *every* connection on every request
and every release (`_assign_requests_to_connections`: `is_idle()`/`has_expired()`, the latter a
`select` syscall per socket). With hundreds of open streams that scan dominated the gateway's CPU
(57 % of samples at 100 concurrent streams, py-spy) and added hundreds of ms to time to first
token. It also leaks slots under cancellation when capped (encode/httpcore#1093).

This pool keeps, per origin, a LIFO stack of idle HTTP/1.1 connections: a request pops one (only
that one is checked for expiry), or opens a new `httpcore.AsyncHTTPConnection`; when the
response is closed, the connection goes back if it is idle, else it is closed. There is no cap
here: concurrency is bounded per provider upstream of this (`proxy/upstream.py`), and idle
connections per origin are bounded by `max_idle`. Everything else (connecting, TLS, HTTP/1.1
framing, timeouts) is httpcore's own code.
"""

from __future__ import annotations

import ssl
from typing import AsyncIterator

import httpcore
import httpx
import trio
# Private but stable across the pinned httpx range: the one place httpcore errors become httpx's.
from httpx._transports.default import map_httpcore_exceptions

Origin = tuple[bytes, bytes, int]


class LifoPoolTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, keepalive_expiry: float = 30.0, max_idle: int = 1024,
                 ssl_context: ssl.SSLContext | None = None):
        self._expiry = keepalive_expiry
        self._max_idle = max_idle
        self._ssl_context = ssl_context or httpx.create_ssl_context()
        self._idle: dict[Origin, list[httpcore.AsyncHTTPConnection]] = {}
        self.connections_opened = 0  # for tests and metrics

    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    async def _checkout(self, origin: Origin) -> httpcore.AsyncHTTPConnection | None:
        stack = self._idle.get(origin)
        while stack:
            connection = stack.pop()  # LIFO: the most recently used socket is the likeliest alive
            if connection.is_idle() and not connection.has_expired():
                return connection
            await connection.aclose()
        return None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        connection = await self._checkout(origin)
        if connection is None:
            connection = httpcore.AsyncHTTPConnection(
                origin=httpcore.Origin(*origin), ssl_context=self._ssl_context,
                keepalive_expiry=self._expiry, http1=True, http2=False)
            self.connections_opened += 1
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        with map_httpcore_exceptions():
            try:
                response = await connection.handle_async_request(core_request)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
                raise
        stream = _ReleasingStream(self, origin, connection, response.stream)
        # httpx wraps the stream it is given; the extension lets `proxy/upstream.py` reach ours.
        return httpx.Response(status_code=response.status, headers=response.headers, stream=stream,
                              extensions={**response.extensions, "lifo_stream": stream})

    def _release(self, origin: Origin, connection: httpcore.AsyncHTTPConnection) -> bool:
        """Back on the stack if reusable; False means the caller must close it."""
        stack = self._idle.setdefault(origin, [])
        if connection.is_idle() and len(stack) < self._max_idle:
            stack.append(connection)
            return True
        return False

    async def aclose(self) -> None:
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for connection in stack:
                await connection.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    def __init__(self, pool: LifoPoolTransport, origin: Origin,
                 connection: httpcore.AsyncHTTPConnection, stream: AsyncIterator[bytes]):
        self._pool = pool
        self._origin = origin
        self._connection = connection
        self._stream = stream
        self._iterator: AsyncIterator[bytes] | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_httpcore_exceptions():
            async for part in self._stream:
                yield part

    async def read_raw(self) -> bytes:
        """The next body bytes, b"" at the end; httpcore errors mapped to httpx's.

        The per-token path: one generator step instead of httpx's four nested ones
        (Response.aiter_raw -> BoundAsyncStream -> this stream -> httpcore's), ~1/5 of the
        relay's CPU per event at 100 concurrent streams.
        """
        if self._iterator is None:
            self._iterator = self._stream.__aiter__()
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            return b""
        except Exception as e:
            with map_httpcore_exceptions():
                raise e

    async def aclose(self) -> None:
        # httpcore closes the socket itself if the body was not read to its end (cancellation).
        with map_httpcore_exceptions():
            await self._stream.aclose()
        if not self._pool._release(self._origin, self._connection):
            await self._connection.aclose()
