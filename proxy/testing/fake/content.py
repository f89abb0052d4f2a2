"""What the fake says, whatever the wire format: deterministic words, tool-call argument
fragments, embedding vectors, and the SSE event framing two of the formats share.

Rules:
- Deterministic: the same request always yields the same text, token counts and vectors
  (no randomness, no clock).
- Pure: no I/O, no h11, no trio; the format modules and the response writer build on these.
"""

from __future__ import annotations

from typing import Any

import orjson

WORDS = (" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
WORD_JSON = tuple(orjson.dumps(w) for w in WORDS)  # pre-encoded for the OpenAI fast stream


def token_text(token_bytes: int) -> str:
    """One token of exactly `token_bytes` ASCII bytes."""
    return ("abcdefghijklmnopqrstuvwxyz" * (token_bytes // 26 + 1))[:token_bytes]


def completion_text(tokens: int, token_bytes: int) -> str:
    """The whole text of `tokens` tokens (words when token_bytes is 0)."""
    if token_bytes:
        return token_text(token_bytes) * tokens
    return "".join(WORDS) * (tokens // len(WORDS)) + "".join(WORDS[: tokens % len(WORDS)])


def token_words(tokens: int, token_bytes: int) -> list[str]:
    """The text of each of `tokens` tokens, in order: they join to `completion_text`."""
    return [(token_text(token_bytes) if token_bytes else WORDS[i % len(WORDS)])
            for i in range(tokens)]


def fragments(text: str, parts: int = 3) -> list[str]:
    """Split at awkward places (mid-token) so clients must join fragments in order."""
    size = max(1, -(-len(text) // parts))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def tool_input(arguments: str) -> Any:
    """Tool-call arguments as a JSON value, for formats that carry an object rather than text."""
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments  # kept as text: how a broken model's output looks where objects are expected


def embedding_vectors(texts: tuple[str, ...], dims: int) -> list[list[float]]:
    """One vector per text: deterministic, distinct per text, unit-ish length."""
    vectors = []
    for text in texts:
        seed = sum(text.encode()) + len(text)
        vectors.append([((seed * (i + 7)) % 97) / 97.0 for i in range(dims)])
    return vectors


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: an optional `event:` line, one `data:` line of JSON."""
    return (b"event: %s\n" % event.encode() if event else b"") + b"data: " + orjson.dumps(data) + b"\n\n"
