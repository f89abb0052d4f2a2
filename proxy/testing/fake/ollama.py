"""The Ollama wire format of the fake: POST /api/chat (JSON and NDJSON) and POST /api/embed.

Offers the response writer (`exchange.py`) `completion_body`, `stream_script`, `error_body` and
`error_event`, like every format module.

Rules:
- Pure: dicts and bytes from a planned `Chat`; no I/O.
- Streams unless the request says "stream": false (decided in `settings.plan_chat`); a stream is
  one JSON object per line, the last with "done": true and the counts; tool calls carry their
  arguments as an object, in one line; errors are {"error": message}, mid-stream too.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.testing.fake.content import completion_text, embedding_vectors, token_words, tool_input
from proxy.testing.fake.settings import Chat

STREAM_CONTENT_TYPE = b"application/x-ndjson"
_CREATED_AT = "2024-01-01T00:00:00Z"
_STOP = {"stop": "stop", "length": "length", "tool_calls": "stop"}


def usage(chat: Chat) -> dict[str, Any]:
    return {"prompt_eval_count": chat.prompt_tokens, "eval_count": chat.tokens}


def _tool_calls(chat: Chat) -> list[dict[str, Any]]:
    return [{"function": {"name": n, "arguments": tool_input(a)}} for n, a in chat.tool_calls]


def completion_body(chat: Chat, rid: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant",
                               "content": completion_text(chat.tokens, chat.settings.token_bytes)}
    if chat.tool_calls:
        message["tool_calls"] = _tool_calls(chat)
    return {"model": chat.model, "created_at": _CREATED_AT, "message": message, "done": True,
            "done_reason": _STOP[chat.finish_reason], **usage(chat)}


def stream_script(chat: Chat, rid: int) -> list[tuple[bytes, bool]]:
    """A whole stream as (payload, is_token) lines; tokens are paced, faults count them."""
    def line(message: dict[str, Any], **extra: Any) -> bytes:
        return orjson.dumps({"model": chat.model, "created_at": _CREATED_AT,
                             "message": dict(role="assistant", **message), "done": False, **extra}) + b"\n"
    out = [(line({"content": w}), True) for w in token_words(chat.tokens, chat.settings.token_bytes)]
    if chat.tool_calls:
        out.append((line({"content": "", "tool_calls": _tool_calls(chat)}), True))
    out.append((line({"content": ""}, done=True, done_reason=_STOP[chat.finish_reason],
                     **usage(chat)).replace(b'"done":false,', b""), False))
    return out


def error_body(status: int, message: str, echo: str | None = None) -> dict[str, Any]:
    return {"error": f"{message}: {echo}" if echo else message}


def error_event(status: int | None = None, echo: str | None = None) -> bytes:
    return orjson.dumps(error_body(status or 500, "fake provider error mid-stream", echo)) + b"\n"


def embeddings_body(chat: Chat) -> dict[str, Any]:
    vectors = embedding_vectors(chat.embed_inputs, chat.embed_dims)
    return {"model": chat.model, "embeddings": vectors, "prompt_eval_count": chat.prompt_tokens}
