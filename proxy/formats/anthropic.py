"""Anthropic Messages API (`POST {base_url}/v1/messages`): canonical <-> Anthropic, both ways.

Request (canonical, OpenAI-shaped -> Anthropic): system/developer messages become `system`;
text and image parts become content blocks (data: URLs as base64 sources, others as url
sources); assistant `tool_calls` become `tool_use` blocks and `tool` messages `tool_result`
blocks; consecutive same-role messages merge (Anthropic wants user/assistant alternation);
`max_tokens` is required there, so the provider's `max_tokens` config is the default; `stop`,
`temperature`, `top_p`, `user`, `tools` (with `input_schema`) and `tool_choice` map over. With
`auto_prompt_cache`, the last system block and the last tool get `cache_control` (ephemeral), so
the stable prefix is cached without clients knowing Anthropic's syntax.

Passthrough: a request that came in as Anthropic (`ChatRequest.anthropic_body`) is sent as the
client wrote it, with only the model replaced, and with the client's `anthropic-beta` header: no
lossy round trip (cache_control, thinking blocks, metadata survive). Its stream comes back as the
provider's own events (`Chunk.event` set), forwarded verbatim, and its non-streaming message rides
along under `ANTHROPIC_MESSAGE`; usage and errors are still read.

Stream (Anthropic SSE -> canonical chunks): message_start gives the id, model and input usage;
content_block_start/delta of text and tool_use (`input_json_delta`) become content and
tool_calls deltas, a tool_use block's position among the tool blocks being its OpenAI index;
message_delta gives the stop reason (-> finish_reason) and output usage; message_stop ends it
and is when the usage chunk goes out; ping is skipped; thinking blocks have no canonical form and
are dropped (passthrough keeps them). An `error` event fails the stream (`overloaded_error` as an
upstream 529, retryable like a 503: see proxy/core/errors.py).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import orjson

from proxy.core.request import ChatRequest
from proxy.config import ProviderConfig
from proxy.core.errors import GatewayError, UpstreamError, UpstreamRateLimited, UpstreamStatusError
from proxy.core.sse import SSEDecoder, SSEError
from proxy.core.events import Chunk
from proxy.formats import ANTHROPIC_MESSAGE, WireRequest, canonical_chunk, json_answer
from proxy.core.usage import usage

DEFAULT_VERSION = "2023-06-01"
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter"}
# Anthropic error type -> the status it comes with, for an `error` event that has no status.
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                "api_error": 500, "overloaded_error": 529}
EPHEMERAL = {"type": "ephemeral"}


class AnthropicAdapter:
    def __init__(self, config: ProviderConfig, api_key: str | None):
        self.name = config.name
        self._url = config.base_url + "/v1/messages"
        self._max_tokens = config.max_tokens
        self._auto_cache = config.auto_prompt_cache
        self._headers = [("content-type", "application/json"), ("accept", "application/json"),
                         ("anthropic-version", config.api_version or DEFAULT_VERSION), *config.headers]
        if api_key:
            self._headers.append((config.api_key_header or "x-api-key", api_key))

    def chat_request(self, request: ChatRequest, model: str) -> WireRequest:
        if request.anthropic_body is not None:
            body = dict(request.anthropic_body, model=model)
        else:
            body = to_anthropic(request.body, model, self._max_tokens, self._auto_cache)
        headers = self._headers
        if request.anthropic_beta:  # beta features the client's body relies on
            headers = [*headers, ("anthropic-beta", request.anthropic_beta)]
        return WireRequest("POST", self._url, headers, orjson.dumps(body))

    def stream_parser(self, max_event_bytes: int, request: ChatRequest | None = None
                      ) -> "AnthropicStreamParser":
        raw = request is not None and request.anthropic_body is not None
        return AnthropicStreamParser(self.name, max_event_bytes, raw=raw)

    def parse_completion(self, body: bytes, request: ChatRequest | None = None) -> dict[str, Any]:
        message = json_answer(self.name, body, "content", list, "a message without content")
        completion = to_completion(message)
        if request is not None and request.anthropic_body is not None:
            completion[ANTHROPIC_MESSAGE] = message
        return completion

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
        type_, message = None, None
        try:
            err = orjson.loads(body).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            err = None
        if isinstance(err, dict):
            type_ = err.get("type") if isinstance(err.get("type"), str) else None
            message = err.get("message") if isinstance(err.get("message"), str) else None
        return error_for(self.name, status, type_, message, headers.get("retry-after"))

    def embeddings_request(self, body: dict[str, Any], model: str) -> WireRequest:
        from proxy.core.errors import InvalidRequest

        raise InvalidRequest(f"provider {self.name} (anthropic) serves no embeddings", param="model")

    def parse_embeddings(self, body: bytes) -> dict[str, Any]:  # pragma: no cover - never requested
        raise UpstreamError(f"provider {self.name} (anthropic) serves no embeddings")


def error_for(provider: str, status: int, type_: str | None, message: str | None,
              retry_after: str | None = None) -> GatewayError:
    text = f"provider {provider}: {message}" if message else f"provider {provider} returned HTTP {status}"
    if status == 429:
        return UpstreamRateLimited(text, retry_after=retry_after, type="rate_limit_error",
                                   code="rate_limit_exceeded")
    if status >= 500:
        code = "overloaded" if type_ == "overloaded_error" else "upstream_error"
        return UpstreamStatusError(text, status=status, type="api_error", code=code)
    code = "invalid_api_key" if status == 401 else type_
    return UpstreamStatusError(text, status=status, type="invalid_request_error", code=code)


# -- request: canonical -> Anthropic --

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media_type, _, data = url[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                blocks.append(_image(url))
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except (orjson.JSONDecodeError, TypeError):
        return {}  # Anthropic wants an object; an unparsable history entry cannot be sent as one
    return value if isinstance(value, dict) else {}


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    if parallel is False:
        out = dict(out or {"type": "auto"}, disable_parallel_tool_use=True)
    return out


def to_anthropic(body: dict[str, Any], model: str, default_max_tokens: int,
                 auto_cache: bool = False) -> dict[str, Any]:
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in body["messages"]:
        role = m.get("role")
        if role in ("system", "developer"):
            text = _text_of(m.get("content"))
            if text:
                system.append({"type": "text", "text": text})
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": _arguments(fn.get("arguments"))})
            add("assistant", blocks)
        elif role in ("tool", "function"):
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id") or m.get("name"),
                          "content": _text_of(m.get("content"))}])
        else:
            add("user", _blocks(m.get("content")))

    out: dict[str, Any] = {"model": model, "messages": messages,
                           "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
                           or default_max_tokens}
    if system:
        if auto_cache:
            system[-1]["cache_control"] = EPHEMERAL
        out["system"] = system
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    tools = [t["function"] for t in body.get("tools") or () if isinstance(t, dict)
             and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)]
    if tools:
        out["tools"] = [{"name": f.get("name"), **({"description": f["description"]} if f.get("description") else {}),
                         "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
                        for f in tools]
        if auto_cache:
            out["tools"][-1]["cache_control"] = EPHEMERAL
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and (tools or choice["type"] == "none"):
        out["tool_choice"] = choice
    if body.get("stream"):
        out["stream"] = True
    return out


# -- responses: Anthropic -> canonical --

def usage_of(u: Any) -> tuple[int, int, int, int]:
    """(uncached input, output, cache read, cache write) from an Anthropic usage object."""
    if not isinstance(u, dict):
        return 0, 0, 0, 0
    return (u.get("input_tokens") or 0, u.get("output_tokens") or 0,
            u.get("cache_read_input_tokens") or 0, u.get("cache_creation_input_tokens") or 0)


def canonical_usage(input_: int, output: int, read: int, write: int) -> dict[str, Any]:
    return usage(input_ + read + write, output, read, write)


def to_completion(message: dict[str, Any]) -> dict[str, Any]:
    text, calls = [], []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input", {})).decode()}})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        reply["tool_calls"] = calls
    return {"id": message.get("id"), "object": "chat.completion", "created": int(time.time()),
            "model": message.get("model"),
            "choices": [{"index": 0, "message": reply,
                         "finish_reason": FINISH_REASONS.get(message.get("stop_reason"), "stop")}],
            "usage": canonical_usage(*usage_of(message.get("usage")))}


class AnthropicStreamParser:
    """Anthropic SSE -> canonical chunks, or the events as they came on the passthrough path."""

    def __init__(self, provider: str, max_event_bytes: int, *, raw: bool = False):
        self._provider = provider
        self._sse = SSEDecoder(max_event_bytes)
        self._raw = raw
        self._id = ""
        self._model = ""
        self._created = int(time.time())
        self._usage = [0, 0, 0, 0]  # input, output, cache read, cache write
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._finish: str | None = None
        self._stopped = False
        self.failed: GatewayError | None = None

    def feed(self, data: bytes) -> list[Chunk]:
        try:
            return self._chunks(self._sse.feed(data))
        except SSEError as e:
            self.failed = UpstreamError(f"provider {self._provider}: {e}")
            return []

    def close(self) -> list[Chunk]:
        try:
            chunks = self._chunks(self._sse.close())
        except SSEError as e:
            self.failed = UpstreamError(f"provider {self._provider}: {e}")
            return []
        if self.failed is None and not self._stopped:
            self.failed = UpstreamError(f"provider {self._provider} ended the stream before it was complete")
        return chunks

    def _chunks(self, events: list) -> list[Chunk]:
        chunks: list[Chunk] = []
        for event in events:
            if self._stopped or self.failed is not None:
                break
            try:
                data = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                self.failed = UpstreamError(f"provider {self._provider} sent an event that is not JSON")
                break
            if not isinstance(data, dict):
                self.failed = UpstreamError(f"provider {self._provider} sent an event that is not an object")
                break
            kind = data.get("type") or event.event
            if kind == "error":
                err = data.get("error") if isinstance(data.get("error"), dict) else {}
                type_ = err.get("type") if isinstance(err.get("type"), str) else "api_error"
                self.failed = error_for(self._provider, ERROR_STATUS.get(type_, 500), type_,
                                        err.get("message") or "stream error")
                break
            changed = self._read_usage(kind, data)
            if self._raw:
                chunks.append(Chunk(event.data, usage=self.usage() if changed else None, event=kind))
                self._stopped = kind == "message_stop"
                continue
            chunks.extend(self._translate(kind, data))
        return chunks

    def usage(self) -> dict[str, Any]:
        return canonical_usage(*self._usage)

    def _read_usage(self, kind: str, data: dict[str, Any]) -> bool:
        if kind == "message_start" and isinstance(data.get("message"), dict):
            message = data["message"]
            self._id = message.get("id") or self._id
            self._model = message.get("model") or self._model
            u = message.get("usage")
        elif kind == "message_delta":
            u = data.get("usage")
        else:
            return False
        if not isinstance(u, dict):
            return False
        # message_delta usage is cumulative and may repeat input counts: take what is present
        for i, key in enumerate(("input_tokens", "output_tokens", "cache_read_input_tokens",
                                 "cache_creation_input_tokens")):
            if isinstance(u.get(key), int):
                self._usage[i] = u[key]
        return True

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None,
               usage_: dict[str, Any] | None = None) -> Chunk:
        return canonical_chunk(self._id, self._created, self._model, delta, finish, usage_)

    def _translate(self, kind: str, data: dict[str, Any]) -> list[Chunk]:
        if kind == "message_start":
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools[data.get("index")] = len(self._tools)
                return [self._chunk({"tool_calls": [{"index": index, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta" and data.get("index") in self._tools:
                return [self._chunk({"tool_calls": [{"index": self._tools[data["index"]],
                                                     "function": {"arguments": delta.get("partial_json", "")}}]})]
            return []  # thinking / signature deltas: no canonical form
        if kind == "message_delta":
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                self._finish = FINISH_REASONS.get(reason, "stop")
                return [self._chunk({}, self._finish)]
            return []
        if kind == "message_stop":
            self._stopped = True
            return [self._chunk(None, usage_=self.usage())]
        return []  # ping, content_block_stop, unknown future events
