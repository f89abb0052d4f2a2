"""Cost-aware routing: a model alias (e.g. `auto`) whose requests are sorted into tiers by rules
anyone can read, each tier a model group under [models] with its own retries and fallbacks.

    [tiers."auto"]
    preset = "gpt"                        # or "claude", or your own [[tiers."auto".tiers]] list
    models = { cheap = "my-mini" }        # optional: another [models] name for a preset's tier
    budget_floor_usd = 1.0                # optional: a key with less left goes to the first tier

Tiers are listed cheapest first. A request goes to the first tier whose limits it fits; the last
tier (no limits) takes the rest. A tier's limits, each optional:
    max_prompt_tokens   prompt tokens (tiktoken, o200k_base by default) must be below it
    max_tokens          the requested max_tokens / max_completion_tokens must not exceed it
    tools = false       no tools (or functions) in the request
    json_schema = false no response_format of type json_schema
    images = false      no image parts
    keywords, patterns  none of these words (any case, whole words) / regular expressions in the
                        last user turn
The decision is told in `x-gateway-route: tier=<name> reason=<why>` (the first tier: why it fits,
e.g. `tokens<500`; a later tier: why the tier before did not, e.g. `tools`, `tokens>=500`,
`keyword:prove`, `pattern#0`, `budget<1`) and left in x.notes["tier"] and ["tier_reason"] for
metrics. `classify` is a pure function of the request's `Features`: testable offline.

Order: this policy runs first (proxy/server/exchange.py), before the keys policy has looked at the
key: the budget rule reads the key's budget left after its previous request (`budget_of`, the
keys policy's `last_remaining`; unknown for a key's first request in a process, which then goes
by the other rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from proxy.accounting.tokens import count_once
from proxy.config import Config, TierAlias, Tier
from proxy.core.errors import ConfigError
from proxy.core.request import ChatRequest
from proxy.server.exchange import Exchange, Principal

# Words that mean "think hard": the shipped presets send them past the cheapest tier.
REASONING = ["prove", "proof", "derive", "step by step", "analyze", "analyse", "analysis", "debug",
             "refactor", "architecture", "design", "optimize", "optimise", "algorithm", "complexity",
             "trade-offs", "tradeoffs", "compare", "evaluate", "critique", "strategy", "plan",
             "theorem", "rigorous", "formal", "why does", "explain why", "root cause"]
# And what the strongest tier is for (the three-tier preset's middle tier sends them on).
HARDEST = ["prove", "proof", "theorem", "rigorous", "formal verification", "research", "novel"]

PRESETS: dict[str, list[dict[str, Any]]] = {
    "gpt": [
        {"name": "cheap", "model": "gpt-4o-mini", "max_prompt_tokens": 1000, "max_tokens": 1024,
         "json_schema": False, "images": False, "keywords": REASONING},
        {"name": "strong", "model": "gpt-4o"},
    ],
    "claude": [
        {"name": "cheap", "model": "claude-haiku-4-5", "max_prompt_tokens": 1000, "max_tokens": 1024,
         "tools": False, "json_schema": False, "images": False, "keywords": REASONING},
        {"name": "balanced", "model": "claude-sonnet-4-5", "max_prompt_tokens": 50000,
         "keywords": HARDEST},
        {"name": "strong", "model": "claude-opus-4-1"},
    ],
}
_HEADER_SAFE = re.compile(r"[^A-Za-z0-9_<>=.:#+-]")
_IMAGE_PARTS = frozenset({"image_url", "image", "input_image"})


@dataclass(frozen=True, slots=True)
class Features:
    """What the rules look at, read once from the request."""
    prompt_tokens: int
    max_tokens: int | None = None
    tools: bool = False
    json_schema: bool = False
    images: bool = False
    last_user: str = ""
    budget_remaining_usd: float | None = None


def features(body: dict[str, Any], prompt_tokens: int, budget: float | None = None) -> Features:
    """The features of a canonical (OpenAI-shaped) chat body."""
    images, last_user = False, ""
    for message in body.get("messages") or ():
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict):
                    images = images or part.get("type") in _IMAGE_PARTS
                    if part.get("type") == "text" and isinstance(part.get("text"), str):
                        parts.append(part["text"])
            text = " ".join(parts)
        if message.get("role") == "user":
            last_user = text
    response_format = body.get("response_format")
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return Features(prompt_tokens=prompt_tokens, max_tokens=limit if isinstance(limit, int) else None,
                    tools=bool(body.get("tools") or body.get("functions")),
                    json_schema=isinstance(response_format, dict) and response_format.get("type") == "json_schema",
                    images=images, last_user=last_user, budget_remaining_usd=budget)


class Classifier:
    """One alias's rules, compiled."""

    def __init__(self, alias: TierAlias):
        self.alias = alias
        self._words = [_word_pattern(t.keywords) for t in alias.tiers]
        self._patterns = [[re.compile(p) for p in t.patterns] for t in alias.tiers]

    def classify(self, f: Features) -> tuple[Tier, str]:
        tiers, floor = self.alias.tiers, self.alias.budget_floor_usd
        if floor is not None and f.budget_remaining_usd is not None and f.budget_remaining_usd < floor:
            return tiers[0], f"budget<{floor:g}"
        reason = "fits"
        for i, tier in enumerate(tiers[:-1]):
            refused = self._refuses(i, tier, f)
            if refused is None:
                return tier, _fits(tier)
            reason = refused
        return tiers[-1], reason

    def _refuses(self, i: int, tier: Tier, f: Features) -> str | None:
        if tier.max_prompt_tokens is not None and f.prompt_tokens >= tier.max_prompt_tokens:
            return f"tokens>={tier.max_prompt_tokens}"
        if tier.max_tokens is not None and f.max_tokens is not None and f.max_tokens > tier.max_tokens:
            return f"max_tokens>{tier.max_tokens}"
        if f.tools and not tier.tools:
            return "tools"
        if f.json_schema and not tier.json_schema:
            return "json_schema"
        if f.images and not tier.images:
            return "images"
        if self._words[i] is not None and (m := self._words[i].search(f.last_user)):
            return "keyword:" + _HEADER_SAFE.sub("_", m.group(0).lower())
        for n, pattern in enumerate(self._patterns[i]):
            if pattern.search(f.last_user):
                return f"pattern#{n}"
        return None


