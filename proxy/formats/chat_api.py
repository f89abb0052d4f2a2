"""The OpenAI Chat Completions API as our /v1/chat/completions speaks it (the client side).

The canonical shape is this API's own, so requests are only validated (`proxy.core.request`) and
stream chunks pass through as the provider's adapter produced them; only a chunk with usage is
parsed and written again. One rule of our own: usage is always requested from the provider
(accounting needs it) and shown to the client only when it asked with
`stream_options.include_usage` — the usage-only chunk is dropped otherwise.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.errors import GatewayError
from proxy.core.events import Chunk
from proxy.core.request import ChatRequest, parse_chat_request
from proxy.core.sse import DONE, encode_event
from proxy.core.usage import Usage


class ChatAPI:
    """What the generic chat endpoint (`proxy/server/endpoints.py`) needs of a client format."""

    name = "chat"
    api_key_header: bytes | None = None  # Bearer only

    def parse(self, body: bytes, headers: dict[bytes, bytes]) -> ChatRequest:
        return parse_chat_request(body)

    def stream_encoder(self, request: ChatRequest, usage: Usage) -> "ChatStreamEncoder":
        return ChatStreamEncoder(request, usage)

    def completion(self, completion: dict[str, Any], request: ChatRequest) -> dict[str, Any]:
        return completion

    def error_body(self, error: GatewayError) -> dict[str, Any]:
        return error.to_body()

    def error_event(self, error: GatewayError) -> bytes:
        return openai_error_event(error)


def openai_error_event(error: GatewayError) -> bytes:
    """The last event of a failed stream in OpenAI's shape: `data: {"error": {...}}` (no [DONE])."""
    return encode_event(orjson.dumps(error.to_body()))


class ChatStreamEncoder:
    """Canonical chunks -> SSE bytes for the client, taking usage out on the way."""

    __slots__ = ("_include_usage", "_usage")

    def __init__(self, request: ChatRequest, usage: Usage):
        self._include_usage = request.include_usage
        self._usage = usage

    def encode(self, chunks: list[Chunk]) -> bytes:
        self._usage.streamed_chunks += len(chunks)
        if len(chunks) > 1 and all(chunk.usage is None for chunk in chunks):
            # Many chunks forwarded as written (a cache replay's batches, a provider's read of
            # several events): one join in C instead of one encode_event each (0.12 vs 0.54 us a
            # chunk), unless a chunk's data has a line break (then one data line per line).
            body = b"\n\ndata: ".join([chunk.data for chunk in chunks])
            if body.count(b"\n") == 2 * (len(chunks) - 1) and b"\r" not in body:
                return b"data: " + body + b"\n\n"
        parts = []
        for chunk in chunks:
            if chunk.usage is None:
                parts.append(encode_event(chunk.data))  # the common case: forwarded as written
                continue
            self._usage.update(chunk.usage)
            parsed = orjson.loads(chunk.data)
            if "usage" in parsed and not self._include_usage:
                if not parsed.get("choices"):
                    continue  # the usage-only chunk we asked for on our own behalf
                del parsed["usage"]
            parts.append(encode_event(orjson.dumps(parsed)))
        return b"".join(parts)

    def finish(self) -> bytes:
        return DONE
