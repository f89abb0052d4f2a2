"""Token truth: output and input tokens counted with a tokenizer, and the server's usage checked.

Rules:
- `--tokenizer o200k_base|cl100k_base` counts with tiktoken, offline (`proxy.core.encodings`:
  the BPE files ship in a package); `events` counts one token per content event, as before. The
  default follows the model name: cl100k_base for gpt-4 / gpt-3.5 / text-embedding-*, o200k_base
  for everything else (gpt-4o, o-series, gpt-5; for other vendors' models it is an approximation).
- Counting stays off the timing path: the client only keeps each content event's bytes (a list
  append); the text is decoded once per request, after its last byte arrived, and encoded once.
  Measured with `python -m loadtest.tokens` (see bench.md, "loadtest v2").
- Usage: the last `usage` object a response carries (OpenAI's `stream_options.include_usage`
  chunk, Anthropic's message_delta, or a plain answer's body). A response's usage disagrees when
  it is off the count by more than `MISMATCH` (2 %) of the count.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .apis import ANTHROPIC

EVENTS = "events"
TOKENIZERS = ("o200k_base", "cl100k_base", EVENTS)
MISMATCH = 0.02
_CL100K_MODELS = ("gpt-4-", "gpt-4", "gpt-3.5", "text-embedding-", "davinci", "babbage")
_O200K_MODELS = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")


def default_tokenizer(model: str) -> str:
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" -> "gpt-4o"
    if name.startswith(_O200K_MODELS):
        return "o200k_base"
    if name.startswith(_CL100K_MODELS):
        return "cl100k_base"
    return "o200k_base"


class TokenCounter:
    """One per run; `encoding` is loaded once (about a second for o200k_base) and cached."""

    def __init__(self, name: str) -> None:
        if name not in TOKENIZERS:
            raise ValueError(f"tokenizer = {name!r}: expected one of {', '.join(TOKENIZERS)}")
        self.name = name
        self.counts_text = name != EVENTS
        self._encode = None
        if self.counts_text:
            from proxy.core.encodings import encoding
            self._encode = encoding(name).encode_ordinary

    def text(self, text: str) -> int:
        """Tokens of `text` (0 with the `events` tokenizer: there is no text to count)."""
        return len(self._encode(text)) if self._encode is not None and text else 0

    def messages(self, messages: list[dict[str, Any]]) -> int:
        """Input tokens of a chat: the content of every message (no per-message framing)."""
        return sum(self.text(content_text(m.get("content"))) for m in messages)

    def stream(self, api: str, kept: list[bytes], events: int) -> tuple[int, int | None]:
        """(output tokens, the server's output usage or None) of a stream's kept events."""
        text: list[str] = []
        usage = None
        for data in kept:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            piece, reported = (_anthropic_event(obj) if api == ANTHROPIC else _openai_chunk(obj))
            if piece:
                text.append(piece)
            if reported is not None:
                usage = reported
        count = self.text("".join(text)) if self.counts_text else events
        return count, usage

    def body(self, api: str, body: bytes) -> tuple[int, int | None]:
        """(output tokens, the server's output usage or None) of a plain (non-streaming) answer."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 0, None
        if not isinstance(obj, dict):
            return 0, None
        usage = _usage(obj.get("usage"), api)
        if api == ANTHROPIC:
            text = "".join(b.get("text") or "" for b in obj.get("content") or () if isinstance(b, dict))
        else:
            choices = obj.get("choices") or [{}]
            text = content_text(((choices[0] or {}).get("message") or {}).get("content"))
        if self.counts_text:
            return self.text(text), usage
        return (usage if usage is not None else 0), usage  # no text count: the server's word


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def _usage(usage: Any, api: str) -> int | None:
    if not isinstance(usage, dict):
        return None
    value = usage.get("output_tokens" if api == ANTHROPIC else "completion_tokens")
    return value if isinstance(value, int) else None


def _openai_chunk(obj: dict) -> tuple[str, int | None]:
    piece = ""
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            piece += delta["content"]
    return piece, _usage(obj.get("usage"), "openai")


def _anthropic_event(obj: dict) -> tuple[str, int | None]:
    kind = obj.get("type")
    if kind == "content_block_delta":
        delta = obj.get("delta") or {}
        return (delta.get("text") or delta.get("partial_json") or ""), None
    if kind == "message_delta":
        return "", _usage(obj.get("usage"), ANTHROPIC)
    return "", None


def disagrees(counted: int, reported: int) -> bool:
    return abs(reported - counted) > MISMATCH * counted if counted > 0 else reported != 0


def cost_per_token(encoding_name: str = "o200k_base", tokens: int = 50, rounds: int = 2000) -> float:
    """µs per output token of the end-of-request count (decode every kept event, encode once)."""
    counter = TokenCounter(encoding_name)
    words = (" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
    kept = [b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
            b'"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}' % orjson.dumps(w)
            for w in (words * (tokens // len(words) + 1))[:tokens]]
    started = time.process_time()
    for _ in range(rounds):
        counter.stream("openai", kept, tokens)
    return (time.process_time() - started) * 1e6 / (rounds * tokens)


if __name__ == "__main__":
    for name in ("o200k_base", "cl100k_base"):
        print(f"{name}: {cost_per_token(name):.2f} µs of CPU per output token counted (50-token responses)")