def _fits(tier: Tier) -> str:
    if tier.max_prompt_tokens is not None:
        return f"tokens<{tier.max_prompt_tokens}"
    if tier.max_tokens is not None:
        return f"max_tokens<={tier.max_tokens}"
    return "fits"


def _word_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)


class TierPolicy:
    """The policy (Policies.TIERS): requests for an alias get their tier's model group."""

    def __init__(self, config: Config, budget_of: Callable[[Principal], float | None] | None = None):
        self._budget_of = budget_of
        self._classifiers = {name: Classifier(alias) for name, alias in config.tiers.items()}
        for name, alias in config.tiers.items():
            key = f'tiers."{name}"'
            if any(not route.is_glob and route.name == name for route in config.models):
                raise ConfigError(key, name, "an alias that is not also a [models] name")
            for i, tier in enumerate(alias.tiers):
                if config.route(tier.model) is None:
                    raise ConfigError(f"{key}.tiers[{i}].model", tier.model, "a model name defined under [models]")
            try:
                from proxy.core.encodings import encoding

                encoding(alias.encoding)
            except Exception:  # noqa: BLE001 - an unknown name, reported with the key
                raise ConfigError(f"{key}.encoding", alias.encoding, "o200k_base or cl100k_base") from None

    async def admit(self, x: Exchange, request: Any) -> None:
        classifier = self._classifiers.get(x.model)
        if classifier is None or not isinstance(request, ChatRequest):
            return
        tokens = (await count_once(x.notes, request, classifier.alias.encoding)).total
        budget = self._budget_of(x.principal) if self._budget_of is not None else None
        tier, reason = classifier.classify(features(request.body, tokens, budget))
        # ChatRequest is frozen for everyone downstream; the routed model is the one rewrite the
        # seam allows, made before any other policy or the router reads it.
        object.__setattr__(request, "model", tier.model)
        x.notes["tier"], x.notes["tier_reason"] = tier.name, reason
        x.response_headers.append((b"x-gateway-route", f"tier={tier.name} reason={reason}".encode("ascii")))

    def settle(self, x: Exchange) -> None:
        pass
