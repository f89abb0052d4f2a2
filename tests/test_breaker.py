"""Circuit breaker and retry classification: pure logic, exact times."""

import random

import pytest

from proxy.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerSettings
from proxy.core.errors import (InvalidRequest, UpstreamError, UpstreamRateLimited, UpstreamStatusError,
                          UpstreamTimeout)
from proxy.core.errors import NoHealthyDeployment, Saturated
from proxy.routing.policy import Action, backoff, classify, retry_after_seconds


def test_opens_after_consecutive_failures_and_half_opens_after_cooldown():
    b = Breaker(BreakerSettings(failures=3, cooldown=30))
    for t in (1, 2):
        b.failure(t)
        assert b.state == CLOSED and b.available(t)
    b.failure(3)
    assert b.state == OPEN and not b.available(3) and not b.available(32.99)
    assert b.available(33.0)
    assert b.acquire(33.0) and b.state == HALF_OPEN
    assert not b.available(33.0) and not b.acquire(33.5)  # one probe at a time
    b.success(34.0)
    assert b.state == CLOSED and b.consecutive_failures == 0 and b.available(34.0)


def test_a_failed_probe_reopens_for_a_full_cooldown():
    b = Breaker(BreakerSettings(failures=1, cooldown=10))
    b.failure(0)
    assert b.acquire(10)
    b.failure(12)
    assert b.state == OPEN and not b.available(21.9) and b.available(22.0)


def test_a_success_resets_the_consecutive_count():
    b = Breaker(BreakerSettings(failures=3))
    b.failure(0)
    b.failure(1)
    b.success(2)
    b.failure(3)
    b.failure(4)
    assert b.state == CLOSED


def test_fatal_failure_opens_at_once():
    b = Breaker(BreakerSettings(failures=3))
    b.failure(5, fatal=True, reason="invalid_api_key")
    assert b.state == OPEN and b.snapshot(6)["reason"] == "invalid_api_key"


def test_failure_rate_over_the_window_opens_it():
    b = Breaker(BreakerSettings(failures=100, failure_rate=0.5, window=60, min_requests=10))
    for i in range(10):
        (b.failure if i % 2 else b.success)(i)
    assert b.state == OPEN


def test_old_outcomes_leave_the_window():
    b = Breaker(BreakerSettings(failures=100, failure_rate=0.5, window=10, min_requests=4))
    for t in range(3):
        b.failure(t)
    for t in range(100, 110):
        b.success(t)
    b.failure(111)
    assert b.state == CLOSED  # 1 failure in the last 10 s of 11 outcomes


def test_cooling_blocks_without_opening():
    b = Breaker(BreakerSettings())
    b.cool(0, 7)
    assert not b.available(6.9) and b.available(7.0) and b.state == CLOSED


def test_release_frees_the_probe_without_a_verdict():
    b = Breaker(BreakerSettings(failures=1, cooldown=1))
    b.failure(0)
    assert b.acquire(1)
    b.release()
    assert b.acquire(1) and b.state == HALF_OPEN


@pytest.mark.parametrize("error, action", [
    (UpstreamRateLimited("x", retry_after="1"), Action.RETRY),
    (UpstreamStatusError("x", status=500), Action.RETRY),
    (UpstreamStatusError("x", status=502), Action.RETRY),
    (UpstreamStatusError("x", status=503), Action.RETRY),
    (UpstreamStatusError("x", status=504), Action.RETRY),
    (UpstreamStatusError("x", status=529), Action.RETRY),
    (UpstreamError("provider p: could not connect"), Action.RETRY),
    (UpstreamTimeout("provider p timed out"), Action.RETRY),
    (UpstreamStatusError("x", status=401), Action.UNUSABLE),
    (UpstreamStatusError("x", status=403), Action.UNUSABLE),
    (UpstreamStatusError("x", status=400, code="context_length_exceeded"), Action.CONTEXT),
    (UpstreamStatusError("x", status=400, code="content_filter"), Action.FATAL),
    (UpstreamStatusError("x", status=422), Action.FATAL),
    (InvalidRequest("bad"), Action.FATAL),
    (Saturated("full"), Action.SKIP),
    (NoHealthyDeployment("none"), Action.SKIP),
])
def test_classification(error, action):
    assert classify(error) is action


def test_backoff_is_full_jitter_within_its_cap():
    rng = random.Random(7)
    for attempt in range(8):
        cap = min(4.0, 0.25 * 2 ** attempt)
        values = [backoff(attempt, 0.25, 4.0, rng) for _ in range(200)]
        assert all(0 <= v <= cap for v in values)
        # The whole range is used: both ends reached, spread evenly (a fixed or top-heavy backoff
        # fails here; the mean of 200 uniform draws is within 0.4-0.6 of the cap by > 5 sigma).
        assert max(values) > cap * 0.9 and min(values) < cap * 0.1
        assert 0.4 * cap < sum(values) / len(values) < 0.6 * cap
        assert len(set(values)) > 190


def test_retry_after_parsing():
    assert retry_after_seconds(UpstreamRateLimited("x", retry_after="3")) == 3.0
    assert retry_after_seconds(UpstreamRateLimited("x", retry_after="Wed, 21 Oct 2026 07:28:00 GMT")) is None
    assert retry_after_seconds(UpstreamRateLimited("x", retry_after=None)) is None
    assert retry_after_seconds(UpstreamError("x")) is None
