"""The canonical chat request: an OpenAI Chat Completions body, checked once at the edge.

The gateway's canonical shape *is* the OpenAI wire shape (the most widely spoken one); adapters
translate from it. Validation here is structural — what the gateway itself relies on — and leaves
provider-specific fields alone so new OpenAI parameters pass through without a release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk (stream_options.include_usage)
    body: dict[str, Any]  # the whole validated body, forwarded with the model replaced
    # The client's original Anthropic Messages body (/v1/messages): an Anthropic deployment sends
    # it as-is instead of translating `body` back (see proxy/formats/anthropic.py).
    anthropic_body: dict[str, Any] | None = None
    anthropic_beta: str | None = None  # the client's anthropic-beta header, for Anthropic deployments


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def load_request_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object with a non-empty string `model` (every endpoint's start)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    _check(isinstance(body, dict), "request body must be a JSON object", "body")
    model = body.get("model")
    _check(isinstance(model, str) and model != "", "'model' must be a non-empty string", "model")
    return body


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = load_request_object(raw)
    model = body["model"]
    messages = body.get("messages")
    _check(isinstance(messages, list) and len(messages) > 0,
           "'messages' must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        _check(isinstance(m, dict), f"messages[{i}] must be an object", f"messages[{i}]")
        _check(m.get("role") in ROLES, f"messages[{i}].role must be one of {sorted(ROLES)}",
               f"messages[{i}].role")
        content = m.get("content")
        _check(content is None or isinstance(content, (str, list)),
               f"messages[{i}].content must be a string, an array of parts or null",
               f"messages[{i}].content")
    stream = body.get("stream", False)
    _check(isinstance(stream, bool), "'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    _check(options is None or isinstance(options, dict), "'stream_options' must be an object",
           "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    _check(not (options and not stream), "'stream_options' is only allowed with 'stream': true",
           "stream_options")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(key)
        _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
               f"'{key}' must be a positive integer", key)
    return ChatRequest(model=model, stream=stream, include_usage=include_usage, body=body)


def parse_embeddings_request(raw: bytes) -> dict[str, Any]:
    """An OpenAI embeddings body: `input` as a string, strings or token arrays."""
    body = load_request_object(raw)
    value = body.get("input")
    ok = isinstance(value, str) and value != "" or isinstance(value, list) and len(value) > 0 and (
        all(isinstance(v, str) and v for v in value) or all(isinstance(v, int) for v in value)
        or all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value))
    _check(ok, "'input' must be a non-empty string, array of strings, or array of token arrays", "input")
    fmt = body.get("encoding_format")
    _check(fmt in (None, "float", "base64"), "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dims = body.get("dimensions")
    _check(dims is None or isinstance(dims, int) and not isinstance(dims, bool) and dims >= 1,
           "'dimensions' must be a positive integer", "dimensions")
    return body
