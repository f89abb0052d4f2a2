"""Dispatch: one canonical request to the provider the router chooses.

The seam between endpoints (which speak a client format: OpenAI chat, Anthropic messages) and
everything behind them (routing, adapters, upstream I/O). Endpoints hand over a `ChatRequest`
and get canonical chunks through `emit` (streaming) or a canonical completion; `Served` tells
them who answered, for logs and response headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .chat_request import ChatRequest
from .providers import Chunk

if TYPE_CHECKING:
    from .app import Gateway

Emit = Callable[[list[Chunk]], Awaitable[None]]


@dataclass(slots=True)
class Served:
    provider: str = "-"
    model: str = "-"
    attempts: int = 0
    fallback: bool = False

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-gateway-deployment", f"{self.provider}/{self.model}".encode()),
                (b"x-gateway-attempts", str(self.attempts).encode()),
                (b"x-gateway-fallback", b"true" if self.fallback else b"false")]


async def stream(gateway: "Gateway", request: ChatRequest, emit: Emit, served: Served) -> None:
    """Stream the answer as canonical chunks into `emit`; raise GatewayError on failure."""
    target = gateway.router.pick(request.model)
    adapter = gateway.adapters[target.deployment.provider]
    served.provider, served.model, served.attempts = adapter.name, target.model, served.attempts + 1
    wire = adapter.chat_request(request, target.model)
    async with gateway.upstream.stream(adapter, wire) as body:
        parser = adapter.stream_parser(gateway.config.server.max_event_bytes)
        while True:
            data = await body.next()
            chunks = parser.feed(data) if data else parser.close()
            if chunks:
                await emit(chunks)
            if parser.failed is not None:
                raise parser.failed
            if not data:
                return


async def complete(gateway: "Gateway", request: ChatRequest, served: Served) -> dict[str, Any]:
    """The whole answer as a canonical (OpenAI chat.completion) dict; raise GatewayError on failure."""
    target = gateway.router.pick(request.model)
    adapter = gateway.adapters[target.deployment.provider]
    served.provider, served.model, served.attempts = adapter.name, target.model, served.attempts + 1
    raw = await gateway.upstream.request(adapter, adapter.chat_request(request, target.model))
    return adapter.parse_completion(raw)
