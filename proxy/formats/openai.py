"""OpenAI Chat Completions (and any server that speaks it): the identity translation.

Kinds `openai` and `openai-compatible` (vLLM, Together, Groq, Azure OpenAI, ...). Variants are
config, not code: extra `headers`, the key in another header (`api_key_header = "api-key"` for
Azure) and an `api_version` query parameter (Azure's `api-version`). Embeddings pass through too.

The canonical shape is OpenAI's, so requests pass through with the deployment's model name and
the provider's key; streams are parsed only as far as the gateway needs (errors, the end marker,
usage). Rules: the client's own Authorization never goes upstream; for streams we always ask the
provider for usage (accounting needs it) and `chat_api.py` hides that chunk from clients who did
not ask for it.
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import quote

import orjson

from proxy.core.request import ChatRequest
from proxy.config import ProviderConfig
from proxy.core.errors import GatewayError, UpstreamError, UpstreamRateLimited, UpstreamStatusError
from proxy.core.events import Chunk
from proxy.core.sse import SSEDecoder, SSEError
from proxy.formats import WireRequest, json_answer


class OpenAIAdapter:
    def __init__(self, config: ProviderConfig, api_key: str | None):
        self.name = config.name
        query = f"?api-version={quote(config.api_version)}" if config.api_version else ""
        self._url = config.base_url + "/chat/completions" + query
        self._embeddings_url = config.base_url + "/embeddings" + query
        self._headers = [("content-type", "application/json"), ("accept", "application/json"),
                         *config.headers]
        if api_key:
            if config.api_key_header in (None, "authorization"):
                self._headers.append(("authorization", f"Bearer {api_key}"))
            else:
                self._headers.append((config.api_key_header, api_key))

    def chat_request(self, request: ChatRequest, model: str) -> WireRequest:
        body = dict(request.body, model=model)
        if request.stream:
            body["stream_options"] = dict(body.get("stream_options") or {}, include_usage=True)
        return WireRequest("POST", self._url, self._headers, orjson.dumps(body))

    def stream_parser(self, max_event_bytes: int, request: ChatRequest | None = None
                      ) -> "OpenAIStreamParser":
        return OpenAIStreamParser(self.name, max_event_bytes)

    def parse_completion(self, body: bytes, request: ChatRequest | None = None) -> dict[str, Any]:
        return json_answer(self.name, body, "choices", list, "a response without choices")

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
        return error_from_body(self.name, status, headers.get("retry-after"), body)

    def embeddings_request(self, body: dict[str, Any], model: str) -> WireRequest:
        return WireRequest("POST", self._embeddings_url, self._headers, orjson.dumps(dict(body, model=model)))

    def parse_embeddings(self, body: bytes) -> dict[str, Any]:
        return json_answer(self.name, body, "data", list, "embeddings without data")


# A mid-stream error event's type -> the status it stands for. Compatible servers (vLLM) also put
# the status in a numeric `code`. A 4xx there is about the request (a prompt too long, a bad
# parameter): it goes back to the client and never counts against the deployment.
STREAM_ERROR_STATUS = {"invalid_request_error": 400, "BadRequestError": 400, "authentication_error": 401,
                       "permission_error": 403, "not_found_error": 404, "rate_limit_error": 429}


def error_from_body(provider: str, status: int, retry_after: str | None, body: bytes) -> GatewayError:
    """A provider error status becomes ours; its OpenAI-style message is kept when it has one."""
    try:
        err = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        err = None
    return error_from_object(provider, status, retry_after, err)


def stream_error(provider: str, err: Any) -> GatewayError:
    """An error event in a stream: a 4xx it names is kept as such, anything else is a 502."""
    if isinstance(err, dict):
        type_, code = err.get("type"), err.get("code")
        status = STREAM_ERROR_STATUS.get(type_) if isinstance(type_, str) else None
        if status is None and type(code) is int and 400 <= code < 500:
            status = code
        if status is not None:
            return error_from_object(provider, status, None, err)
    message = err.get("message") if isinstance(err, dict) else str(err)
    return UpstreamError(f"provider {provider}: {message or 'stream error'}")


def error_from_object(provider: str, status: int, retry_after: str | None, err: Any) -> GatewayError:
    message, type_, code, param = f"provider {provider} returned HTTP {status}", None, None, None
    if isinstance(err, dict):
        if isinstance(err.get("message"), str):
            message = f"provider {provider}: {err['message']}"
        type_ = err.get("type") if isinstance(err.get("type"), str) else None
        code = err.get("code") if isinstance(err.get("code"), str) else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
    if status == 429:
        return UpstreamRateLimited(message, retry_after=retry_after, type=type_ or "rate_limit_error",
                                   code=code or "rate_limit_exceeded", param=param)
    if status >= 500:
        return UpstreamStatusError(message, status=status, type="api_error", code="upstream_error")
    return UpstreamStatusError(message, status=status, type=type_, code=code, param=param)


class OpenAIStreamParser:
    """OpenAI SSE -> `Chunk`s of the raw JSON bytes (the canonical shape already).

    Hot path: a chunk is parsed only when a cheap byte check says it may carry an error or usage,
    or be malformed (not `{...}`); the rest are forwarded as the provider wrote them (no JSON round
    trip per token), and whether one is `visible` is read off its bytes too.
    """

    def __init__(self, provider: str, max_event_bytes: int):
        self._provider = provider
        self._sse = SSEDecoder(max_event_bytes)
        self._done = False
        self._finished = False  # a choice carried finish_reason
        self.failed: GatewayError | None = None

    def feed(self, data: bytes) -> list[Chunk]:
        try:
            return self._chunks(self._sse.feed(data))
        except SSEError as e:
            self.failed = UpstreamError(f"provider {self._provider}: {e}")
            return []

    def close(self) -> list[Chunk]:
        events = self._sse.close()
        # An event without its blank line is the tail of a cut stream: parse it (rare, so cheap)
        # rather than forward a truncated JSON chunk as if it were whole.
        for event in events:
            if event.data != b"[DONE]":
                try:
                    orjson.loads(event.data)
                except orjson.JSONDecodeError:
                    self.failed = UpstreamError(f"provider {self._provider} sent an event that is not JSON")
                    return []
        chunks = self._chunks(events)
        # Some compatible servers omit [DONE] after a finished choice; a stream with neither was cut.
        if self.failed is None and not (self._done or self._finished):
            self.failed = UpstreamError(f"provider {self._provider} ended the stream before it was complete")
        return chunks

    def _chunks(self, events: list) -> list[Chunk]:
        # Every check is bytes.find, not `in`: on CPython 3.11 `in` costs ~80 ns more per check
        # (it goes through the buffer protocol), and a token pays for five of them.
        chunks: list[Chunk] = []
        if self._done or self.failed is not None:
            return chunks
        for event in events:
            data = event.data
            if data == b"[DONE]":
                self._done = True
                break
            if (not data or data[0] != 123 or data[-1] != 125  # not {...}
                    or event.event == "error" or data.find(b'"error"') >= 0) \
                    and (error := self._error(data)) is not None:
                self.failed = error
                break
            # A finish_reason that is a string, in any choice ("}" ends data: f + 17 is in it).
            f = data.find(b'"finish_reason":')
            while f >= 0 and data[f + 16] != 34 and (data[f + 16] != 32 or data[f + 17] != 34):
                f = data.find(b'"finish_reason":', f + 16)
            if f >= 0:
                self._finished = visible = True
            else:
                # The common token: the first "content" is a non-empty string (the role chunk's
                # is "" and takes the slow way).
                i = data.find(b'"content":"')
                visible = i >= 0 and data[i + 11] != 34 or _visible(data)
            usage = None
            u = data.rfind(b'"usage"')  # the last key, where there is one
            if u >= 0 and not data.startswith(b":null", u + 7) and data.find(b'"usage":null') < 0:
                try:
                    usage, alone = _usage(data)
                except orjson.JSONDecodeError:
                    self.failed = UpstreamError(f"provider {self._provider} sent an event that is not JSON")
                    break
                visible = visible or alone
            chunks.append(Chunk(data, visible, usage))
        return chunks

    def _error(self, data: bytes) -> GatewayError | None:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return UpstreamError(f"provider {self._provider} sent an event that is not JSON")
        if not isinstance(chunk, dict):
            return UpstreamError(f"provider {self._provider} sent an event that is not an object")
        err = chunk.get("error")
        if err is None:
            return None  # '"error"' appeared inside content: a normal chunk after all
        return stream_error(self._provider, err)


def _visible(data: bytes) -> bool:
    """Does a chunk without a finish reason carry content, a tool call or a refusal?"""
    return (data.find(b'"tool_calls"') >= 0 or _nonempty(data, b'"content":"') or _nonempty(data, b'"content": "')
            or _nonempty(data, b'"refusal":"') or _nonempty(data, b'"refusal": "'))


def _nonempty(data: bytes, key: bytes) -> bool:
    """Is `key` (a name, colon and opening quote) ever followed by a non-empty string?"""
    at = data.find(key)
    while at >= 0:
        if data[at + len(key)] != 34:  # not the closing quote: the string has a character
            return True
        at = data.find(key, at + 1)
    return False


def _usage(data: bytes) -> tuple[dict[str, Any], bool]:
    """The usage of a chunk whose bytes mention it (the provider's last chunk, or a usage key we
    cannot rule out by bytes alone), and whether it is all the chunk carries (no choices).

    `{}` (no counts) when there is no usage object after all, e.g. a `"usage": null` written with
    a space: the encoder still re-renders such a chunk, as it always has."""
    chunk = orjson.loads(data)
    usage = chunk.get("usage")
    return (usage if isinstance(usage, dict) else {}), isinstance(usage, dict) and not chunk.get("choices")
