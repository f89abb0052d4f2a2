"""The model endpoints: chat in two client formats (OpenAI, Anthropic) and embeddings.

One chat endpoint serves both /v1/chat/completions and /v1/messages: the client format
(`proxy.formats.chat_api.ChatAPI`, `proxy.formats.messages_api.MessagesAPI`) parses the request
and renders the stream, the answer and the errors; everything between is the same — the model is
checked (404 before any work), the per-request policies admit it (keys, limits, cache, tiers:
see exchange.py), `Failover` routes and calls the provider — or a policy's answer (a cache entry)
stands in for it — and a stream goes through `Streams` (the pump: backpressure, write deadline,
disconnects) while a plain answer is raced against the client's disconnect. Each request ends
with the policies' settlement and one log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Mapping, Protocol

from proxy.core.errors import GatewayError
from proxy.core.events import Chunk
from proxy.core.request import ChatRequest, parse_embeddings_request
from proxy.core.usage import Usage
from proxy.routing.failover import Failover, Served
from proxy.server.asgi import ClientGone, Receive, Send, send_json, until_disconnect
from proxy.server.exchange import Exchange, Policies
from proxy.server.pump import Outlet, Relay
from proxy.server.streams import Streams


class StreamEncoder(Protocol):
    def encode(self, chunks: list[Chunk]) -> bytes: ...

    def finish(self) -> bytes: ...


class ClientFormat(Protocol):
    name: str
    api_key_header: bytes | None

    def parse(self, body: bytes, headers: dict[bytes, bytes]) -> ChatRequest: ...

    def stream_encoder(self, request: ChatRequest, usage: Usage) -> StreamEncoder: ...

    def completion(self, completion: dict[str, Any], request: ChatRequest) -> dict[str, Any]: ...

    def error_body(self, error: GatewayError) -> dict[str, Any]: ...

    def error_event(self, error: GatewayError) -> bytes: ...


def response_headers(x: Exchange) -> list[tuple[bytes, bytes]]:
    """The headers of a successful answer: the request's own (x-request-id, the policies'), who
    served it (unless a cache entry did), and the cache's verdict. For a stream this runs when the
    response starts: routing (and a stale answer) may still be deciding until then."""
    out = x.response_headers + x.served.headers() if x.answer is None else list(x.response_headers)
    if x.cache is not None:
        out.append((b"x-gateway-cache", x.cache.encode()))
    return out


class ChatEndpoint:
    def __init__(self, api: ClientFormat, failover: Failover, streams: Streams, policies: Policies):
        self.api = api
        self._failover = failover
        self._streams = streams
        self._policies = policies
        self._log = logging.getLogger(f"proxy.server.{api.name}")

    async def __call__(self, x: Exchange, body: bytes, headers: dict[bytes, bytes], receive: Receive,
                       send: Send) -> Awaitable[None] | None:
        """Answers, or for a stream returns the relay for the app to await (app.Handler)."""
        x.endpoint = self.api.name
        request = self.api.parse(body, headers)
        x.model, x.stream = request.model, request.stream
        requested = headers.get(b"x-gateway-deployment")
        x.served = Served(requested=requested.decode("latin-1") if requested is not None else None)
        x.usage = usage = Usage()
        await self._policies.admit(x, request)  # may rewrite request.model (a tier), or answer
        if x.answer is None:
            self._failover.router.check_model(request.model)  # 404 before any work
        if request.stream:
            return self._stream(x, request, receive, send)
        try:
            completion = await until_disconnect(receive, lambda: self._complete(x, request))
        except ClientGone:
            self._done(x, request, "client_disconnected")
            raise
        x.completion = completion
        usage.update(completion.get("usage"))
        await send_json(send, 200, self.api.completion(completion, request), response_headers(x))
        self._done(x, request, "ok")

    async def _complete(self, x: Exchange, request: ChatRequest) -> dict[str, Any]:
        if x.answer is not None:
            return x.answer.completion()
        try:
            return await self._failover.complete(request, x.served)
        except GatewayError:
            if x.stale is None:
                raise
            x.cache, x.answer = "stale", x.stale  # every provider failed: the expired entry serves
            return x.stale.completion()

    def _stream(self, x: Exchange, request: ChatRequest, receive: Receive, send: Send) -> Awaitable[None]:
        """The relay, for the caller to await at once: not a coroutine of its own, whose frame would
        live as long as the stream."""
        job = _StreamJob(self, x, request)
        return self._streams.relay(send, receive, job.produce, headers=job.headers, done=job.done,
                                   error_event=self.api.error_event)

    def _done(self, x: Exchange, request: ChatRequest, outcome: str, bytes_out: int | None = None) -> None:
        x.outcome = outcome
        self._policies.settle(x)
        served, usage = x.served, x.usage
        self._log.info("%s model=%s deployment=%s/%s attempts=%d stream=%s outcome=%s %s "
                       "bytes_out=%s ms=%.1f", self.api.name, request.model, served.provider, served.model,
                       served.attempts, request.stream, outcome, usage.log_fields(),
                       bytes_out if bytes_out is not None else "-", (time.perf_counter() - x.started) * 1000)


class _StreamJob:
    """One stream's producer, response headers and end, for the relay: an object with slots rather
    than closures, whose functions, cells and closure tuples would live as long as the stream
    (~0.7 KB of every held stream)."""

    __slots__ = ("_endpoint", "_x", "_request", "_encoder", "_put")

    def __init__(self, endpoint: ChatEndpoint, x: Exchange, request: ChatRequest):
        self._endpoint, self._x, self._request = endpoint, x, request
        self._encoder = endpoint.api.stream_encoder(request, x.usage)
        self._put = None

    async def produce(self, outlet: Outlet) -> None:
        x, request = self._x, self._request
        self._put = outlet.put  # the first item may go out from this task at once (pump.Outlet)
        try:
            if x.answer is not None:
                await x.answer.stream(self.emit)
            else:
                try:
                    await self._endpoint._failover.stream(request, self.emit, x.served)
                except GatewayError:
                    if x.stale is None or x.served.committed:
                        raise
                    x.cache, x.answer = "stale", x.stale  # nothing was sent yet: the expired entry serves
                    await x.stale.stream(self.emit)
            if out := self._encoder.finish():
                await self._put(out)
        finally:
            # The outlet leads back to the relay, which holds this job (headers, done): a cycle
            # that only the cyclic GC would free, taking every finished stream's objects with it
            # (2.5x the collections, 70 ms pauses under load: bench.md). Refcounting frees it now.
            self._put = None

    async def emit(self, chunks: list[Chunk]) -> None:
        # One channel item per upstream read: the events of one read travel together.
        x = self._x
        if x.first_token_at is None and any(chunk.visible for chunk in chunks):
            x.first_token_at = time.perf_counter()
        for tap in x.taps:
            tap(chunks)
        if out := self._encoder.encode(chunks):
            await self._put(out)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return response_headers(self._x)

    def done(self, relay: Relay) -> None:
        self._endpoint._done(self._x, self._request, relay.outcome, relay.bytes_written)


class EmbeddingsEndpoint:
    """POST /v1/embeddings: OpenAI's embeddings API, to OpenAI-compatible and Ollama deployments;
    an Anthropic deployment has none (400 naming the provider). Same retry/failover loop as chat."""

    def __init__(self, failover: Failover, policies: Policies):
        self._failover = failover
        self._policies = policies
        self._log = logging.getLogger("proxy.server.embeddings")

    async def __call__(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                       send: Send) -> None:
        x.endpoint = "embeddings"
        request = parse_embeddings_request(body)
        x.model = request["model"]
        x.served = served = Served()
        x.usage = Usage()
        await self._policies.admit(x, request)
        if x.answer is not None:
            result = x.answer.completion()
        else:
            self._failover.router.check_model(request["model"])  # 404 before any work
            result = await until_disconnect(receive, lambda: self._failover.embeddings(request, served))
        result["model"] = x.model
        x.completion = result
        x.usage.update(result.get("usage"))
        x.outcome = "ok"
        await send_json(send, 200, result, response_headers(x))
        self._policies.settle(x)
        self._log.info("embeddings model=%s deployment=%s/%s inputs=%d prompt_tokens=%s ms=%.1f",
                       x.model, served.provider, served.model, len(result.get("data") or ()),
                       (result.get("usage") or {}).get("prompt_tokens", "-"),
                       (time.perf_counter() - x.started) * 1000)
