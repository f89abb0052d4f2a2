"""The Anthropic Messages format on the client side: request -> canonical, canonical -> response.

Sans-IO, used by the chat endpoint on POST /v1/messages (`proxy/server/endpoints.py`):
- `parse_messages_request`: validates an Anthropic Messages body (400 with `param` naming the
  field) and translates it to the canonical OpenAI-shaped body; the original is kept on the
  `ChatRequest` (`anthropic_body`) so an Anthropic deployment receives it untouched.
- `to_message`: a canonical completion -> an Anthropic `message`.
- `StreamEncoder`: canonical chunks -> Anthropic SSE events (message_start, content_block_start/
  delta/stop with text_delta and input_json_delta, message_delta with the stop reason and usage,
  message_stop). OpenAI tool_calls deltas are keyed by tool index; each tool gets its own
  content block, opened when its first fragment arrives, and fragments are relayed in order.
  Provider events passed through (`Chunk.event` set) are written verbatim.
- `error_event`: a failure after the first byte, as Anthropic's `event: error`.

Translation rules: `system` -> a system message; `tool_result` blocks -> `tool` messages (placed
before the rest of that user turn, as OpenAI wants results right after the assistant's calls);
`tool_use` -> assistant `tool_calls`; images -> `image_url` parts (base64 as data: URLs);
thinking blocks have no OpenAI form and are dropped for non-Anthropic deployments;
`stop_sequences` -> `stop`, `metadata.user_id` -> `user`; `tool_choice` any -> required,
tool -> function, `disable_parallel_tool_use` -> `parallel_tool_calls: false`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.core import validate
from proxy.core.request import ChatRequest, load_request_object
from proxy.core.errors import GatewayError, InvalidRequest
from proxy.core.usage import Usage
from proxy.core.events import Chunk
from proxy.formats import ANTHROPIC_MESSAGE
from proxy.core.sse import encode_event

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}
BLOCK_TYPES = frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking",
                         "document"})


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    _check(isinstance(content, list), f"'{param}' must be a string or an array of text blocks", param)
    parts = []
    for i, block in enumerate(content):
        _check(isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str),
               f"{param}[{i}] must be a text block", f"{param}[{i}]")
        parts.append(block["text"])
    return "\n\n".join(parts) if param == "system" else "".join(parts)


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = block.get("source")
    _check(isinstance(source, dict), f"{param}.source must be an object", f"{param}.source")
    if source.get("type") == "base64":
        _check(isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str),
               f"{param}.source needs media_type and data", f"{param}.source")
        url = f"data:{source['media_type']};base64,{source['data']}"
    else:
        _check(source.get("type") == "url" and isinstance(source.get("url"), str),
               f"{param}.source.type must be 'base64' or 'url'", f"{param}.source.type")
        url = source["url"]
    return {"type": "image_url", "image_url": {"url": url}}


def _message(i: int, m: Any) -> list[dict[str, Any]]:
    """One Anthropic message -> one or more canonical messages."""
    param = f"messages[{i}]"
    _check(isinstance(m, dict), f"{param} must be an object", param)
    role = m.get("role")
    _check(role in ("user", "assistant"), f"{param}.role must be 'user' or 'assistant'", f"{param}.role")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    _check(isinstance(content, list), f"{param}.content must be a string or an array of content blocks",
           f"{param}.content")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{param}.content[{j}]"
        _check(isinstance(block, dict) and isinstance(block.get("type"), str) and block["type"] in BLOCK_TYPES,
               f"{where}.type must be one of {sorted(BLOCK_TYPES)}", f"{where}.type")
        kind = block["type"]
        if kind == "text":
            _check(isinstance(block.get("text"), str), f"{where}.text must be a string", f"{where}.text")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "document":
            source = block.get("source")
            _check(isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str),
                   f"{where}: only text documents can be sent to a non-Anthropic model", f"{where}.source")
            parts.append({"type": "text", "text": source["data"]})
        elif kind == "tool_use":
            _check(role == "assistant", f"{where}: tool_use blocks belong to assistant turns", where)
            _check(isinstance(block.get("id"), str) and isinstance(block.get("name"), str),
                   f"{where} needs an id and a name", where)
            _check(isinstance(block.get("input", {}), dict), f"{where}.input must be an object", f"{where}.input")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": orjson.dumps(block.get("input", {})).decode()}})
        elif kind == "tool_result":
            _check(role == "user", f"{where}: tool_result blocks belong to user turns", where)
            _check(isinstance(block.get("tool_use_id"), str), f"{where}.tool_use_id must be a string",
                   f"{where}.tool_use_id")
            raw = block.get("content", "")
            _check(isinstance(raw, (str, list)), f"{where}.content must be a string or an array of blocks",
                   f"{where}.content")
            if isinstance(raw, list):  # text blocks join; images in results have no tool-message form
                for k, b in enumerate(raw):
                    _check(isinstance(b, dict) and (b.get("type") != "text" or isinstance(b.get("text"), str)),
                           f"{where}.content[{k}] must be a content block", f"{where}.content[{k}]")
                raw = "".join(b.get("text", "") for b in raw if b.get("type") == "text")
            text = raw if isinstance(raw, str) else ""
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        # thinking / redacted_thinking: no canonical form (kept on the passthrough path)
    out = list(results)
    if role == "assistant":
        if parts or calls:
            text_only = all(p["type"] == "text" for p in parts)
            msg: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(p["text"] for p in parts) if text_only else parts}
            if calls:
                msg["tool_calls"] = calls
                msg["content"] = msg["content"] or None
            out.append(msg)
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    _check(isinstance(tools, list), "'tools' must be an array", "tools")
    out = []
    for i, tool in enumerate(tools):
        _check(isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool["name"],
               f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        schema = tool.get("input_schema")
        _check(isinstance(schema, dict), f"tools[{i}].input_schema must be an object "
               "(server tools reach Anthropic deployments only)", f"tools[{i}].input_schema")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> tuple[Any, bool]:
    """(OpenAI tool_choice, parallel allowed)."""
    _check(isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none"),
           "tool_choice.type must be one of auto, any, tool, none", "tool_choice")
    kind = choice["type"]
    disable = choice.get("disable_parallel_tool_use", False)
    _check(isinstance(disable, bool), "tool_choice.disable_parallel_tool_use must be a boolean",
           "tool_choice.disable_parallel_tool_use")
    parallel = not disable
    if kind == "tool":
        _check(isinstance(choice.get("name"), str), "tool_choice.name must be a string", "tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def parse_messages_request(raw: bytes, anthropic_beta: str | None = None) -> ChatRequest:
    body = load_request_object(raw)
    validate.check_messages(body)
    model = body["model"]
    _check(_positive_int(body.get("max_tokens")), "'max_tokens' must be a positive integer", "max_tokens")
    messages = body.get("messages")
    _check(isinstance(messages, list) and len(messages) > 0, "'messages' must be a non-empty array", "messages")
    stream = body.get("stream") is True

    canonical: list[dict[str, Any]] = []
    if body.get("system") is not None:
        canonical.append({"role": "system", "content": _text(body["system"], "system")})
    for i, m in enumerate(messages):
        canonical.extend(_message(i, m))
    out: dict[str, Any] = {"model": model, "messages": canonical, "max_tokens": body["max_tokens"],
                           "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}  # message_delta reports usage
    stops = body.get("stop_sequences")
    if stops is not None:
        _check(isinstance(stops, list) and all(isinstance(s, str) for s in stops),
               "'stop_sequences' must be an array of strings", "stop_sequences")
        if stops:
            out["stop"] = stops
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            _check(isinstance(value, (int, float)) and not isinstance(value, bool),
                   f"'{key}' must be a number", key)
            out[key] = value
    metadata = body.get("metadata")
    if metadata is not None:
        _check(isinstance(metadata, dict), "'metadata' must be an object", "metadata")
        if isinstance(metadata.get("user_id"), str):
            out["user"] = metadata["user_id"]
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        choice, parallel = _tool_choice(body["tool_choice"])
        out["tool_choice"] = choice
        if not parallel:
            out["parallel_tool_calls"] = False
    return ChatRequest(model=model, stream=stream, include_usage=stream, body=out, anthropic_body=body,
                       anthropic_beta=anthropic_beta)


# -- responses --

def anthropic_usage(u: Any) -> dict[str, int]:
    """Canonical usage -> Anthropic's fields (input_tokens excludes cache reads and writes)."""
    u = u if isinstance(u, dict) else {}
    details = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    read = details.get("cached_tokens") or 0
    write = details.get("cache_write_tokens") or 0
    return {"input_tokens": max(0, (u.get("prompt_tokens") or 0) - read - write),
            "output_tokens": u.get("completion_tokens") or 0,
            "cache_read_input_tokens": read, "cache_creation_input_tokens": write}


