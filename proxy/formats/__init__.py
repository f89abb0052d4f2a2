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

`make_adapter` wraps every adapter in its `Boundary`, the one place where what leaves an adapter
is made safe, so no adapter has to remember it:
- A provider may echo the key it was sent anywhere (a message, the error type, code or param, a
  Retry-After header, an error event mid-stream): every string of every error an adapter makes
  (status errors and stream failures alike) has the key replaced by `***`, and Retry-After is
  kept only when it is a number of seconds or an HTTP date.
- An adapter that cannot translate a request raises a 400 (`InvalidRequest`): the input was the
  client's, so it must neither become a 500 nor count against the deployment's breaker
  (`proxy/routing/policy.py`). A provider answer an adapter cannot read is the provider's
  fault: a 502 `UpstreamError`, retried elsewhere.
"""

from __future__ import annotations

import email.utils
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, TypeVar

import orjson

from proxy.core.request import ChatRequest
from proxy.config import ProviderConfig
from proxy.core.errors import GatewayError, InvalidRequest, UpstreamError
from proxy.core.events import Chunk

T = TypeVar("T")
log = logging.getLogger("proxy.formats")
_SECONDS = re.compile(r"[0-9]{1,10}(\.[0-9]{1,6})?")


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
    """`error` with `secret` replaced by `***` in every string a client or a log line sees, and
    a Retry-After that is not one (it is passed on as a header) dropped."""
    retry_after = getattr(error, "retry_after", None)
    if isinstance(retry_after, str) and not _retry_after_ok(retry_after):
        error.retry_after = None  # type: ignore[attr-defined]
    if not secret:
        return error
    for name in ("message", "type", "code", "param"):
        value = getattr(error, name, None)
        if isinstance(value, str) and secret in value:
            setattr(error, name, value.replace(secret, "***"))
    error.args = (error.message,)
    return error


def _retry_after_ok(value: str) -> bool:
    """Retry-After as RFC 9110 allows it: delay-seconds or an HTTP date (and short)."""
    if len(value) > 64:
        return False
    if _SECONDS.fullmatch(value):  # fractions too: some providers send them, the policy reads them
        return True
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError, IndexError):
        return False


class Boundary:
    """An adapter as the rest of the gateway sees it: its errors redacted, its failures classed
    (see the module docstring). The stream path pays one property read per upstream read
    (`failed`, ~0.1 µs): the parser's `feed` and `close` are the adapter's own."""

    def __init__(self, adapter: ProviderAdapter, secret: str | None):
        self._adapter = adapter
        self._secret = secret
        self.name = adapter.name

    def clean(self, error: GatewayError) -> GatewayError:
        return redact(error, self._secret)

    def _call(self, method: Callable[..., T], failed: Callable[[Exception], GatewayError], *args: Any) -> T:
        """`method(*args)` with its GatewayError redacted and any other failure turned into
        `failed(e)`: a 400 for a request the adapter cannot translate (the client's input), a 502
        for an answer it cannot read (the provider's)."""
        try:
            return method(*args)
        except GatewayError as e:
            raise self.clean(e) from None
        except Exception as e:  # noqa: BLE001 - any other failure is classed, never a 500
            raise failed(e) from None

    def chat_request(self, request: ChatRequest, model: str) -> WireRequest:
        return self._call(self._adapter.chat_request, self._untranslatable, request, model)

    def embeddings_request(self, body: dict[str, Any], model: str) -> WireRequest:
        return self._call(self._adapter.embeddings_request, self._untranslatable, body, model)

    def stream_parser(self, max_event_bytes: int, request: ChatRequest | None = None) -> StreamParser:
        return _CleanParser(self._adapter.stream_parser(max_event_bytes, request), self.clean)

    def parse_completion(self, body: bytes, request: ChatRequest | None = None) -> dict[str, Any]:
        return self._call(self._adapter.parse_completion, self._unreadable, body, request)

    def parse_embeddings(self, body: bytes) -> dict[str, Any]:
        return self._call(self._adapter.parse_embeddings, self._unreadable, body)

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
        try:
            error = self._adapter.parse_error(status, headers, body)
        except Exception as e:  # noqa: BLE001
            error = self._unreadable(e)
        return self.clean(error)

    def _untranslatable(self, e: Exception) -> GatewayError:
        log.warning("provider %s: the request could not be translated (%s)", self.name, type(e).__name__)
        return InvalidRequest(f"the request cannot be sent to provider {self.name}: a field has a shape "
                              f"it does not take ({type(e).__name__})")

    def _unreadable(self, e: Exception) -> GatewayError:
        log.warning("provider %s: its answer could not be read (%s)", self.name, type(e).__name__)
        return UpstreamError(f"provider {self.name} returned an answer that could not be read")


class _CleanParser:
    """A stream parser whose `failed` is redacted; `feed` and `close` are the parser's own."""

    __slots__ = ("_parser", "_clean", "feed", "close")

    def __init__(self, parser: StreamParser, clean: Callable[[GatewayError], GatewayError]):
        self._parser = parser
        self._clean = clean
        self.feed = parser.feed
        self.close = parser.close

    @property
    def failed(self) -> GatewayError | None:
        error = self._parser.failed
        return None if error is None else self._clean(error)


def make_adapter(config: ProviderConfig, api_key: str | None) -> ProviderAdapter:
    from proxy.formats.tool_args import ValidatingAdapter
    from proxy.formats import anthropic, ollama, openai

    adapters = {"openai": openai.OpenAIAdapter, "openai-compatible": openai.OpenAIAdapter,
                "anthropic": anthropic.AnthropicAdapter, "ollama": ollama.OllamaAdapter}
    adapter = adapters[config.kind](config, api_key)
    if config.tool_arguments == "validate":
        adapter = ValidatingAdapter(adapter)
    return Boundary(adapter, api_key)
