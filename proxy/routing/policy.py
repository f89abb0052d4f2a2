"""What to do after a failed attempt, and how long to wait. Pure functions, no I/O.

Classification (from PRODUCT.md and the routing issue):
- RETRY: 429, 500, 502, 503, 504, 529, connect errors, resets, timeouts. Retried within the
  model's deployments (`retries`), then the model's fallbacks.
- FAILOVER: no first token within `ttft_timeout`: the next attempt starts at once (no backoff),
  and counts against `retries` like a RETRY.
- UNUSABLE: 401/403 — this deployment cannot serve (revoked or wrong key): open its breaker at
  once, move on, never retry it in this request.
- CONTEXT: the provider says the prompt is too long: go to `context_window_fallback` if set.
- FATAL: any other 4xx (invalid request, content filter) goes back to the client at once.
- SKIP: our own admission control found the deployment saturated: try another, no penalty.

Backoff is "full jitter": uniform(0, min(max, initial * 2**n)). A provider's Retry-After is
honoured when it is at most `retry_after_max`; beyond that we fail over instead of waiting.
"""

from __future__ import annotations

import enum
import math
import random

from proxy.core.errors import GatewayError, UpstreamError, UpstreamStatusError, UpstreamTimeout

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})


class Action(enum.Enum):
    RETRY = "retry"
    FAILOVER = "failover"  # like RETRY, but without waiting: the deployment was just too slow
    UNUSABLE = "unusable"
    CONTEXT = "context"
    FATAL = "fatal"
    SKIP = "skip"


class Saturated(GatewayError):
    """A deployment's own max_concurrency stayed full for queue_timeout (our admission control)."""

    status = 429
    type = "rate_limit_error"
    code = "gateway_saturated"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", b"1")]


class NoHealthyDeployment(GatewayError):
    """Every deployment of the model and its fallbacks is open or cooling down (503), or only
    cooling down after provider 429s with a long Retry-After (429)."""

    status = 503
    type = "api_error"
    code = "no_healthy_deployment"

    def __init__(self, message: str, *, retry_after: float | None = None, rate_limited: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        if rate_limited:  # only cooling after providers' 429s: say so, as the provider would
            self.status, self.type, self.code = 429, "rate_limit_error", "rate_limit_exceeded"

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]


class FirstTokenTimeout(UpstreamTimeout):
    code = "first_token_timeout"


def classify(error: GatewayError) -> Action:
    if isinstance(error, (Saturated, NoHealthyDeployment)):
        return Action.SKIP
    if isinstance(error, FirstTokenTimeout):
        return Action.FAILOVER
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
