"""A circuit breaker per deployment. Sans-IO: every method takes `now` (trio.current_time()).

States and rules:
    closed ──(N consecutive failures, or failure rate over the window, or a fatal 401/403)──> open
    open ──(cooldown elapsed; one request allowed through)──> half-open (probe in flight)
    half-open ──probe succeeds──> closed (counters reset)
    half-open ──probe fails──> open again (cooldown restarts)

A deployment may also be *cooling* without being open: a provider's Retry-After longer than we
are willing to wait marks it unavailable until then, without counting as a breaker failure.
The window holds at most `window_max` outcomes (bounded memory whatever the traffic).
Every change of state is logged with its reason (opening at WARNING, the rest at INFO) and told to
`on_change(name, state)` (metrics keep a gauge per deployment by it).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Callable

from proxy.core.errors import clip

log = logging.getLogger("proxy.routing.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    failures: int = 3            # consecutive failures that open it
    cooldown: float = 30.0       # seconds open before one probe is let through
    failure_rate: float = 0.5    # ... or this share of failures in the window
    window: float = 60.0         # seconds of outcomes the rate looks at
    min_requests: int = 20       # the rate only counts with at least this many outcomes
    window_max: int = 1000       # outcomes kept at most


class Breaker:
    def __init__(self, settings: BreakerSettings, name: str = "-"):
        self._s = settings
        self.name = name  # the deployment's, for the log lines
        self.on_change: Callable[[str, str], None] | None = None
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.cooling_until = 0.0
        self.reason = ""
        self._probe_in_flight = False
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque(maxlen=settings.window_max)

    def available(self, now: float) -> bool:
        """May a request be sent now? (Does not reserve the half-open probe: see `acquire`.)"""
        if now < self.cooling_until:
            return False
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self.opened_at + self._s.cooldown
        return not self._probe_in_flight

    def acquire(self, now: float) -> bool:
        """Reserve the right to send one request; in half-open only one probe at a time."""
        if not self.available(now):
            return False
        if self.state == OPEN:
            self._become(HALF_OPEN, "cooldown over: one probe request")
        if self.state == HALF_OPEN:
            self._probe_in_flight = True
        return True

    def success(self, now: float) -> None:
        self._record(now, True)
        self.consecutive_failures = 0
        if self.state != CLOSED:
            self.opened_at, self.reason = None, ""
            self._outcomes.clear()
            self._become(CLOSED, "probe succeeded" if self.state == HALF_OPEN else "a request succeeded")
        self._probe_in_flight = False

    def failure(self, now: float, *, fatal: bool = False, reason: str = "") -> None:
        self._record(now, False)
        self.consecutive_failures += 1
        self._probe_in_flight = False
        if fatal or self.state == HALF_OPEN or self.consecutive_failures >= self._s.failures \
                or self._rate_exceeded(now):
            self.opened_at = now
            self.reason = reason or ("fatal error" if fatal else "failures")
            why = ("probe failed" if self.state == HALF_OPEN else "fatal error" if fatal else
                   f"{self.consecutive_failures} consecutive failures"
                   if self.consecutive_failures >= self._s.failures else "failure rate over the window")
            self._become(OPEN, f"{why}: {self.reason}")

    def _become(self, state: str, why: str) -> None:
        previous, self.state = self.state, state
        if previous == state:
            return
        log.log(logging.WARNING if state == OPEN else logging.INFO, "breaker %s: %s -> %s (%s)",
                self.name, previous, state, clip(why, 300))
        if self.on_change is not None:
            self.on_change(self.name, state)

    def release(self) -> None:
        """The request ended without an outcome for the deployment (e.g. the client left)."""
        self._probe_in_flight = False

    def cool(self, now: float, seconds: float) -> None:
        self.cooling_until = max(self.cooling_until, now + seconds)

    def _record(self, now: float, ok: bool) -> None:
        self._outcomes.append((now, ok))

    def _rate_exceeded(self, now: float) -> bool:
        recent = [ok for t, ok in self._outcomes if t >= now - self._s.window]
        if len(recent) < self._s.min_requests:
            return False
        return recent.count(False) / len(recent) >= self._s.failure_rate

    def snapshot(self, now: float) -> dict:
        recent = [ok for t, ok in self._outcomes if t >= now - self._s.window]
        return {
            "state": self.state,
            "reason": self.reason or None,
            "consecutive_failures": self.consecutive_failures,
            "window_requests": len(recent),
            "window_failures": recent.count(False),
            "open_for_s": None if self.opened_at is None else round(now - self.opened_at, 3),
            "cooling_for_s": round(max(0.0, self.cooling_until - now), 3),
        }