def _tool_input(arguments: Any) -> Any:
    try:
        value = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def to_message(completion: dict[str, Any], model: str) -> dict[str, Any]:
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = reply.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in reply.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                        "input": _tool_input(fn.get("arguments"))})
    return {"id": _message_id(completion.get("id")), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": STOP_REASONS.get(choice.get("finish_reason"), "end_turn"),
            "stop_sequence": None, "usage": anthropic_usage(completion.get("usage"))}


def _message_id(upstream: Any) -> str:
    return f"msg_{upstream}" if isinstance(upstream, str) and upstream else f"msg_gw{time.time_ns():x}"


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return encode_event(orjson.dumps(data), kind)


def error_event(error: GatewayError) -> bytes:
    """The last event of a failed /v1/messages stream (the relay's `error_event`)."""
    return _event("error", error.to_anthropic_body())


class MessagesAPI:
    """What the generic chat endpoint (`proxy/server/endpoints.py`) needs of a client format:
    Anthropic's request, stream, answer and error shapes, and its `x-api-key` header."""

    name = "messages"
    api_key_header: bytes | None = b"x-api-key"  # the anthropic SDK's way; Bearer works too

    def parse(self, body: bytes, headers: dict[bytes, bytes]) -> ChatRequest:
        beta = headers.get(b"anthropic-beta")
        return parse_messages_request(body, beta.decode("latin-1") if beta is not None else None)

    def stream_encoder(self, request: ChatRequest, usage: Usage) -> "StreamEncoder":
        return StreamEncoder(request.model, usage)

    def completion(self, completion: dict[str, Any], request: ChatRequest) -> dict[str, Any]:
        message = completion.get(ANTHROPIC_MESSAGE)  # a passthrough answer, as the provider wrote it
        return message if message is not None else to_message(completion, request.model)

    def error_body(self, error: GatewayError) -> dict[str, Any]:
        return error.to_anthropic_body()

    def error_event(self, error: GatewayError) -> bytes:
        return error_event(error)


