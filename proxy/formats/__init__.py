"""One seam for every provider: adapters are pure translation, behind one Protocol.

An adapter turns the canonical request (OpenAI-shaped, `proxy.core.request.ChatRequest`) into a
`WireRequest`, and the provider's bytes back into canonical chunks, completions and errors. It does
no I/O: `proxy/transport/upstream.py` is the only module that talks to the network. That keeps adapters
testable byte by byte and lets one contract test suite (tests/test_providers_contract.py) run
over all of them.

Canonical usage is described in `proxy/core/usage.py`.

Kinds: openai / openai-compatible (`openai.py`), anthropic (`anthropic.py`), ollama (`ollama.py`).
The Anthropic Messages API that our own /v1/messages speaks is `messages_api.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from proxy.core.request import ChatRequest
from proxy.config import ProviderConfig
from proxy.core.errors import GatewayError


@dataclass(frozen=True, slots=True)
class WireRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes

    def __post_init__(self) -> None:
        # orjson.dumps returns bytes that keep its whole working buffer (4 KiB for a small
        # body, measured with tracemalloc); the body lives as long as the stream, so keep an
        # exact-size copy instead: ~4 KB less per open stream.
        object.__setattr__(self, "body", memoryview(self.body).tobytes())


@dataclass(frozen=True, slots=True)
class RawEvent:
    """An Anthropic SSE event passed through unchanged (client and provider both speak Anthropic).

    `usage` is the canonical usage known after this event (for logs), or None if it changed nothing.
    """

    event: str
    data: bytes
    usage: dict[str, Any] | None = None


# A canonical stream chunk: an OpenAI chat.completion.chunk, either as a dict or, when the
# provider already wrote that shape, as its raw JSON bytes (forwarded without a JSON round trip);
# or a RawEvent on the Anthropic passthrough path (only /v1/messages ever sees those).
Chunk = bytes | dict[str, Any] | RawEvent

# Key of a canonical completion that also carries the provider's own Anthropic message
# (passthrough, non-streaming): /v1/messages answers with it as-is. Never reaches OpenAI clients.
ANTHROPIC_MESSAGE = "x_anthropic_message"


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
    """`request`, where passed to the parsers, is the request being answered: the Anthropic
    adapter needs it to know a passthrough (RawEvents out), the tool validator its schemas."""

    name: str

    def chat_request(self, request: ChatRequest, model: str) -> WireRequest: ...

    def stream_parser(self, max_event_bytes: int, request: ChatRequest | None = None) -> StreamParser: ...

    def parse_completion(self, body: bytes, request: ChatRequest | None = None) -> dict[str, Any]: ...

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError: ...

    def embeddings_request(self, body: dict[str, Any], model: str) -> WireRequest:
        """Raises InvalidRequest if the provider kind serves no embeddings."""
        ...

    def parse_embeddings(self, body: bytes) -> dict[str, Any]: ...


def redact(error: GatewayError, secret: str | None) -> GatewayError:
    """A provider may echo the key it was sent (in an auth error): never pass it on."""
    if secret and secret in error.message:
        error.message = error.message.replace(secret, "***")
        error.args = (error.message,)
    return error


def make_adapter(config: ProviderConfig, api_key: str | None) -> ProviderAdapter:
    from proxy.formats.tool_args import ValidatingAdapter
    from proxy.formats import anthropic, ollama, openai

    adapters = {"openai": openai.OpenAIAdapter, "openai-compatible": openai.OpenAIAdapter,
                "anthropic": anthropic.AnthropicAdapter, "ollama": ollama.OllamaAdapter}
    adapter = adapters[config.kind](config, api_key)
    return ValidatingAdapter(adapter) if config.tool_arguments == "validate" else adapter
