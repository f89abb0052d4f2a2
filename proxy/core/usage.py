"""Token usage: the canonical usage object adapters produce, and the per-request record.

Canonical usage (in a chunk's or a completion's `usage`) is OpenAI's shape plus one field:

    {"prompt_tokens": P, "completion_tokens": C, "total_tokens": P + C,
     "prompt_tokens_details": {"cached_tokens": R, "cache_write_tokens": W}}

`prompt_tokens` counts every input token, read from cache (R) or written to it (W) included, as
OpenAI counts them; `cache_write_tokens` is ours (Anthropic's `cache_creation_input_tokens`;
OpenAI has no such count). `/v1/messages` turns it back into Anthropic's fields, where
`input_tokens = P - R - W`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def usage(prompt: int, completion: int, cached: int = 0, cache_write: int = 0) -> dict[str, Any]:
    """The canonical usage object (see the module docstring)."""
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if cached or cache_write:
        out["prompt_tokens_details"] = {"cached_tokens": cached, "cache_write_tokens": cache_write}
    return out


@dataclass(slots=True)
class Usage:
    """What one request used, for its log line: cached_tokens were read from the prompt cache,
    cache_write_tokens written to it; both are part of prompt_tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    # Chunks relayed to the client: the record of a stream that ended before the provider's
    # usage chunk (abandoned, cut, or failed after the first token) — about one token each.
    streamed_chunks: int = 0

    def update(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens") or self.prompt_tokens
            self.completion_tokens = usage.get("completion_tokens") or self.completion_tokens
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = details.get("cached_tokens") or self.cached_tokens
                self.cache_write_tokens = details.get("cache_write_tokens") or self.cache_write_tokens

    def log_fields(self) -> str:
        return (f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens} "
                f"cached_tokens={self.cached_tokens} cache_write_tokens={self.cache_write_tokens} "
                f"streamed_chunks={self.streamed_chunks}")
