"""One seam for every provider: adapters are pure translation, behind one Protocol.

An adapter turns the canonical request (OpenAI-shaped, `proxy.chat_request.ChatRequest`) into a
`WireRequest`, and the provider's bytes back into canonical chunks, completions and errors. It does
no I/O: `proxy/upstream.py` is the only module that talks to the network. That keeps adapters
testable byte by byte and lets one contract test suite run over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from ..chat_request import ChatRequest
from ..config import ProviderConfig
from ..errors import GatewayError


@dataclass(frozen=True, slots=True)
class WireRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


# A canonical stream chunk: an OpenAI chat.completion.chunk, either as a dict or, when the
# provider already wrote that shape, as its raw JSON bytes (forwarded without a JSON round trip).
Chunk = bytes | dict[str, Any]


class StreamParser(Protocol):
    """Sans-IO: provider stream bytes in, canonical chunks out.

    On a provider error (an error event, a malformed or oversized event, a cut stream) the
    parser returns the chunks that came before it and sets `failed`; the caller relays those
    first and then raises `failed`, so nothing the provider sent is lost.
    """

    failed: GatewayError | None

    def feed(self, data: bytes) -> list[Chunk]: ...

    def close(self) -> list[Chunk]:
        """The provider closed the body cleanly; sets `failed` if the stream was cut short."""
        ...


class ProviderAdapter(Protocol):
    name: str

    def chat_request(self, request: ChatRequest, model: str) -> WireRequest: ...

    def stream_parser(self, max_event_bytes: int) -> StreamParser: ...

    def parse_completion(self, body: bytes) -> dict[str, Any]: ...

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError: ...


def make_adapter(config: ProviderConfig, api_key: str | None) -> ProviderAdapter:
    from . import openai

    adapters = {"openai": openai.OpenAIAdapter}
    return adapters[config.kind](config, api_key)
