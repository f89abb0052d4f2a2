"""What a stream relayed, for billing a stream that ended before the provider's usage arrived.

A tap (proxy/server/exchange.py) keeps the relayed chunks until they hold MAX_KEPT_BYTES of JSON,
then only looks at the size (one comparison per upstream read). At the end, only when the usage is
missing, the kept chunks' text (content, reasoning, refusals, tool-call names and arguments, in
either canonical or Anthropic passthrough form) is counted with tiktoken; chunks relayed past the
bound are counted at the kept ones' measured tokens per chunk. So a short cut stream is billed
exactly, a long one at a calibrated estimate, and a stream costs at most MAX_KEPT_BYTES (plus the
Chunk objects) of memory while it runs.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from proxy.core.events import Chunk

MAX_KEPT_BYTES = 16 * 1024  # per stream: ~80 OpenAI chunks (~80 tokens) counted exactly


class RelayedText:
    __slots__ = ("kept", "size")

    def __init__(self) -> None:
        self.kept: list[Chunk] = []
        self.size = 0

    def __call__(self, chunks: list[Chunk]) -> None:
        if self.size < MAX_KEPT_BYTES:
            self.kept.extend(chunks)
            self.size += sum(len(c.data) for c in chunks)

    def tokens(self, count, relayed_chunks: int) -> int:
        """Completion tokens relayed: `count(text) -> int` over the kept chunks, extrapolated over
        `relayed_chunks` (every chunk the client got, Usage.streamed_chunks)."""
        parts: list[str] = []
        with_text = 0
        for chunk in self.kept:
            before = len(parts)
            try:
                _text_of(orjson.loads(chunk.data), parts)
            except (orjson.JSONDecodeError, TypeError, AttributeError):
                continue
            with_text += len(parts) > before
        tokens = count("".join(parts))
        beyond = relayed_chunks - len(self.kept)
        if beyond > 0 and with_text:
            tokens += math.ceil(tokens / with_text * beyond)
        return tokens


def _text_of(data: Any, out: list[str]) -> None:
    kind = data.get("type")
    if kind == "content_block_delta":  # Anthropic passthrough
        delta = data.get("delta") or {}
        for key in ("text", "partial_json", "thinking"):
            if isinstance(delta.get(key), str):
                out.append(delta[key])
        return
    if kind == "content_block_start":
        block = data.get("content_block") or {}
        if block.get("type") == "tool_use" and isinstance(block.get("name"), str):
            out.append(block["name"])
        return
    for choice in data.get("choices") or ():
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning", "refusal"):
            if isinstance(delta.get(key), str):
                out.append(delta[key])
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            for key in ("name", "arguments"):
                if isinstance(fn.get(key), str):
                    out.append(fn[key])
