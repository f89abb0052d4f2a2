"""POST /v1/chat/completions: parse, route, call the provider, relay or answer.

Streaming goes through `proxy.relay.Relay`; non-streaming calls race the provider against the
client's disconnect, so a client that leaves cancels the upstream request either way.
Usage is always requested from the provider (accounting needs it) and shown to the client only
when it asked with `stream_options.include_usage`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

import orjson
import trio

from proxy.routing import failover as dispatch
from proxy.core.request import ChatRequest, parse_chat_request
from proxy.routing.failover import Served
from proxy.core.errors import GatewayError
from proxy.formats import Chunk
from proxy.server.pump import Producer, Receive, Relay, Send
from proxy.core.sse import DONE, encode_event

if TYPE_CHECKING:
    from proxy.server.app import Gateway

log = logging.getLogger("proxy.server.chat")
T = TypeVar("T")


@dataclass(slots=True)
class Usage:
    """Canonical usage (proxy/providers/__init__.py): cached_tokens are read from the prompt
    cache, cache_write_tokens written to it; both are part of prompt_tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    # Chunks relayed to the client: the record of a stream that ended before the provider's
    # usage chunk (abandoned, cut, or failed after the first token) — about one token each.
    streamed_chunks: int = 0

    def update(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens") or self.prompt_tokens
            self.completion_tokens = usage.get("completion_tokens") or self.completion_tokens
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = details.get("cached_tokens") or self.cached_tokens
                self.cache_write_tokens = details.get("cache_write_tokens") or self.cache_write_tokens

    def log_fields(self) -> str:
        return (f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens} "
                f"cached_tokens={self.cached_tokens} cache_write_tokens={self.cache_write_tokens} "
                f"streamed_chunks={self.streamed_chunks}")


async def handle(gateway: "Gateway", body: bytes, receive: Receive, send: Send, *,
                 requested_deployment: str | None = None) -> None:
    from proxy.server.app import ClientGone, send_json

    request = parse_chat_request(body)
    gateway.router.check_model(request.model)  # 404 before any work
    served = Served(requested=requested_deployment)
    usage = Usage()
    started = time.perf_counter()
    if request.stream:
        await _stream(gateway, request, served, usage, receive, send, started)
        return
    completion = await until_disconnect(receive, lambda: dispatch.complete(gateway, request, served))
    if completion is None:
        _log(request, served, "client_disconnected", usage, started)
        raise ClientGone()
    usage.update(completion.get("usage"))
    await send_json(send, 200, completion, served.headers())
    _log(request, served, "ok", usage, started)


async def _stream(gateway: "Gateway", request: ChatRequest, served: Served, usage: Usage,
                  receive: Receive, send: Send, started: float) -> None:
    async def produce(channel: trio.MemorySendChannel) -> None:
        async def emit(chunks: list[Chunk]) -> None:
            # One channel item per upstream read: the events of one read travel together.
            if out := _encode(chunks, request, usage):
                await channel.send(out)

        await dispatch.stream(gateway, request, emit, served)
        await channel.send(DONE)

    def done(relay: Relay) -> None:
        _log(request, served, relay.outcome, usage, started, relay.bytes_written)

    await run_relay(gateway, receive, send, produce, served, done)


async def run_relay(gateway: "Gateway", receive: Receive, send: Send, produce: Producer, served: Served,
                    done: Callable[[Relay], None], **options: Any) -> None:
    """One streaming response through a Relay configured from [server], counted while open
    (drain, /healthz); `done(relay)` runs at the end whatever happened (the endpoint's log line)."""
    server = gateway.config.server
    relay = Relay(send, receive, write_timeout=server.write_timeout, buffer=server.stream_buffer,
                  keepalive_interval=server.keepalive_interval, headers=served.headers, **options)
    gateway.relays.add(relay)
    try:
        await relay.run(produce)
    finally:
        gateway.relays.discard(relay)
        done(relay)


def _encode(chunks: list[Chunk], request: ChatRequest, usage: Usage) -> bytes:
    """Canonical chunks -> SSE bytes for the client, taking usage out on the way."""
    parts = []
    usage.streamed_chunks += len(chunks)
    for chunk in chunks:
        if isinstance(chunk, bytes):
            if b'"usage"' not in chunk or b'"usage":null' in chunk:
                parts.append(encode_event(chunk))  # the common case: forwarded as written
                continue
            chunk = orjson.loads(chunk)
        if "usage" in chunk:
            usage.update(chunk["usage"])
            if not request.include_usage:
                if not chunk.get("choices"):
                    continue  # the usage-only chunk we asked for on our own behalf
                del chunk["usage"]
        parts.append(encode_event(orjson.dumps(chunk)))
    return b"".join(parts)


async def until_disconnect(receive: Receive, call: Callable[[], Awaitable[T]]) -> T | None:
    """Run `call` unless the client disconnects first (then cancel it and return None)."""
    result: T | None = None
    error: GatewayError | None = None

    async def watch(scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            result = await call()
        except GatewayError as e:
            error = e
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


def _log(request: ChatRequest, served: Served, outcome: str, usage: Usage,
         started: float, bytes_out: int | None = None) -> None:
    log.info("chat model=%s deployment=%s/%s attempts=%d stream=%s outcome=%s %s "
             "bytes_out=%s ms=%.1f", request.model, served.provider, served.model,
             served.attempts, request.stream, outcome, usage.log_fields(),
             bytes_out if bytes_out is not None else "-", (time.perf_counter() - started) * 1000)
