"""What the gateway knows of an upstream model: prices, context window, output cap, tokenizer.

A shipped table of common models (below, with the date its figures were read) overlaid by the
config's `[model_info."<upstream model name or glob>"]` tables, field by field:

    lookup(model) = shipped entry  <-  config entry (only the fields it sets)

Matching, in each of the two tables: the exact name first; then the config's globs in file order,
or the shipped table's longest matching pattern (so "gpt-4o-mini-2024-07-18" is "gpt-4o-mini*",
not "gpt-4o*"). A model in neither table has no prices (cost $0, logged once) and no window
(nothing is rejected); its encoding comes from its name (`encoding_for`).

Lookups are cached per model name; the cache is bounded (glob routes forward client-chosen names).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, fields, replace
from typing import Iterable

from proxy.config import Config, ModelInfoConfig

# USD per million tokens, as published on openai.com/api/pricing and anthropic.com/pricing (standard
# tier, no batch discount; Anthropic's cache write is the 5-minute one). Check them before relying
# on them: override any figure with [model_info."<model>"].
PRICES_DATE = "2025-11-30"

APPROXIMATE_MARGIN = 1.2  # cl100k_base counts x this, for tokenizers not shipped (see tokens.py)
MAX_CACHED_LOOKUPS = 4096


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    input_usd_per_mtok: float | None = None
    output_usd_per_mtok: float | None = None
    cached_input_usd_per_mtok: float | None = None  # None = the input price
    cache_write_usd_per_mtok: float | None = None   # None = the input price
    context_window: int | None = None
    max_output_tokens: int | None = None
    encoding: str = "approximate"
    token_margin: float = 1.0

    @property
    def priced(self) -> bool:
        return self.input_usd_per_mtok is not None or self.output_usd_per_mtok is not None


# pattern: (input, output, cached input, cache write, context window, max output tokens)
_Row = tuple[float, float, float | None, float | None, int, int]
SHIPPED: dict[str, _Row] = {
    # OpenAI (o200k_base): cache writes cost the input price (no separate figure)
    "gpt-5*": (1.25, 10.0, 0.125, None, 400_000, 128_000),
    "gpt-5-mini*": (0.25, 2.0, 0.025, None, 400_000, 128_000),
    "gpt-5-nano*": (0.05, 0.40, 0.005, None, 400_000, 128_000),
    "gpt-4.1*": (2.0, 8.0, 0.50, None, 1_047_576, 32_768),
    "gpt-4.1-mini*": (0.40, 1.60, 0.10, None, 1_047_576, 32_768),
    "gpt-4.1-nano*": (0.10, 0.40, 0.025, None, 1_047_576, 32_768),
    "gpt-4o*": (2.50, 10.0, 1.25, None, 128_000, 16_384),
    "chatgpt-4o*": (5.0, 15.0, None, None, 128_000, 16_384),
    "gpt-4o-mini*": (0.15, 0.60, 0.075, None, 128_000, 16_384),
    "o1*": (15.0, 60.0, 7.50, None, 200_000, 100_000),
    "o1-mini*": (1.10, 4.40, 0.55, None, 128_000, 65_536),
    "o1-pro*": (150.0, 600.0, None, None, 200_000, 100_000),
    "o3*": (2.0, 8.0, 0.50, None, 200_000, 100_000),
    "o3-mini*": (1.10, 4.40, 0.55, None, 200_000, 100_000),
    "o3-pro*": (20.0, 80.0, None, None, 200_000, 100_000),
    "o4-mini*": (1.10, 4.40, 0.275, None, 200_000, 100_000),
    # OpenAI (cl100k_base)
    "gpt-4-turbo*": (10.0, 30.0, None, None, 128_000, 4_096),
    "gpt-4": (30.0, 60.0, None, None, 8_192, 8_191),
    "gpt-4-0613": (30.0, 60.0, None, None, 8_192, 8_191),
    "gpt-3.5-turbo*": (0.50, 1.50, None, None, 16_385, 4_096),
    "text-embedding-3-small": (0.02, 0.0, None, None, 8_191, 1),
    "text-embedding-3-large": (0.13, 0.0, None, None, 8_191, 1),
    "text-embedding-ada-002": (0.10, 0.0, None, None, 8_191, 1),
    # Anthropic (approximate): cached input is the cache read price
    "claude-opus-4-5*": (5.0, 25.0, 0.50, 6.25, 200_000, 64_000),
    "claude-opus-4*": (15.0, 75.0, 1.50, 18.75, 200_000, 32_000),
    "claude-sonnet-4*": (3.0, 15.0, 0.30, 3.75, 200_000, 64_000),
    "claude-haiku-4-5*": (1.0, 5.0, 0.10, 1.25, 200_000, 64_000),
    "claude-3-7-sonnet*": (3.0, 15.0, 0.30, 3.75, 200_000, 64_000),
    "claude-3-5-sonnet*": (3.0, 15.0, 0.30, 3.75, 200_000, 8_192),
    "claude-3-5-haiku*": (0.80, 4.0, 0.08, 1.0, 200_000, 8_192),
    "claude-3-opus*": (15.0, 75.0, 1.50, 18.75, 200_000, 4_096),
    "claude-3-haiku*": (0.25, 1.25, 0.03, 0.30, 200_000, 4_096),
}

# Encodings by name, for models the tables do not settle (first match wins: gpt-4o before gpt-4).
_O200K = ("gpt-5*", "gpt-4.1*", "gpt-4.5*", "gpt-4o*", "chatgpt-4o*", "o1*", "o3*", "o4*", "gpt-oss*",
          "omni-moderation*")
_CL100K = ("gpt-4*", "gpt-3.5*", "text-embedding-3*", "text-embedding-ada-002*")


def encoding_for(model: str) -> str:
    """o200k_base for gpt-4o, gpt-4.1, gpt-5 and the o-series; cl100k_base for older OpenAI models;
    "approximate" (cl100k_base x a margin) for everything else (Anthropic, Ollama, unknown)."""
    name = model.lower().rsplit("/", 1)[-1]  # "openai/gpt-4o" (an OpenAI-compatible router's name)
    if any(fnmatch.fnmatchcase(name, p) for p in _O200K):
        return "o200k_base"
    if any(fnmatch.fnmatchcase(name, p) for p in _CL100K):
        return "cl100k_base"
    return "approximate"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


_OVERRIDES = tuple(f.name for f in fields(ModelInfoConfig) if f.name != "pattern")


class ModelTable:
    def __init__(self, overrides: Iterable[ModelInfoConfig] = ()):
        self._overrides = tuple(overrides)
        self._cache: dict[str, ModelInfo] = {}

    @classmethod
    def from_config(cls, config: Config) -> "ModelTable":
        return cls(config.model_info)

    def lookup(self, model: str) -> ModelInfo:
        found = self._cache.get(model)
        if found is None:
            if len(self._cache) >= MAX_CACHED_LOOKUPS:
                self._cache.clear()
            found = self._cache[model] = self._resolve(model)
        return found

    def _resolve(self, model: str) -> ModelInfo:
        info = ModelInfo(model, encoding=encoding_for(model))
        row = _shipped(model)
        if row is not None:
            inp, out, cached, write, window, cap = row
            info = replace(info, input_usd_per_mtok=inp, output_usd_per_mtok=out,
                           cached_input_usd_per_mtok=cached, cache_write_usd_per_mtok=write,
                           context_window=window, max_output_tokens=cap)
        entry = self._override(model)
        if entry is not None:
            info = replace(info, **{k: getattr(entry, k) for k in _OVERRIDES if getattr(entry, k) is not None})
        if entry is None or entry.token_margin is None:
            info = replace(info, token_margin=APPROXIMATE_MARGIN if info.encoding == "approximate" else 1.0)
        return info

    def _override(self, model: str) -> ModelInfoConfig | None:
        for entry in self._overrides:
            if not _is_glob(entry.pattern) and entry.pattern == model:
                return entry
        for entry in self._overrides:
            if _is_glob(entry.pattern) and fnmatch.fnmatchcase(model, entry.pattern):
                return entry
        return None


def _shipped(model: str) -> _Row | None:
    name = model.rsplit("/", 1)[-1]
    if name in SHIPPED:
        return SHIPPED[name]
    matches = [p for p in SHIPPED if _is_glob(p) and fnmatch.fnmatchcase(name, p)]
    return SHIPPED[max(matches, key=len)] if matches else None
