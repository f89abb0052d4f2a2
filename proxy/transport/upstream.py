"""The one module that talks to providers over the network (httpx's API, HTTP/1.1, our sockets).

Rules, each from a measured failure (see PLATFORM-NOTES):
- Requests are `httpx.Request`s sent through `SocketPoolTransport` (`proxy/transport/pool.py`):
  raw trio sockets, our sans-IO HTTP/1.1 decoder, an O(1) LIFO keep-alive pool. Not httpcore's
  pool: it scans every connection per request and leaks slots under cancellation when capped
  (encode/httpcore#1093); and httpcore's read path (h11, generator layers, a cancel scope per
  read) was a quarter of the gateway's CPU per relayed token. Concurrency is bounded per
  provider by a `trio.CapacityLimiter`, which is exact under cancellation.
- HTTP/1.1 only: a cancelled read closes the socket at once, so an abandoned stream stops
  generating (and billing) upstream. (Over HTTP/2, httpcore sends no RST_STREAM on cancel.)
- Timeouts are ours, on one cancel scope per request whose deadline moves — no scope per read:
  `first_byte_timeout` runs from sending the request until the first output (a stream's first
  token, `Body.first_output()`; a plain answer's first body bytes), `read_timeout` bounds every
  later gap between reads (the time a stream waits for its client does not count). The TTFT
  deadline of the router (`ttft_timeout`), when earlier, shares the same scope, and so does the
  request's whole-time deadline (the failover's `request_timeout`: RequestTimeout).
- Bounded: a plain answer larger than `max_response_bytes` is a 502, never buffered whole; an
  error body is read up to MAX_ERROR_BODY; compressed bodies are inflated step by step with a
  bound per step (the transport), so the caps above count decoded bytes.
- Foreign exceptions become `proxy.core.errors` classes here and nowhere else.
"""

from __future__ import annotations

import math

import httpx
import trio

from proxy.config import ProviderConfig
from proxy.core.errors import FirstTokenTimeout, RequestTimeout, Saturated, UpstreamError, UpstreamTimeout
from proxy.formats import ProviderAdapter, WireRequest
from proxy.transport.pool import ResponseStream, SocketPoolTransport

MAX_ERROR_BODY = 64 * 1024  # bytes of a provider's error body we read to relay its message
FOREIGN = (httpx.TransportError, httpx.StreamError)


def _translate(error: Exception, provider: str) -> Exception:
    """A foreign exception as our error; anything unexpected is returned unchanged."""
    if isinstance(error, httpx.ConnectTimeout):
        return UpstreamTimeout(f"provider {provider}: connect timed out")
    if isinstance(error, httpx.TimeoutException):
        return UpstreamTimeout(f"provider {provider} timed out")
    if isinstance(error, httpx.ConnectError):
        return UpstreamError(f"provider {provider}: could not connect")
    if isinstance(error, (httpx.TransportError, httpx.StreamError)):
        return UpstreamError(f"provider {provider}: connection failed ({type(error).__name__})")
    return error


class _Slot:
    """`async with limiter`, without its scheduler round trip when a slot is free: the request's
    socket operations yield anyway, and under load every round trip on the way to a new stream's
    first token is a turn of every other stream. A full provider is waited for at most
    `queue_timeout` (as a full deployment is, router.admit): then Saturated, and the failover
    moves on to another deployment, or the client gets 429 gateway_saturated — never a silent
    queue as long as the request's whole time."""

    __slots__ = ("_limiter", "_name", "_queue_timeout")

    def __init__(self, limiter: trio.CapacityLimiter, name: str, queue_timeout: float):
        self._limiter = limiter
        self._name = name
        self._queue_timeout = queue_timeout

    async def acquire(self, deadline: float) -> None:
        """A slot, waiting at most `queue_timeout` and never past `deadline` (the request's)."""
        try:
            self._limiter.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        with trio.CancelScope(deadline=min(trio.current_time() + self._queue_timeout, deadline)):
            await self._limiter.acquire()  # full: wait (outside the handler), bounded
            return
        if trio.current_time() >= deadline:
            raise RequestTimeout(f"request_timeout ran out waiting for provider {self._name}")
        raise Saturated(f"provider {self._name} is at its max_concurrency ({self._limiter.total_tokens}); "
                        "retry shortly")

    def release(self) -> None:
        self._limiter.release()


