"""The Anthropic wire format of the fake: POST /v1/messages (JSON, and SSE with named events).

Offers the response writer (`exchange.py`) `completion_body`, `stream_script`, `error_body` and
`error_event`, like every format module.

Rules:
- Pure: dicts and bytes from a planned `Chat`; no I/O.
- Text, then one content block per tool call (tool_use, arguments streamed as input_json_delta in
  three fragments); usage reports cache reads and writes in their own fields, apart from
  input_tokens; a mid-stream fault is an `event: error` (overloaded_error).
"""

from __future__ import annotations

from typing import Any

from proxy.testing.fake.content import completion_text, fragments, sse, token_words, tool_input
from proxy.testing.fake.settings import Chat

STREAM_CONTENT_TYPE = b"text/event-stream"
_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
           404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
           500: "api_error", 529: "overloaded_error"}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def usage(chat: Chat) -> dict[str, Any]:
    return {"input_tokens": chat.prompt_tokens, "output_tokens": chat.tokens,
            "cache_read_input_tokens": chat.settings.cached_tokens,
            "cache_creation_input_tokens": chat.settings.cache_write_tokens}


def completion_body(chat: Chat, rid: int) -> dict[str, Any]:
    text = completion_text(chat.tokens, chat.settings.token_bytes)
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for i, (name, args) in enumerate(chat.tool_calls):
        value = tool_input(args)
        content.append({"type": "tool_use", "id": f"toolu_fake_{rid}_{i}", "name": name,
                        "input": value if isinstance(value, dict) else {}})
    return {"id": f"msg_fake_{rid}", "type": "message", "role": "assistant", "model": chat.model,
            "content": content, "stop_reason": _STOP[chat.finish_reason],
            "stop_sequence": None, "usage": usage(chat)}


def _event(data: dict[str, Any]) -> bytes:
    return sse(data, data["type"])  # Anthropic names every event after its type


def stream_script(chat: Chat, rid: int) -> list[tuple[bytes, bool]]:
    """A whole stream as (payload, is_token) events; tokens are paced, faults count them."""
    words = token_words(chat.tokens, chat.settings.token_bytes)
    start = {"id": f"msg_fake_{rid}", "type": "message", "role": "assistant", "model": chat.model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": dict(usage(chat), output_tokens=1)}
    out = [(_event({"type": "message_start", "message": start}), False),
           (_event({"type": "ping"}), False)]
    index = 0
    if words:
        out.append((_event({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}), False))
        out += [(_event({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": w}}), True) for w in words]
        out.append((_event({"type": "content_block_stop", "index": 0}), False))
        index = 1
    for i, (name, args) in enumerate(chat.tool_calls):
        block = {"type": "tool_use", "id": f"toolu_fake_{rid}_{i}", "name": name, "input": {}}
        out.append((_event({"type": "content_block_start", "index": index + i, "content_block": block}),
                    False))
        out += [(_event({"type": "content_block_delta", "index": index + i,
                         "delta": {"type": "input_json_delta", "partial_json": f}}), True)
                for f in fragments(args)]
        out.append((_event({"type": "content_block_stop", "index": index + i}), False))
    out.append((_event({"type": "message_delta",
                        "delta": {"stop_reason": _STOP[chat.finish_reason], "stop_sequence": None},
                        "usage": {"output_tokens": chat.tokens}}), False))
    out.append((_event({"type": "message_stop"}), False))
    return out


def error_body(status: int, message: str, echo: str | None = None) -> dict[str, Any]:
    kind = _ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if echo:
        return {"type": "error", "error": {"type": echo, "message": f"{message}: {echo}"}}
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_event(status: int | None = None, echo: str | None = None) -> bytes:
    body = error_body(status or 529, "fake provider error mid-stream", echo) if status or echo else \
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return sse(body, "error")
