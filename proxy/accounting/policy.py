"""Accounting on every chat and /v1/messages request: tokens before the call, cost after it.

admit (order 15: after cost tiers chose the model, before keys reserve on it):
- counts the prompt with the tokenizer of the route's first deployment (tokens.py; a large one
  in slices, other streams relayed in between) and notes `x.notes["prompt_tokens"]` and
  `x.notes["max_tokens"]` (the output cap a budget reserves: the request's max_tokens, else the
  model's max_output_tokens, never more than the window leaves);
- checks the context window, the smallest among the route's deployments that have one
  (context.py): 400 context_length_exceeded, or with `context_strategy = "sliding_window"` the
  oldest turns dropped and `x-gateway-context-trimmed: <messages dropped>` on the response. A
  route with a `context_window_fallback` whose window fits is left to the router;
- on a stream, adds a tap that keeps the first relayed chunks (relayed.py).

settle: a stream that ended without the provider's usage (cut, abandoned, failed after the first
token) gets its usage from the counts — prompt from admit, completion from the relayed text — so
an interrupted stream is still billed; then `x.cost_usd` from the served model's prices
(prices.py), $0 for a cache hit or a stale answer. It runs before keys settle spend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from proxy.accounting import context
from proxy.accounting.model_info import ModelInfo
from proxy.accounting.prices import DEFAULT_MAX_OUTPUT, Prices
from proxy.accounting.relayed import RelayedText
from proxy.accounting.tokens import COUNTING_THREADS, count_once, counter
from proxy.config import Config, ModelRoute
from proxy.core.request import ChatRequest
from proxy.server.exchange import Exchange

log = logging.getLogger("proxy.accounting")

ORDER = 15  # between Policies.TIERS (10) and Policies.KEYS (20)
_MAX_TARGETS = 1024


@dataclass(frozen=True, slots=True)
class Target:
    """What a route's request is counted and checked against."""

    info: ModelInfo           # the first deployment's model: encoding, margin, output cap
    window: int | None        # the smallest known context window among the route's deployments


@dataclass(slots=True)
class _State:
    target: Target
    tap: RelayedText | None


class AccountingPolicy:
    def __init__(self, config: Config, prices: Prices | None = None):
        self._config = config
        self.prices = prices or Prices.from_config(config)
        self._targets: dict[tuple[str, str], Target] = {}
        self._limiter: trio.CapacityLimiter | None = None

    # -- admit --

    async def admit(self, x: Exchange, request: Any) -> None:
        if x.endpoint not in ("chat", "messages") or not isinstance(request, ChatRequest):
            return
        route = self._config.route(request.model)
        if route is None:
            return  # the endpoint answers 404
        target = self._target(route, request.model)
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(COUNTING_THREADS)
        count = await count_once(x.notes, request, target.info.encoding, target.info.token_margin,
                                 self._limiter)
        asked = _max_tokens(request.body)
        window = target.window
        if window is not None and count.total > context.budget(window, asked) \
                and not self._fits_fallback(route, count.total, asked):
            if route.context_strategy != "sliding_window":
                raise context.exceeded(window, count.total, asked)
            trimmed = context.trim(request, count, context.budget(window, asked))
            if trimmed is None:
                raise context.exceeded(window, count.total, asked)
            dropped, count = trimmed
            x.response_headers.append((context.TRIMMED_HEADER, str(dropped).encode()))
            log.info("context trimmed: %d messages dropped to fit %s's window of %d", dropped,
                     request.model, window)
        cap = asked or target.info.max_output_tokens or DEFAULT_MAX_OUTPUT
        if window is not None and not asked:
            cap = max(1, min(cap, window - count.total))
        x.notes["prompt_tokens"] = count.total
        x.notes["max_tokens"] = cap
        tap = None
        if request.stream:
            tap = RelayedText()
            x.taps.append(tap)
        x.notes["accounting"] = _State(target, tap)

    def _target(self, route: ModelRoute, model: str) -> Target:
        key = (route.name, model)
        found = self._targets.get(key)
        if found is None:
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            found = self._targets[key] = self._resolve(route, model)
        return found

    def _resolve(self, route: ModelRoute, model: str) -> Target:
        upstream = [d.model or model for d in route.deployments]
        first = min(route.deployments, key=lambda d: (d.priority, -d.weight))
        windows = [w for w in (self.prices.table.lookup(m).context_window for m in upstream) if w is not None]
        return Target(self.prices.table.lookup(first.model or model), min(windows) if windows else None)

    def _fits_fallback(self, route: ModelRoute, prompt: int, asked: int | None) -> bool:
        name = route.context_window_fallback
        fallback = self._config.route(name) if name else None
        if fallback is None:
            return False
        window = self._target(fallback, name).window
        return window is None or prompt <= context.budget(window, asked)

    # -- settle --

    def settle(self, x: Exchange) -> None:
        usage = x.usage
        if usage is None:
            return
        state = x.notes.get("accounting")
        served = x.served.model if x.served is not None else "-"
        if x.cache in ("hit", "stale"):
            x.cost_usd = 0.0
            return
        if served == "-":
            return
        if isinstance(state, _State) and state.tap is not None and state.tap.kept \
                and (usage.completion_tokens == 0 or x.outcome != "ok"):
            self._bill_relayed(x, state, served)
        x.cost_usd = self.prices.cost_usd(served, usage)

    def _bill_relayed(self, x: Exchange, state: _State, served: str) -> None:
        """The stream ended before (or without) the provider's final usage: count what was relayed."""
        info = self.prices.table.lookup(served)
        count = counter(info.encoding)
        relayed = state.tap.tokens(lambda text: round(count(text) * info.token_margin),
                                   x.usage.streamed_chunks)
        usage = x.usage
        if relayed > usage.completion_tokens:
            usage.completion_tokens = relayed
            if usage.prompt_tokens == 0:
                usage.prompt_tokens = x.notes.get("prompt_tokens", 0)
            x.notes["usage_counted"] = True  # not the provider's figures: from the relayed text
            log.info("usage counted from the relayed stream (%s): prompt_tokens=%d completion_tokens=%d",
                     x.outcome, usage.prompt_tokens, usage.completion_tokens)


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
