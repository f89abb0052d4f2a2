"""The canonical chat request: an OpenAI Chat Completions body, checked once at the edge.

The gateway's canonical shape *is* the OpenAI wire shape (the most widely spoken one); adapters
translate from it. Every documented field is checked against the published shape
(`proxy/core/validate.py`: types and ranges, a 400 naming the field); fields we do not know pass
through so new OpenAI parameters need no release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core import validate
from proxy.core.errors import InvalidRequest, clip

ROLES = validate.ROLE_SET


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
        raise InvalidRequest(f"request body is not valid JSON: {clip(e, 100)}") from None
    _check(isinstance(body, dict), "request body must be a JSON object", "body")
    validate.check_model(body)
    return body


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = load_request_object(raw)
    validate.check_chat(body)
    stream = body.get("stream") is True
    options = body.get("stream_options")
    _check(not (options and not stream), "'stream_options' is only allowed with 'stream': true",
           "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return ChatRequest(model=body["model"], stream=stream, include_usage=include_usage, body=body)


def parse_embeddings_request(raw: bytes) -> dict[str, Any]:
    """An OpenAI embeddings body: `input` as a string, strings or token arrays."""
    body = load_request_object(raw)
    validate.check_embeddings(body)
    return body
