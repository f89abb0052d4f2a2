"""The OpenAI wire format of the fake: chat completions (JSON and SSE) and embeddings.

- `completion_body`, `stream_script`, `error_body`, `error_event`: the shapes every format module
  offers the response writer (`exchange.py`), by the same names.
- `stream_prefix`, `role_event`, `token_events`, `stream_tail`: the pre-framed bytes of the fast
  plain-text stream, the benchmark floor, where per token only a lookup and a write remain.

Rules:
- Pure: dicts and bytes from a planned `Chat`; no I/O. `created` is the only thing read from the
  clock.
- Usage counts cached tokens inside prompt_tokens (prompt_tokens_details.cached_tokens), as
  OpenAI does.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.testing.fake.content import (WORD_JSON, completion_text, embedding_vectors, fragments,
                                        sse, token_text, token_words)
from proxy.testing.fake.settings import Chat

STREAM_CONTENT_TYPE = b"text/event-stream"
_ERROR_KINDS = {  # status -> OpenAI error (type, code); other 4xx: invalid_request_error
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def usage(chat: Chat) -> dict[str, Any]:
    p, n, c = chat.prompt_tokens, chat.tokens, chat.settings.cached_tokens
    fields: dict[str, Any] = {"prompt_tokens": p + c, "completion_tokens": n, "total_tokens": p + c + n}
    if c:
        fields["prompt_tokens_details"] = {"cached_tokens": c}
    return fields


def completion_body(chat: Chat, rid: int) -> dict[str, Any]:
    text = completion_text(chat.tokens, chat.settings.token_bytes)
    reply: dict[str, Any] = {"role": "assistant", "content": text if text or not chat.tool_calls else None}
    if chat.tool_calls:
        reply["tool_calls"] = [{"id": f"call_fake_{rid}_{i}", "type": "function",
                                "function": {"name": n, "arguments": a}}
                               for i, (n, a) in enumerate(chat.tool_calls)]
    return {"id": f"chatcmpl-fake-{rid}", "object": "chat.completion", "created": int(time.time()),
            "model": chat.model, "choices": [{"index": 0, "finish_reason": chat.finish_reason,
                                              "message": reply}], "usage": usage(chat)}


def stream_script(chat: Chat, rid: int) -> list[tuple[bytes, bool]]:
    """A whole stream as (payload, is_token) events; tokens are paced, faults count them."""
    base = {"id": f"chatcmpl-fake-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": chat.model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}]))
    out = [(chunk({"role": "assistant", "content": ""}), False)]
    out += [(chunk({"content": w}), True) for w in token_words(chat.tokens, chat.settings.token_bytes)]
    for i, (name, args) in enumerate(chat.tool_calls):
        out.append((chunk({"tool_calls": [{"index": i, "id": f"call_fake_{rid}_{i}", "type": "function",
                                           "function": {"name": name, "arguments": ""}}]}), False))
        out += [(chunk({"tool_calls": [{"index": i, "function": {"arguments": f}}]}), True)
                for f in fragments(args)]
    out.append((chunk({}, chat.finish_reason), False))
    if chat.include_usage:
        out.append((sse(dict(base, choices=[], usage=usage(chat))), False))
    out.append((b"data: [DONE]\n\n", False))
    return out


def error_body(status: int, message: str, echo: str | None = None) -> dict[str, Any]:
    default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    kind, code = _ERROR_KINDS.get(status, default)
    if echo:  # every field a client library might show
        return {"error": {"message": f"{message}: {echo}", "type": echo, "param": echo, "code": echo}}
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_event(status: int | None = None, echo: str | None = None) -> bytes:
    return sse(error_body(status or 500, "fake provider error mid-stream", echo))


def embeddings_body(chat: Chat) -> dict[str, Any]:
    vectors = embedding_vectors(chat.embed_inputs, chat.embed_dims)
    return {"object": "list", "model": chat.model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": chat.prompt_tokens, "total_tokens": chat.prompt_tokens}}


# -- the fast plain-text stream: pre-framed bytes, built once per request --

def stream_prefix(chat: Chat, rid: int) -> bytes:
    """Every chunk's `data:` line up to its choices: the constant part, encoded once."""
    return b'data: {"id":"chatcmpl-fake-%d","object":"chat.completion.chunk","created":%d,' \
           b'"model":%s,"choices":' % (rid, int(time.time()), orjson.dumps(chat.model))


def role_event(prefix: bytes) -> bytes:
    return prefix + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'


def token_events(chat: Chat, prefix: bytes) -> list[bytes]:
    """One event per distinct token, in order; token i is `events[i % len(events)]`."""
    s = chat.settings
    tokens = (orjson.dumps(token_text(s.token_bytes)),) if s.token_bytes else WORD_JSON
    return [prefix + b'[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n' % t
            for t in tokens[: max(1, chat.tokens)]]


def stream_tail(chat: Chat, prefix: bytes) -> bytes:
    """The finish chunk, the usage chunk if asked for, and [DONE]."""
    finish = chat.finish_reason.encode()
    tail = prefix + b'[{"index":0,"delta":{},"finish_reason":"%s"}]}\n\n' % finish
    if chat.include_usage:
        tail += prefix + b'[],"usage":%s}\n\n' % orjson.dumps(usage(chat))
    return tail + b"data: [DONE]\n\n"
