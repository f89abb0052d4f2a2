"""The two wire dialects the load generator speaks: paths, headers and what an SSE event means
(request bodies: `loadtest.prompts.body`).

Rules:
- Classification runs on the raw event bytes the moment they arrive, before any JSON parsing, so
  the first-token timestamp is the receive time, not "receive time + parse time". It is a cheap
  substring test that must never count a role-only chunk (OpenAI sends `"content":""` with the
  role) or a usage-only chunk as a token.
- One content event counts as one output token. Providers send about one token per event; the
  count is what the client saw, the same for every target, which is what a comparison needs.
"""

from __future__ import annotations

import enum

import orjson

OPENAI, ANTHROPIC = "openai", "anthropic"


class Kind(enum.Enum):
    TOKEN = 1  # carries output text
    DONE = 2  # the stream's clean end
    ERROR = 3  # an error event from the server
    OTHER = 4  # role-only, usage, pings, block starts...


def request_path(api: str) -> bytes:
    return b"/messages" if api == ANTHROPIC else b"/chat/completions"


def request_headers(api: str, api_key: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream, application/json")]
    if api_key:
        if api == ANTHROPIC:
            headers += [(b"x-api-key", api_key.encode()), (b"anthropic-version", b"2023-06-01")]
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    return headers


def classify(api: str, data: bytes) -> Kind:
    if api == ANTHROPIC:
        return _classify_anthropic(data)
    return _classify_openai(data)


def _nonempty_after(data: bytes, key: bytes) -> bool:
    """True if some `key` (e.g. b'"content":') is followed by a non-empty JSON string."""
    start = 0
    while (i := data.find(key, start)) >= 0:
        j = i + len(key)
        while j < len(data) and data[j] in b" \t":
            j += 1
        if data[j:j + 1] == b'"' and data[j + 1:j + 2] != b'"':
            return True
        start = j
    return False


def _classify_openai(data: bytes) -> Kind:
    if data == b"[DONE]":
        return Kind.DONE
    if _nonempty_after(data, b'"content":'):
        return Kind.TOKEN
    if data.startswith(b'{"error"'):
        return Kind.ERROR
    return Kind.OTHER


def _classify_anthropic(data: bytes) -> Kind:
    if b'"content_block_delta"' in data and (_nonempty_after(data, b'"text":')
                                            or _nonempty_after(data, b'"partial_json":')):
        return Kind.TOKEN
    if b'"message_stop"' in data:
        return Kind.DONE
    if b'"type":"error"' in data or b'"type": "error"' in data:
        return Kind.ERROR
    return Kind.OTHER


def completion_tokens(api: str, body: bytes) -> int:
    """Output tokens of a non-streaming response: the usage the server reports, else 0."""
    try:
        usage = orjson.loads(body).get("usage") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    value = usage.get("output_tokens" if api == ANTHROPIC else "completion_tokens")
    return value if isinstance(value, int) else 0

