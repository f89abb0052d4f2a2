"""The model endpoints: chat in two client formats (OpenAI, Anthropic) and embeddings.

One chat endpoint serves both /v1/chat/completions and /v1/messages: the client format
(`proxy.formats.chat_api.ChatAPI`, `proxy.formats.messages_api.MessagesAPI`) parses the request
and renders the stream, the answer and the errors; everything between is the same — the model is
checked (404 before any work), `Failover` routes and calls the provider, and a stream goes through
`Streams` (the pump: backpressure, write deadline, disconnects) while a plain answer is raced
against the client's disconnect. Each request ends with one log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Protocol

import trio

from proxy.core.errors import GatewayError
from proxy.core.events import Chunk
from proxy.core.request import ChatRequest, parse_embeddings_request
from proxy.core.usage import Usage
from proxy.routing.failover import Failover, Served
from proxy.server.asgi import ClientGone, Receive, Send, send_json, until_disconnect
from proxy.server.pump import Relay, put
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


class ChatEndpoint:
    def __init__(self, api: ClientFormat, failover: Failover, streams: Streams):
        self.api = api
        self._failover = failover
        self._streams = streams
        self._log = logging.getLogger(f"proxy.server.{api.name}")

    async def __call__(self, body: bytes, headers: dict[bytes, bytes], receive: Receive, send: Send) -> None:
        request = self.api.parse(body, headers)
        self._failover.router.check_model(request.model)  # 404 before any work
        requested = headers.get(b"x-gateway-deployment")
        served = Served(requested=requested.decode("latin-1") if requested is not None else None)
        usage = Usage()
        started = time.perf_counter()
        if request.stream:
            await self._stream(request, served, usage, receive, send, started)
            return
        try:
            completion = await until_disconnect(receive, lambda: self._failover.complete(request, served))
        except ClientGone:
            self._done(request, served, "client_disconnected", usage, started)
            raise
        usage.update(completion.get("usage"))
        await send_json(send, 200, self.api.completion(completion, request), served.headers())
        self._done(request, served, "ok", usage, started)

    async def _stream(self, request: ChatRequest, served: Served, usage: Usage, receive: Receive,
                      send: Send, started: float) -> None:
        encoder = self.api.stream_encoder(request, usage)

        async def produce(channel: trio.MemorySendChannel) -> None:
            async def emit(chunks: list[Chunk]) -> None:
                # One channel item per upstream read: the events of one read travel together.
                if out := encoder.encode(chunks):
                    await put(channel, out)

            await self._failover.stream(request, emit, served)
            if out := encoder.finish():
                await put(channel, out)

        def done(relay: Relay) -> None:
            self._done(request, served, relay.outcome, usage, started, relay.bytes_written)

        await self._streams.relay(send, receive, produce, headers=served.headers, done=done,
                                  error_event=self.api.error_event)

    def _done(self, request: ChatRequest, served: Served, outcome: str, usage: Usage,
              started: float, bytes_out: int | None = None) -> None:
        self._log.info("%s model=%s deployment=%s/%s attempts=%d stream=%s outcome=%s %s "
                       "bytes_out=%s ms=%.1f", self.api.name, request.model, served.provider, served.model,
                       served.attempts, request.stream, outcome, usage.log_fields(),
                       bytes_out if bytes_out is not None else "-", (time.perf_counter() - started) * 1000)


class EmbeddingsEndpoint:
    """POST /v1/embeddings: OpenAI's embeddings API, to OpenAI-compatible and Ollama deployments;
    an Anthropic deployment has none (400 naming the provider). Same retry/failover loop as chat."""

    def __init__(self, failover: Failover):
        self._failover = failover
        self._log = logging.getLogger("proxy.server.embeddings")

    async def __call__(self, body: bytes, headers: Mapping[bytes, bytes], receive: Receive, send: Send) -> None:
        request = parse_embeddings_request(body)
        started = time.perf_counter()
        self._failover.router.check_model(request["model"])  # 404 before any work
        served = Served()
        result = await until_disconnect(receive, lambda: self._failover.embeddings(request, served))
        result["model"] = request["model"]
        await send_json(send, 200, result, served.headers())
        self._log.info("embeddings model=%s deployment=%s/%s inputs=%d prompt_tokens=%s ms=%.1f",
                       request["model"], served.provider, served.model, len(result.get("data") or ()),
                       (result.get("usage") or {}).get("prompt_tokens", "-"),
                       (time.perf_counter() - started) * 1000)
