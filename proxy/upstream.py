"""The one module that talks to providers over the network (httpx, HTTP/1.1).

Rules, each from a measured failure (see PLATFORM-NOTES):
- No httpx pool cap: httpcore leaks pool slots when a task is cancelled while waiting for one
  (encode/httpcore#1093), which wedges the pool. Concurrency is bounded per provider by a
  `trio.CapacityLimiter` instead, which is exact under cancellation.
- HTTP/1.1 only: over HTTP/2 httpcore sends no RST_STREAM on cancel, so an abandoned stream keeps
  generating (and billing) upstream. Over HTTP/1.1 a cancelled read closes the socket at once.
- Timeouts are ours, not httpx's read timeout: `first_byte_timeout` covers sending the request
  until the first body bytes (LLMs think first), `read_timeout` every later gap. Connect is short.
- Foreign exceptions become `proxy.errors` classes here and nowhere else.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Iterator

import httpx
import trio

from .config import ProviderConfig
from .errors import UpstreamError, UpstreamTimeout
from .providers import ProviderAdapter, WireRequest

MAX_ERROR_BODY = 64 * 1024  # bytes of a provider's error body we read to relay its message


@contextlib.contextmanager
def _map_exceptions(provider: str) -> Iterator[None]:
    try:
        yield
    except trio.TooSlowError:
        raise UpstreamTimeout(f"provider {provider} timed out") from None
    except httpx.ConnectTimeout:
        raise UpstreamTimeout(f"provider {provider}: connect timed out") from None
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"provider {provider} timed out") from None
    except httpx.ConnectError:
        raise UpstreamError(f"provider {provider}: could not connect") from None
    except (httpx.TransportError, httpx.StreamError) as e:
        raise UpstreamError(f"provider {provider}: connection failed ({type(e).__name__})") from None


class Upstream:
    def __init__(self, providers: dict[str, ProviderConfig]):
        self._configs = providers
        self._limiters = {name: trio.CapacityLimiter(p.max_concurrency) for name, p in providers.items()}
        self._client = httpx.AsyncClient(
            http1=True,
            http2=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None,
                                keepalive_expiry=30.0),
            timeout=httpx.Timeout(None, connect=min(p.connect_timeout for p in providers.values())
                                  if providers else 5.0),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def in_flight(self, provider: str) -> int:
        return self._limiters[provider].borrowed_tokens

    def _build(self, wire: WireRequest, config: ProviderConfig) -> httpx.Request:
        return self._client.build_request(
            wire.method, wire.url, headers=wire.headers, content=wire.body,
            extensions={"timeout": {"connect": config.connect_timeout, "read": None,
                                    "write": config.read_timeout, "pool": None}},
        )

    @contextlib.asynccontextmanager
    async def stream(self, adapter: ProviderAdapter, wire: WireRequest) -> AsyncIterator[Body]:
        """Open a streaming response; yields its `Body`.

        Error statuses raise before anything is yielded, so the caller can still answer with a
        proper HTTP status. Leaving the block (normally or by cancellation) closes the socket.
        """
        config = self._configs[adapter.name]
        async with self._limiters[adapter.name]:
            with _map_exceptions(adapter.name):
                first_deadline = trio.current_time() + config.first_byte_timeout
                with trio.fail_at(first_deadline):
                    response = await self._client.send(self._build(wire, config), stream=True)
                try:
                    if response.status_code >= 400:
                        body = await _read_capped(response, config.read_timeout)
                        raise adapter.parse_error(response.status_code, response.headers, body)
                    yield Body(response, config, first_deadline)
                finally:
                    with trio.CancelScope(shield=True):  # closing must not be skipped by cancellation
                        await response.aclose()

    async def request(self, adapter: ProviderAdapter, wire: WireRequest) -> bytes:
        """A non-streaming call: the whole body, or the provider's error as a GatewayError."""
        config = self._configs[adapter.name]
        async with self._limiters[adapter.name]:
            with _map_exceptions(adapter.name):
                with trio.fail_after(config.first_byte_timeout + config.read_timeout):
                    response = await self._client.send(self._build(wire, config))
        if response.status_code >= 400:
            raise adapter.parse_error(response.status_code, response.headers,
                                      response.content[:MAX_ERROR_BODY])
        return response.content


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

    The first bytes must arrive by the deadline set when the request was sent (first-byte
    timeout); each later read gets `read_timeout`. A plain class rather than an async generator:
    no yield inside a cancel scope, nothing left for the garbage collector to finalize.
    """

    def __init__(self, response: httpx.Response, config: ProviderConfig, first_deadline: float):
        self._chunks = response.aiter_raw()
        self._config = config
        self._deadline = first_deadline

    async def next(self) -> bytes:
        with _map_exceptions(self._config.name):
            with trio.fail_at(self._deadline):
                try:
                    chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    return b""
        self._deadline = trio.current_time() + self._config.read_timeout
        return chunk
