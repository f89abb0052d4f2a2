"""Fail fast: a run that can only produce errors stops at once, with one line saying why.

Rules:
- `STREAK` (20) responses in a row with the same 4xx status (the first 20 or any 20 later) stop
  the run: the target refuses this request, and more of it measures nothing. 429 is left out: it
  is how a target answers load, which is what a sweep is looking for (`--stop-on-error-rate`
  covers a target that only says 429).
- `stop_on_error_rate`: once at least `STREAK` responses finished, an error share above it stops
  the run. Requests cut by the run's own end ("cancelled") are not responses and do not count.
- The line names the likely fix for the common cases (401: the key; 404: the base URL).
"""

from __future__ import annotations

import trio

from .client import Sample, is_error

STREAK = 20
_NOT_A_RESPONSE = frozenset({"cancelled"})


def advice(status: int, api_key_given: bool, detail: str) -> str:
    if status == 401:
        if api_key_given:
            return "401 from the target: the API key was refused (check --api-key)"
        return "401 from the target: pass --api-key"
    if status == 403:
        return "403 from the target: the API key may not use this model or endpoint"
    if status == 404:
        return "404: does the URL end in /v1?"
    example = " ".join(detail.split())[:160]
    return f"{status} from the target for {STREAK} requests in a row" + (f": {example}" if example else "")


class Guard:
    def __init__(self, scope: trio.CancelScope, stop_on_error_rate: float | None,
                 api_key_given: bool) -> None:
        self.scope, self.max_error_rate, self.api_key_given = scope, stop_on_error_rate, api_key_given
        self.stopped: str | None = None
        self.responses = self.errors = 0
        self._streak_status, self._streak = 0, 0

    def record(self, sample: Sample) -> None:
        if self.stopped is not None or sample.outcome in _NOT_A_RESPONSE:
            return
        self.responses += 1
        if is_error(sample.outcome):
            self.errors += 1
        status = sample.status if 400 <= sample.status < 500 and sample.status != 429 else 0
        if status and status == self._streak_status:
            self._streak += 1
        else:
            self._streak_status, self._streak = status, 1 if status else 0
        if self._streak >= STREAK:
            self.stop(advice(status, self.api_key_given, sample.detail))
        elif (self.max_error_rate is not None and self.responses >= STREAK
              and self.errors / self.responses > self.max_error_rate):
            self.stop(f"stopped: {self.errors} of {self.responses} responses failed "
                      f"(over --stop-on-error-rate {self.max_error_rate:g})")

    def stop(self, reason: str) -> None:
        self.stopped = reason
        self.scope.cancel()
