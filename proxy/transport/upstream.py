"""The one module that talks to providers over the network (httpx, HTTP/1.1).

Rules, each from a measured failure (see PLATFORM-NOTES):
- Not httpcore's connection pool: it scans every connection on every request (CPU grows with
  open streams) and leaks slots under cancellation when capped (encode/httpcore#1093). Our
  `LifoPoolTransport` (proxy/http_pool.py) is O(1) and uncapped; concurrency is bounded per
  provider by a `trio.CapacityLimiter`, which is exact under cancellation.
- HTTP/1.1 only: over HTTP/2 httpcore sends no RST_STREAM on cancel, so an abandoned stream keeps
  generating (and billing) upstream. Over HTTP/1.1 a cancelled read closes the socket at once.
- Timeouts are ours, not httpx's read timeout: `first_byte_timeout` covers sending the request
  until the first body bytes (LLMs think first), `read_timeout` every later gap. Connect is short.
- Foreign exceptions become `proxy.core.errors` classes here and nowhere else.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Iterator

import httpx
import trio

from proxy.config import ProviderConfig
from proxy.transport.http_pool import LifoPoolTransport
from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.formats import ProviderAdapter, WireRequest

MAX_ERROR_BODY = 64 * 1024  # bytes of a provider's error body we read to relay its message


def _translate(error: Exception, provider: str) -> Exception:
    """A foreign exception as our error; anything unexpected is returned unchanged."""
    if isinstance(error, trio.TooSlowError):
        return UpstreamTimeout(f"provider {provider} timed out")
    if isinstance(error, httpx.ConnectTimeout):
        return UpstreamTimeout(f"provider {provider}: connect timed out")
    if isinstance(error, httpx.TimeoutException):
        return UpstreamTimeout(f"provider {provider} timed out")
    if isinstance(error, httpx.ConnectError):
        return UpstreamError(f"provider {provider}: could not connect")
    if isinstance(error, (httpx.TransportError, httpx.StreamError)):
        return UpstreamError(f"provider {provider}: connection failed ({type(error).__name__})")
    return error


FOREIGN = (trio.TooSlowError, httpx.TransportError, httpx.StreamError)


@contextlib.contextmanager
def _map_exceptions(provider: str) -> Iterator[None]:
    try:
        yield
    except FOREIGN as e:
        raise _translate(e, provider) from None


class Upstream:
    def __init__(self, providers: dict[str, ProviderConfig]):
        self._configs = providers
        self._limiters = {name: trio.CapacityLimiter(p.max_concurrency) for name, p in providers.items()}
        # Requests go to the transport directly: AsyncClient's layers (auth, redirects, cookies,
        # event hooks, a log line per request) do nothing for us and cost ~0.2 ms per request.
        self.transport = LifoPoolTransport(keepalive_expiry=30.0)

    async def aclose(self) -> None:
        await self.transport.aclose()

    def _build(self, wire: WireRequest, config: ProviderConfig, read_timeout: float) -> httpx.Request:
        return httpx.Request(
            wire.method, wire.url, headers=wire.headers, content=wire.body,
            extensions={"timeout": {"connect": config.connect_timeout, "read": read_timeout,
                                    "write": config.read_timeout, "pool": None}},
        )

    @contextlib.asynccontextmanager
    async def stream(self, adapter: ProviderAdapter, wire: WireRequest) -> AsyncIterator[Body]:
        """Open a streaming response; yields its `Body`.

        Error statuses raise before anything is yielded, so the caller can still answer with a
        proper HTTP status. Leaving the block (normally or by cancellation) closes the socket.
        """
        config = self._configs[adapter.name]
        # httpcore reads the timeout extension when it starts reading headers and again when it
        # starts reading the body: the same dict, changed in between, gives the first byte
        # (headers) `first_byte_timeout` and every body read `read_timeout`, with no extra
        # cancel scope per read on our side. tests/test_errors.py covers both timeouts.
        request = self._build(wire, config, config.first_byte_timeout)
        async with self._limiters[adapter.name]:
            with _map_exceptions(adapter.name):
                response = await self.transport.handle_async_request(request)
                request.extensions["timeout"]["read"] = config.read_timeout
                try:
                    if response.status_code >= 400:
                        body = await _read_capped(response, config.read_timeout)
                        raise adapter.parse_error(response.status_code, response.headers, body)
                    yield Body(response, adapter.name)
                finally:
                    with trio.CancelScope(shield=True):  # closing must not be skipped by cancellation
                        await response.aclose()

    async def request(self, adapter: ProviderAdapter, wire: WireRequest) -> bytes:
        """A non-streaming call: the whole body, or the provider's error as a GatewayError."""
        config = self._configs[adapter.name]
        async with self._limiters[adapter.name]:
            with _map_exceptions(adapter.name):
                with trio.fail_after(config.first_byte_timeout + config.read_timeout):
                    response = await self.transport.handle_async_request(
                        self._build(wire, config, config.read_timeout))
                    try:
                        body = await response.aread()
                    finally:
                        with trio.CancelScope(shield=True):
                            await response.aclose()
        if response.status_code >= 400:
            raise adapter.parse_error(response.status_code, response.headers, body[:MAX_ERROR_BODY])
        return body


async def _read_capped(response: httpx.Response, timeout: float) -> bytes:
    body = bytearray()
    with trio.move_on_after(timeout):
        async for part in response.aiter_raw():
            body += part
            if len(body) >= MAX_ERROR_BODY:
                break
    return bytes(body[:MAX_ERROR_BODY])


class Body:
    """A streaming response body. `next()` returns the next bytes, or b"" at the clean end.

    A plain class rather than an async generator: no yield inside a cancel scope, nothing left
    for the garbage collector to finalize. The per-read timeout is httpcore's (see `stream`).
    """

    def __init__(self, response: httpx.Response, provider: str):
        self._read = response.extensions["lifo_stream"].read_raw  # see proxy/http_pool.py
        self._provider = provider

    async def next(self) -> bytes:
        try:
            return await self._read()
        except FOREIGN as e:  # inline rather than a context manager: this is the per-token path
            raise _translate(e, self._provider) from None