class StreamEncoder:
    """Canonical chunks -> Anthropic SSE bytes, for one stream. Call `finish()` at the clean end."""

    def __init__(self, model: str, record: Usage | None = None):
        self._model = model
        self._record = record if record is not None else Usage()  # the request's usage (logs)
        self._started = False
        self._block: int | None = None  # the open content block's index
        self._blocks = 0
        self._text_block: int | None = None
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> content block index
        self._stop: str | None = None
        self._raw = False
        self.usage: dict[str, Any] = {}  # the latest canonical usage (for logs)

    def encode(self, chunks: list[Chunk]) -> bytes:
        out: list[bytes] = []
        self._record.streamed_chunks += len(chunks)
        for chunk in chunks:
            if chunk.event is not None:  # the provider's own event (passthrough)
                self._raw = True
                if chunk.usage is not None:
                    self.usage = chunk.usage
                    self._record.update(chunk.usage)
                out.append(encode_event(chunk.data, chunk.event))
                continue
            self._chunk(orjson.loads(chunk.data), out)
        return b"".join(out)

    def finish(self) -> bytes:
        if self._raw:
            return b""  # the provider's own message_stop went through already
        out: list[bytes] = []
        self._start(out, None)
        self._close_block(out)
        out.append(_event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": self._stop or "end_turn",
                                                      "stop_sequence": None},
                                            "usage": anthropic_usage(self.usage)}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def _start(self, out: list[bytes], upstream_id: Any) -> None:
        if self._started:
            return
        self._started = True
        out.append(_event("message_start", {"type": "message_start", "message": {
            "id": _message_id(upstream_id), "type": "message", "role": "assistant", "model": self._model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            # OpenAI-style providers report usage at the end: message_delta carries the real numbers
            "usage": {"input_tokens": 0, "output_tokens": 0}}}))

    def _close_block(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self._block}))
            self._block = None

    def _open(self, out: list[bytes], block: dict[str, Any]) -> int:
        self._close_block(out)
        index = self._block = self._blocks
        self._blocks += 1
        out.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": block}))
        return index

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        self._start(out, chunk.get("id"))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
            self._record.update(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # Anthropic has one answer per request
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._block is None or self._block != self._text_block:
                    self._text_block = self._open(out, {"type": "text", "text": ""})
                out.append(_event("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                          "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or ():
                self._tool(call, out)
            if choice.get("finish_reason"):
                self._stop = STOP_REASONS.get(choice["finish_reason"], "end_turn")
                self._close_block(out)

    def _tool(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index", 0)
        fn = call.get("function") or {}
        if position not in self._tools:
            self._text_block = None
            self._tools[position] = self._open(out, {
                "type": "tool_use", "id": call.get("id") or f"toolu_gw{position}",
                "name": fn.get("name") or "", "input": {}})
        fragment = fn.get("arguments")
        if fragment:
            out.append(_event("content_block_delta", {
                "type": "content_block_delta", "index": self._tools[position],
                "delta": {"type": "input_json_delta", "partial_json": fragment}}))