class Upstream:
    def __init__(self, providers: dict[str, ProviderConfig], transport: SocketPoolTransport | None = None,
                 *, queue_timeout: float = 1.0):
        self._configs = providers
        self._slots = {name: _Slot(trio.CapacityLimiter(p.max_concurrency), name, queue_timeout)
                       for name, p in providers.items()}
        self.transport = transport or SocketPoolTransport(keepalive_expiry=30.0)

    async def aclose(self) -> None:
        await self.transport.aclose()

    @staticmethod
    def _build(wire: WireRequest, config: ProviderConfig) -> httpx.Request:
        # Only the connect (and request write) timeouts are the transport's; reads are ours.
        return httpx.Request(wire.method, wire.url, headers=wire.headers, content=wire.body,
                             extensions={"timeout": {"connect": config.connect_timeout,
                                                     "write": config.read_timeout}})

    async def _open(self, adapter: ProviderAdapter, wire: WireRequest, config: ProviderConfig) -> ResponseStream:
        """Send the request; return a success's body stream (the caller closes it), or raise an
        error status as ours. Only the stream is kept: the httpx Request and Response would
        otherwise live (headers, body) as long as a stream."""
        try:
            response = await self.transport.handle_async_request(self._build(wire, config))
            stream, status, headers = response.stream, response.status_code, response.headers
            del response
            assert isinstance(stream, ResponseStream)
            if status < 400:
                return stream
            try:
                body = await _read_capped(stream, MAX_ERROR_BODY)
            finally:
                await stream.aclose()
        except FOREIGN as e:
            raise _translate(e, adapter.name) from None
        raise adapter.parse_error(status, headers, body)

    def stream(self, adapter: ProviderAdapter, wire: WireRequest, *, ttft_deadline: float = math.inf,
               deadline: float = math.inf) -> _Streaming:
        """Open a streaming response: `async with upstream.stream(...) as body`, a `Body`.

        Error statuses raise before anything is yielded, so the caller can still answer with a
        proper HTTP status. Leaving the block (normally or by cancellation) closes the socket
        unless the body was read to its clean end (then it goes back to the pool). `deadline`
        is the request's whole time (the failover's request_timeout): past it, RequestTimeout.
        """
        return _Streaming(self, adapter, wire, ttft_deadline, deadline)

    async def request(self, adapter: ProviderAdapter, wire: WireRequest, *, deadline: float = math.inf) -> bytes:
        """A non-streaming call: the whole body, or the provider's error as a GatewayError."""
        config = self._configs[adapter.name]
        slot = self._slots[adapter.name]
        await slot.acquire(deadline)
        try:
            first_byte = trio.current_time() + config.first_byte_timeout
            with trio.CancelScope(deadline=min(first_byte, deadline)) as timer:
                stream = await self._open(adapter, wire, config)
                try:
                    body = await _read_all(stream, timer, config, adapter.name, deadline)
                except FOREIGN as e:
                    raise _translate(e, adapter.name) from None
                finally:
                    await stream.aclose()
            if timer.cancelled_caught:
                if timer.deadline >= deadline:
                    raise RequestTimeout(f"request_timeout ran out waiting for provider {adapter.name}")
                raise UpstreamTimeout(f"provider {adapter.name} timed out")
        finally:
            slot.release()
        return body


async def _read_capped(stream: ResponseStream, limit: int) -> bytes:
    body = bytearray()
    while len(body) < limit and (part := await stream.read()):
        body += part
    return bytes(body[:limit])


async def _read_all(stream: ResponseStream, timer: trio.CancelScope, config: ProviderConfig,
                    provider: str, deadline: float) -> bytes:
    """The whole body under `max_response_bytes`; after the first bytes, `read_timeout` per gap."""
    body = bytearray()
    while part := await stream.read():
        body += part
        if len(body) > config.max_response_bytes:
            raise UpstreamError(f"provider {provider}: response larger than max_response_bytes "
                                f"({config.max_response_bytes})")
        timer.deadline = min(trio.current_time() + config.read_timeout, deadline)
    return bytes(body)


