"""An httpx transport on raw trio sockets: HTTP/1.1 keep-alive, an O(1) LIFO pool, fast body reads.

Layers: httpx (the request/response types and exception classes) -> this module (sockets, pool,
decompression) -> `proxy.core.http1` (framing, sans-IO). No private httpx/httpcore imports.

Rules:
- Pool: per origin a stack of idle keep-alive connections. A request pops the newest; only that
  one is checked (idle longer than `keepalive_expiry`, or readable: EOF or stray bytes = dead).
  Returning a connection drops expired ones from the bottom; at most `max_idle` stay per origin.
  No cap on open connections: bound concurrency above this (a `trio.CapacityLimiter` per provider).
  A reused connection that fails before the first response byte is retried once on a new one,
  if the request body is bytes (replayable).
- A connection goes back to the pool only when its body was read to the clean end and the
  response allows keep-alive. `aclose()` before the end, any error, cancellation (any
  BaseException in a read) or `abort()` close the socket at once: the provider sees EOF promptly.
  Closing never awaits, so `aclose()` is safe in a `finally` under cancellation without a shield.
- Timeouts: only `request.extensions["timeout"]["connect"]` (TCP + TLS) and `["write"]` (each send
  of the request) are honoured. There is no read timeout here: the caller wraps the call and its
  reads in its own long-lived scope (first byte, then gaps between reads). Extension dicts are
  only read, never changed.
- Content-Encoding: `accept-encoding: identity` is sent unless the caller set one. gzip / deflate
  bodies are inflated at most `MAX_DECODED` bytes per step (a gzip bomb is read piece by piece,
  never held whole); the caller then sees neither content-encoding nor content-length. Other
  codings raise `httpx.DecodingError` on the first body bytes.
- Errors are httpx's public classes: ConnectError/ConnectTimeout, WriteError/WriteTimeout,
  ReadError, RemoteProtocolError, LocalProtocolError, DecodingError, UnsupportedProtocol.
"""

from __future__ import annotations

import math
import ssl
import zlib
from collections import deque
from typing import AsyncIterator, Awaitable

import httpx
import trio

from proxy.core.http1 import Head, ProtocolError, ResponseDecoder, encode_chunk, encode_head
from proxy.transport import sockets

RECEIVE_BYTES = 65536  # per socket receive
MAX_DECODED = 65536  # bytes of inflated output per read: the memory bound of a compressed body
Origin = tuple[bytes, bytes, int]
_FRAMING = (b"content-length", b"transfer-encoding")
_STREAM_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_KEEP_ALIVE_HEAD, _CLOSE_HEAD = Head(200, {}, True), Head(200, {}, False)  # stand-ins (_exchange)


class _Connection:
    __slots__ = ("stream", "socket", "idle_since")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType):
        self.stream, self.socket = stream, socket
        self.idle_since = 0.0

    def receive(self, max_bytes: int) -> Awaitable[bytes]:
        """The next bytes (b"" at EOF): plain TCP in one frame (`sockets.receive_some`: what a held
        stream waits in). Not a coroutine of its own, nor a stored partial: neither would be kept
        for as long as a stream waits."""
        return sockets.receive_some(self.stream, max_bytes)

    def close(self) -> None:
        self.socket.close()  # synchronous; wakes any task blocked on it with ClosedResourceError


class _Stale(Exception):
    """A kept-alive connection the server had already closed: the request is retried once."""


class SocketPoolTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, keepalive_expiry: float = 30.0, max_idle: int = 1024,
                 ssl_context: ssl.SSLContext | None = None):
        """`ssl_context` is used as given; the default one offers ALPN http/1.1 only."""
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._expiry, self._max_idle, self._ssl_context = keepalive_expiry, max_idle, ssl_context
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._closed = False
        self.connections_opened = 0  # for tests and metrics

    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.raw_scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
        origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        timeouts = request.extensions.get("timeout") or {}
        wire = _serialize(request)
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return await self._exchange(request, origin, conn, wire, timeouts, True)
            except _Stale:
                pass  # closed already; once more on a new connection
        conn = await self._connect(origin, timeouts.get("connect"), request)
        return await self._exchange(request, origin, conn, wire, timeouts, False)

    async def aclose(self) -> None:
        """Closes the idle connections; responses still being read close theirs at their end."""
        self._closed = True
        stacks, self._idle = self._idle, {}
        for stack in stacks.values():
            for conn in stack:
                conn.close()

    def _checkout(self, origin: Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        while stack:
            conn = stack.pop()  # LIFO: the most recently used socket is the likeliest alive
            if trio.current_time() - conn.idle_since <= self._expiry and not conn.socket.is_readable():
                return conn
            conn.close()
        return None

    def _release(self, origin: Origin, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        now = trio.current_time()
        conn.idle_since = now
        stack = self._idle.setdefault(origin, deque())
        while stack and (len(stack) >= self._max_idle or now - stack[0].idle_since > self._expiry):
            stack.popleft().close()
        stack.append(conn)

    async def _connect(self, origin: Origin, timeout: float | None, request: httpx.Request) -> _Connection:
        scheme, host, port = origin
        socket = None
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            try:
                stream = await trio.open_tcp_stream(host.decode("ascii"), port)
                socket = stream.socket
                if scheme == b"https":
                    stream = trio.SSLStream(stream, self._ssl_context, server_hostname=host.decode("ascii"),
                                            https_compatible=True)
                    await stream.do_handshake()
            except BaseException as exc:
                if socket is not None:
                    socket.close()
                if isinstance(exc, _STREAM_ERRORS):
                    raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc
                raise
        if scope.cancelled_caught:
            raise httpx.ConnectTimeout("connect timed out", request=request)
        self.connections_opened += 1
        return _Connection(stream, socket)

    async def _exchange(self, request: httpx.Request, origin: Origin, conn: _Connection,
                        wire: tuple[bytes, bytes | None, bool], timeouts: dict, reused: bool
                        ) -> httpx.Response:
        head, body, chunked = wire
        decoder = ResponseDecoder(request.method.encode("ascii"))
        write_timeout = timeouts.get("write")
        got_bytes = False
        try:
            if body is not None:
                await _send(conn, head + body, write_timeout, request)
            else:
                await _send(conn, head, write_timeout, request)
                async for part in request.stream:
                    if part:
                        await _send(conn, encode_chunk(part) if chunked else part, write_timeout, request)
                if chunked:
                    await _send(conn, encode_chunk(b""), write_timeout, request)
            pieces: list[bytes] = []
            while decoder.head is None:
                try:
                    data = await conn.receive(RECEIVE_BYTES)
                except _STREAM_ERRORS as exc:
                    raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
                if not data:
                    if reused and not got_bytes and body is not None:
                        raise _Stale
                    raise httpx.RemoteProtocolError("server disconnected without a response", request=request)
                got_bytes = True
                pieces = decoder.feed(data)
        except ProtocolError as exc:
            conn.close()
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except (httpx.ReadError, httpx.WriteError) as exc:
            conn.close()
            if reused and not got_bytes and body is not None:
                raise _Stale from exc
            raise
        except BaseException:
            conn.close()
            raise
        response_head = decoder.head
        headers = list(response_head.raw_headers)
        stream_class = _coding_stream(response_head.headers.get(b"content-encoding"))
        if issubclass(stream_class, _InflatingStream):  # the caller sees the decoded body's headers
            headers = [(n, v) for n, v in headers if n.lower() not in (b"content-encoding", b"content-length")]
        stream = stream_class(self, origin, conn, decoder, b"".join(pieces))
        # The stream's decoder needs only whether the head allowed keep-alive: the parsed head's
        # dict and field tuples (~1 KB) would otherwise live as long as the stream.
        decoder.head = _KEEP_ALIVE_HEAD if response_head.keep_alive else _CLOSE_HEAD
        return httpx.Response(
            status_code=response_head.status, headers=headers, stream=stream, request=request,
            extensions={"http_version": b"HTTP/" + response_head.http_version,
                        "reason_phrase": response_head.reason, "response_stream": stream})


def _serialize(request: httpx.Request) -> tuple[bytes, bytes | None, bool]:
    """The request head; its body if it is bytes (None: stream it from `request.stream`);
    whether a streamed body goes out chunked."""
    try:
        body: bytes | None = request.content
    except httpx.RequestNotRead:
        body = None
    headers = request.headers.raw
    names = {name.lower(): value for name, value in headers}
    extra = []
    if b"host" not in names:
        extra.append((b"host", request.url.netloc))
    if b"accept-encoding" not in names:
        extra.append((b"accept-encoding", b"identity"))
    if names.keys().isdisjoint(_FRAMING) and (body is None or body):
        extra.append((b"transfer-encoding", b"chunked") if body is None
                     else (b"content-length", b"%d" % len(body)))
    try:
        head = encode_head(request.method.encode("ascii"), request.url.raw_path, extra + headers)
    except ProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc), request=request) from exc
    chunked = body is None and b"content-length" not in names
    return head, body, chunked


async def _send(conn: _Connection, data: bytes, timeout: float | None, request: httpx.Request) -> None:
    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
        try:
            await conn.stream.send_all(data)
        except _STREAM_ERRORS as exc:
            raise httpx.WriteError(f"{type(exc).__name__}: {exc}", request=request) from exc
    if scope.cancelled_caught:
        raise httpx.WriteTimeout("write timed out", request=request)


