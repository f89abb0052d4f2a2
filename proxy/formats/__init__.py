"""One seam for every provider: adapters are pure translation, behind one Protocol.

An adapter turns the canonical request (OpenAI-shaped, `proxy.core.request.ChatRequest`) into a
`WireRequest`, and the provider's bytes back into `Chunk`s (`proxy/core/events.py`, the one event
type of a stream: the adapter also says whether each is visible and what usage it carries),
canonical completions and errors. It does no I/O: `proxy/transport/upstream.py` is the only module
that talks to the network. That keeps adapters testable byte by byte and lets one contract test
suite (tests/test_providers_contract.py) run over all of them.

Canonical usage is described in `proxy/core/usage.py`.

Kinds: openai / openai-compatible (`openai.py`), anthropic (`anthropic.py`), ollama (`ollama.py`).
The Anthropic Messages API that our own /v1/messages speaks is `messages_api.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import orjson

from proxy.core.request import ChatRequest
from proxy.config import ProviderConfig
from proxy.core.errors import GatewayError, UpstreamError
from proxy.core.events import Chunk


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
    adapter needs it to know a passthrough (provider events out as they came), the tool validator
    its schemas."""

    name: str

    def chat_request(self, request: ChatRequest, model: str) -> WireRequest: ...

    def stream_parser(self, max_event_bytes: int, request: ChatRequest | None = None) -> StreamParser: ...

    def parse_completion(self, body: bytes, request: ChatRequest | None = None) -> dict[str, Any]: ...

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError: ...

    def embeddings_request(self, body: dict[str, Any], model: str) -> WireRequest:
        """Raises InvalidRequest if the provider kind serves no embeddings."""
        ...

    def parse_embeddings(self, body: bytes) -> dict[str, Any]: ...


def canonical_chunk(id_: str, created: int, model: Any, delta: dict[str, Any] | None,
                    finish: str | None = None, usage: dict[str, Any] | None = None) -> Chunk:
    """A chunk an adapter builds (Anthropic, Ollama): one choice's delta, or with `delta` None the
    usage alone; serialized once, here."""
    body: dict[str, Any] = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if delta is None else
                            [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    visible = delta is None or bool(finish or delta.get("content") or delta.get("tool_calls"))
    return Chunk(orjson.dumps(body), visible, usage)


def json_answer(provider: str, body: bytes, key: str, kind: type, missing: str) -> dict[str, Any]:
    """A provider's plain JSON answer, which must be an object whose `key` is a `kind`."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"provider {provider} returned a response that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get(key), kind):
        raise UpstreamError(f"provider {provider} returned {missing}")
    return answer


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