class _Streaming:
    """`Upstream.stream`'s block: the provider's slot, then the request's one timer, then the body.

    A class, not an asynccontextmanager: a generator's frame, its context manager's dict and
    argument tuple (which kept the sent request's bytes) would live as long as the stream, ~1 KB
    per held stream. Enters and exits exactly as the nested blocks did:
        async with slot: with CancelScope(deadline=first) as timer: stream = open(); yield Body
    The timer is the stream's only cancel scope: it carries the request's own deadline too
    (`deadline`, the failover's request_timeout), so no caller holds a scope of its own for as
    long as the stream lasts (~0.7 KB per held stream).
    """

    __slots__ = ("_upstream", "_adapter", "_wire", "_ttft_deadline", "_deadline", "_first_byte", "_first",
                 "_slot", "_timer", "_stream")

    def __init__(self, upstream: Upstream, adapter: ProviderAdapter, wire: WireRequest, ttft_deadline: float,
                 deadline: float):
        self._upstream, self._adapter, self._wire = upstream, adapter, wire
        self._ttft_deadline, self._deadline = ttft_deadline, deadline

    async def __aenter__(self) -> Body:
        upstream, adapter = self._upstream, self._adapter
        config = upstream._configs[adapter.name]
        self._first_byte = trio.current_time() + config.first_byte_timeout
        self._first = min(self._first_byte, self._ttft_deadline, self._deadline)
        wire, self._wire = self._wire, None  # sent once: not kept for the stream's life
        slot = self._slot = upstream._slots[adapter.name]
        await slot.acquire(self._deadline)
        timer = self._timer = trio.CancelScope(deadline=self._first)
        timer.__enter__()
        try:
            self._stream = await upstream._open(adapter, wire, config)
        except BaseException as exc:
            error = exc  # left outside the handler: a timeout raised below is not chained to it
        else:
            return Body(self._stream, timer, config.read_timeout, adapter.name, self._deadline)
        del wire
        try:
            await self._leave(error)  # raises the timeout when the timer caught the error
            raise error
        finally:
            del error

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        stream, self._stream = self._stream, None
        try:
            await stream.aclose()  # never awaits I/O: closes or pools the socket
        except BaseException as close_error:  # the timer and the slot are still left, in order
            await self._leave(close_error)
            raise
        return await self._leave(exc)

    async def _leave(self, exc: BaseException | None) -> bool:
        """Exit the timer's scope, then the slot; a firing of the timer becomes our timeout error."""
        timer = self._timer
        try:
            if exc is None:
                swallowed = timer.__exit__(None, None, None)
            else:
                swallowed = timer.__exit__(type(exc), exc, exc.__traceback__)
            if timer.cancelled_caught:
                name = self._adapter.name
                if timer.deadline >= self._deadline:
                    raise RequestTimeout(f"request_timeout ran out streaming from provider {name}")
                if timer.deadline == self._first and self._ttft_deadline < self._first_byte:
                    raise FirstTokenTimeout(f"provider {name}: no first token within the ttft_timeout")
                which = "first_byte_timeout" if timer.deadline == self._first else "read_timeout"
                raise UpstreamTimeout(f"provider {name} timed out ({which})")
        finally:
            self._slot.release()
        return bool(swallowed)


class Body:
    """A streaming response body. `next()` returns the next bytes, or b"" at the clean end.

    Until `first_output()` every read runs under the first-output deadline (first_byte_timeout,
    or the router's TTFT deadline); after it, each read gets `read_timeout`, and the time between
    reads (the stream waiting for its client) is not counted. None of them runs past the
    request's own deadline.
    """

    __slots__ = ("_read", "_timer", "_read_timeout", "_provider", "_streaming", "_deadline")

    def __init__(self, stream: ResponseStream, timer: trio.CancelScope, read_timeout: float, provider: str,
                 deadline: float):
        self._read = stream.read
        self._timer = timer
        self._read_timeout = read_timeout
        self._provider = provider
        self._streaming = False
        self._deadline = deadline

    def first_output(self) -> None:
        """The first token went to the client: from now on, `read_timeout` per gap."""
        self._streaming = True
        self._timer.deadline = self._deadline

    async def next(self) -> bytes:
        timer = self._timer
        try:
            if not self._streaming:
                return await self._read()
            due = trio.current_time() + self._read_timeout
            timer.deadline = due if due < self._deadline else self._deadline
            data = await self._read()
            timer.deadline = self._deadline
            return data
        except FOREIGN as e:  # inline rather than a context manager: this is the per-token path
            raise _translate(e, self._provider) from None