class ResponseStream(httpx.AsyncByteStream):
    """A response body on a pooled socket.

    `await read()`: the next body bytes, b"" at the clean end (one socket receive per call).
    `aclose()`: before the end, closes the socket (never awaits). `abort()`: synchronous, for
    another task (a watchdog): closes the socket now; a read in progress raises httpx.ReadError.
    """

    def __init__(self, pool: SocketPoolTransport, origin: Origin, conn: _Connection,
                 decoder: ResponseDecoder, pending: bytes):
        # No reference to the request: it would live (headers, body) as long as the stream.
        # httpx's client attaches the request to errors raised while reading a body.
        self._pool, self._origin, self._decoder = pool, origin, decoder
        self._pending = pending  # body bytes that came with the head
        self._error = ""  # why further reads fail (closed before the end)
        self._conn: _Connection | None = conn  # None once finished or closed
        if decoder.done:
            self._finish(conn)

    async def read(self) -> bytes:
        conn = self._conn
        if conn is None or self._pending:
            return self._leftover()
        decoder = self._decoder
        while True:
            try:
                data = await conn.receive(RECEIVE_BYTES)
                pieces = decoder.feed(data) if data else decoder.close()
            except Exception as exc:
                self._drop(conn, "read failed")
                raise _read_error(exc) from exc
            except BaseException:  # cancellation: the provider must see EOF at once
                self._drop(conn, "read cancelled")
                raise
            if decoder.done:
                self._finish(conn)
            if pieces:
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if self._conn is None:
                return self._leftover()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while part := await self.read():
            yield part

    async def aclose(self) -> None:
        if self._conn is not None:
            self._drop(self._conn, "stream closed before its end")

    def abort(self) -> None:
        """Close the socket now, from any task, without awaiting (e.g. a watchdog)."""
        if self._conn is not None:
            self._drop(self._conn, "aborted")

    def _leftover(self) -> bytes:
        pending, self._pending = self._pending, b""
        if pending:
            return pending
        if self._error:
            raise httpx.ReadError(self._error)
        return b""

    def _finish(self, conn: _Connection) -> None:
        if self._conn is not conn:  # aborted meanwhile
            return
        self._conn = None
        if self._decoder.keep_alive:
            self._pool._release(self._origin, conn)
        else:
            conn.close()

    def _drop(self, conn: _Connection, why: str) -> None:
        conn.close()
        if self._conn is conn:
            self._conn, self._error = None, why


def _read_error(exc: Exception) -> Exception:
    if isinstance(exc, ProtocolError):
        return httpx.RemoteProtocolError(str(exc))
    return httpx.ReadError(f"{type(exc).__name__}: {exc}")


class _InflatingStream(ResponseStream):
    """gzip / deflate: at most MAX_DECODED output bytes per step; the rest of the input waits."""

    WBITS = 16 + zlib.MAX_WBITS  # gzip

    def __init__(self, *args):
        self._wbits = self.WBITS
        self._inflater = zlib.decompressobj(self._wbits)
        self._tail = b""  # compressed input not consumed yet
        self._more = False  # the last step filled its output: zlib may hold more
        self._seen = False  # any compressed input
        self._first = True  # no step taken yet (raw deflate is detected there)
        super().__init__(*args)

    async def read(self) -> bytes:
        while True:
            if self._tail or self._more:
                out = self._inflate(self._tail)
                if out:
                    return out
            raw = await super().read()
            if not raw:
                if self._seen and not self._inflater.eof:
                    raise httpx.DecodingError("compressed body ended early")
                return b""
            self._seen, self._tail = True, raw

    def _inflate(self, data: bytes) -> bytes:
        first, self._first = self._first, False
        try:
            out = self._inflater.decompress(data, MAX_DECODED)
        except zlib.error as exc:
            if first and self._wbits == zlib.MAX_WBITS:  # "deflate" sent without its zlib header
                self._wbits = -zlib.MAX_WBITS
                self._inflater = zlib.decompressobj(self._wbits)
                return self._inflate(data)
            self.abort()
            raise httpx.DecodingError(f"bad compressed body: {exc}") from exc
        self._tail, self._more = self._inflater.unconsumed_tail, len(out) == MAX_DECODED
        if self._inflater.eof and self._inflater.unused_data and self._wbits > zlib.MAX_WBITS:
            # gzip members may be concatenated
            self._tail, self._inflater = self._inflater.unused_data, zlib.decompressobj(self._wbits)
        return out


class _DeflateStream(_InflatingStream):
    WBITS = zlib.MAX_WBITS  # zlib-wrapped; raw deflate is detected on the first error


class _UnsupportedCodingStream(ResponseStream):
    async def read(self) -> bytes:
        if await super().read():
            self.abort()
            raise httpx.DecodingError("unsupported content-encoding")
        return b""


def _coding_stream(value: bytes | None) -> type[ResponseStream]:
    if value is None:
        return ResponseStream
    coding = value.strip().lower()
    return {b"": ResponseStream, b"identity": ResponseStream, b"gzip": _InflatingStream,
            b"x-gzip": _InflatingStream, b"deflate": _DeflateStream}.get(coding, _UnsupportedCodingStream)
