"""What to do after a failed attempt, and how long to wait. Pure functions, no I/O.

Classification (from PRODUCT.md and the routing issue):
- RETRY: 429, 500, 502, 503, 504, 529, connect errors, resets, timeouts. Retried within the
  model's deployments (`retries`), then the model's fallbacks.
- FAILOVER: no first token within `ttft_timeout`: the next attempt starts at once (no backoff),
  and counts against `retries` like a RETRY.
- UNUSABLE: 401/403 — this deployment cannot serve (revoked or wrong key): open its breaker at
  once, move on, never retry it in this request.
- CONTEXT: the provider says the prompt is too long: go to `context_window_fallback` if set.
- FATAL: any other 4xx (invalid request, content filter), and a request an adapter cannot
  translate, goes back to the client at once.
- RESAMPLE: the model's tool call does not fit the client's own schema (`tool_arguments =
  "validate"`): ask again at once (counts against `retries`), but without blame.
- SKIP: our own admission control found the deployment saturated: try another, no penalty.

Blame: only RETRY, FAILOVER and UNUSABLE count as a deployment's failure (its breaker). Nothing
that follows from what the client sent does — a provider's 4xx, an error event naming a 4xx, an
untranslatable request, a schema of the client's that the model keeps missing — or one client's
bad requests would open the breaker for everyone.

Backoff is "full jitter": uniform(0, min(max, initial * 2**n)). A provider's Retry-After is
honoured when it is at most `retry_after_max`; beyond that we fail over instead of waiting.
"""

from __future__ import annotations

import enum
import random

from proxy.core.errors import (FirstTokenTimeout, GatewayError, NoHealthyDeployment, Saturated,
                               ToolArgumentsInvalid, UpstreamError, UpstreamStatusError, UpstreamTimeout)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})


class Action(enum.Enum):
    RETRY = "retry"
    FAILOVER = "failover"  # like RETRY, but without waiting: the deployment was just too slow
    UNUSABLE = "unusable"
    CONTEXT = "context"
    FATAL = "fatal"
    RESAMPLE = "resample"  # like FAILOVER, but the deployment is not to blame
    SKIP = "skip"


def classify(error: GatewayError) -> Action:
    if isinstance(error, (Saturated, NoHealthyDeployment)):
        return Action.SKIP
    if isinstance(error, FirstTokenTimeout):
        return Action.FAILOVER
    if isinstance(error, ToolArgumentsInvalid):
        return Action.RESAMPLE
    if isinstance(error, UpstreamStatusError):
        status = error.upstream_status
        if status in (401, 403):
            return Action.UNUSABLE
        if status in RETRYABLE_STATUSES:
            return Action.RETRY
        if error.code in CONTEXT_CODES or "context length" in error.message.lower():
            return Action.CONTEXT
        return Action.FATAL
    if isinstance(error, (UpstreamTimeout, UpstreamError)):
        return Action.RETRY  # connect failures, resets, malformed streams, timeouts
    return Action.FATAL


def retry_after_seconds(error: GatewayError) -> float | None:
    """The provider's Retry-After in seconds (delta form only; dates are treated as absent)."""
    value = getattr(error, "retry_after", None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def backoff(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Full jitter for the n-th retry (attempt 0 = first retry)."""
    return rng.uniform(0.0, min(maximum, initial * (2 ** attempt)))
