"""The state store's contract: what keys, limits and budgets ask of SQLite or Redis.

Rules:
- One *reserve* is atomic across every worker and instance sharing the store: it checks the key's
  parallel streams, its rpm/tpm windows and every budget the request falls under, and, only if
  all pass, records the reservation (the worst-case cost and tokens) in one step. So N concurrent
  requests can never all see the same remaining budget: spend + reserved never passes a budget.
- *settle* is the request's end, whatever happened: the reservation goes, its real cost is added
  to the spend counters (per key, team, global; per day, month, total) and to the spend table
  (per day, key, team, model). A settle for a reservation already gone (released after its
  process disappeared) still adds the spend: nothing is billed twice, nothing is lost.
- Rate windows are sliding over 60 one-second buckets per key (requests, tokens): a bucket's
  tokens are the reserved ones until settle corrects them to the real count.
- Each process (owner) heartbeats; reservations of an owner not seen for `stale_after` seconds
  are released by whichever process sweeps next (a crashed worker's, at the latest on restart).
- `version` changes with every change of a key, so a process refreshes its view of the keys
  only when it did.
- *lease* (proxy/keys/leases.py) is the same atomic step for an allowance instead of one request:
  a budget lease is a reservation row of the process (usd = what it may still spend, released
  with the process like any other); a rate lease adds its requests and tokens to the key's window
  in the bucket of its last usable second; a slot lease (stream slots of a key with max_parallel)
  is a reservation row whose `stream` counts its slots (Redis: a field of pl:<key>), so the
  parallel count a reserve checks is every per-request stream plus every lease's slots. A lease
  never takes more than 1/LEASE_SHARE of what is left of a budget or window (1/SLOT_SHARE of the
  free slots), and none is granted when that would cover fewer than the asker's `least`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from proxy.keys.records import KeyRecord

WINDOW = 60          # seconds of a sliding rate window (one-second buckets)
LEASE_SHARE = 8      # a lease takes at most this fraction (1/8) of what is left of a budget or window
SLOT_SHARE = 2       # a slot lease takes at most half of a key's free stream slots
SPEND_GROUPS = ("key", "team", "model")


@dataclass(frozen=True, slots=True)
class Budget:
    scope: str        # "key:<id>", "team:<name>", "global"
    period: str       # "d:2026-11-29", "m:2026-11" or "total"
    limit_usd: float


@dataclass(slots=True)
class Reserve:
    id: str
    owner: str
    key_id: str
    now: float
    tokens: int                       # counted against tpm: prompt + output cap
    usd: float                        # the worst case, held against every budget
    budgets: tuple[Budget, ...] = ()
    kill_at: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    stream: bool = False


@dataclass(slots=True)
class Verdict:
    ok: bool
    code: str | None = None           # "rate_limit_exceeded" | "budget_exceeded" when refused
    reason: str = ""
    retry_after: float = 0.0
    requests: int = 0                 # in the window, this request included when ok
    tokens: int = 0
    requests_reset: float = 0.0       # seconds until the oldest counted request leaves the window
    tokens_reset: float = 0.0
    remaining_usd: float | None = None  # of the key's own budget, after this reservation
    leased_elsewhere: int = 0         # refused for max_parallel: stream slots other processes' leases hold


@dataclass(slots=True)
class Settle:
    reservation: str | None           # None: nothing was reserved (a key without limits)
    key_id: str                       # "master" for the master key
    team: str | None
    model: str
    now: float
    cost_usd: float
    input_tokens: int = 0
    output_tokens: int = 0
    scopes: tuple[str, ...] = ()      # budget scopes the spend counts against (key, team, global)
    leases: tuple[str, ...] = ()      # budget leases the request spent from: their hold shrinks by the cost
    window: tuple[int, int] | None = None  # (second, tokens) a rate lease counted: corrected to the real tokens


@dataclass(slots=True)
class BudgetAsk:
    """Give back unused USD of a budget lease, then ask for more (or close it: drop its whole hold)."""
    id: str                           # the lease's reservation row
    budget: Budget
    kill_at: float
    back: float = 0.0
    want: float = 0.0
    least: float = 0.0                # a smaller grant is none (the budget is near its end: per request)
    fresh: bool = True                # False: the row must exist (it was released: the lease is lost)
    close: bool = False


@dataclass(slots=True)
class RateAsk:
    """Give back unused units of a rate lease (counted in `back_second`), then count new ones in `second`."""
    key_id: str
    rpm: int | None
    tpm: int | None
    second: int
    want_requests: int = 0
    want_tokens: int = 0
    least_requests: int = 0
    least_tokens: int = 0
    back_second: int = 0
    back_requests: int = 0
    back_tokens: int = 0


@dataclass(slots=True)
class SlotAsk:
    """Give back unused stream slots of a key's slot lease, then ask for more (or close it)."""
    id: str                           # the lease's reservation row
    key_id: str
    max_parallel: int
    back: int = 0
    want: int = 0
    least: int = 1
    fresh: bool = True                # False: the row must exist (it was released: the lease is lost)
    close: bool = False


@dataclass(slots=True)
class Grant:
    usd: float = 0.0
    requests: int = 0
    tokens: int = 0
    slots: int = 0
    spend: float = 0.0                # the budget's spend and reserved (this grant included) at the grant
    reserved: float = 0.0
    window_requests: int = 0          # the key's window (this grant included)
    window_tokens: int = 0
    lost: bool = False                # the lease's row was gone (released as stale): nothing is held


def budget_grant(ask: BudgetAsk, spend: float, reserved: float) -> float:
    """How much of a budget a lease gets; both backends decide with these numbers."""
    if ask.want <= 0:
        return 0.0
    grant = min(ask.want, (min(ask.kill_at, 1.0) * ask.budget.limit_usd - spend - reserved) / LEASE_SHARE)
    return grant if grant >= ask.least and grant > 0 else 0.0


def rate_grant(ask: RateAsk, requests: int, tokens: int) -> tuple[int, int]:
    if ask.want_requests <= 0 and ask.want_tokens <= 0:
        return 0, 0
    r, t = ask.want_requests, ask.want_tokens
    if ask.rpm:
        r = min(r, (ask.rpm - requests) // LEASE_SHARE)
    if ask.tpm:
        t = min(t, (ask.tpm - tokens) // LEASE_SHARE)
    return (0, 0) if r < ask.least_requests or t < ask.least_tokens or r <= 0 else (r, t)


def slot_grant(ask: SlotAsk, in_use: int) -> int:
    """How many stream slots a lease gets, `in_use` counting every stream and lease of the key."""
    if ask.want <= 0:
        return 0
    grant = min(ask.want, (ask.max_parallel - in_use) // SLOT_SHARE)
    return grant if grant >= ask.least and grant > 0 else 0


@dataclass(slots=True)
class SpendRow:
    group: str
    spend_usd: float = 0.0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "spend_usd": round(self.spend_usd, 10), "requests": self.requests,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


class Store(Protocol):
    """Every method may raise StoreUnavailable; none blocks the event loop."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def version(self) -> int: ...

    async def load_keys(self) -> tuple[int, list[KeyRecord]]: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def put_key(self, record: KeyRecord) -> None: ...

    async def reserve(self, request: Reserve) -> Verdict: ...

    def settle_nowait(self, settle: Settle) -> None: ...

    async def flush(self) -> None: ...

    async def spend(self, group_by: str, first_day: str, last_day: str) -> list[SpendRow]: ...

    async def scope_spend(self, scope: str, period: str) -> float: ...

    async def heartbeat(self, owner: str, now: float, stale_after: float) -> int: ...

    async def lease(self, owner: str, now: float, asks: list[BudgetAsk | RateAsk | SlotAsk]) -> list[Grant]: ...


# -- periods: UTC calendar days and months --

_today: tuple[int, str] = (-1, "")


def day_of(now: float) -> str:
    """The UTC day of `now`, "2026-11-29" (POSIX days are exactly 86,400 s: cached per day)."""
    global _today
    number, text = _today  # one tuple: read whole even when another thread replaces it
    if int(now // 86400) != number:
        number = int(now // 86400)
        text = datetime.fromtimestamp(number * 86400, timezone.utc).strftime("%Y-%m-%d")
        _today = (number, text)
    return text


def period_key(period: str, now: float) -> str:
    """"day" -> "d:2026-11-29", "month" -> "m:2026-11", "total" -> "total"."""
    if period == "total":
        return "total"
    day = day_of(now)
    return f"d:{day}" if period == "day" else f"m:{day[:7]}"


def spend_periods(now: float) -> tuple[str, str, str]:
    """The counters one request's spend goes into."""
    day = day_of(now)
    return f"d:{day}", f"m:{day[:7]}", "total"


def seconds_to_period_end(period: str, now: float) -> float:
    """Retry-After for a budget: until the period turns over (a day for "total": ask an admin)."""
    when = datetime.fromtimestamp(now, timezone.utc)
    if period.startswith("d:"):
        end = datetime(when.year, when.month, when.day, tzinfo=timezone.utc).timestamp() + 86400
    elif period.startswith("m:"):
        year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
        end = datetime(year, month, 1, tzinfo=timezone.utc).timestamp()
    else:
        return 86400.0
    return max(1.0, end - now)


def day_range(period: str, now: float | None = None) -> tuple[str, str]:
    """/admin/spend's `period`: "day", "month", "total", "YYYY-MM" or "YYYY-MM-DD" -> first, last day."""
    today = day_of(time.time() if now is None else now)
    if period == "day":
        return today, today
    if period == "month":
        return today[:7] + "-01", today[:7] + "-31"
    if period == "total":
        return "0000-00-00", "9999-99-99"
    if len(period) == 7 and _date(period + "-01"):
        return period + "-01", period + "-31"
    if len(period) == 10 and _date(period):
        return period, period
    raise ValueError(period)


def _date(text: str) -> bool:
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class Window:
    """The sum of one key's buckets over the last WINDOW seconds, and when room comes back."""
    requests: int = 0
    tokens: int = 0
    buckets: list[tuple[int, int, int]] = field(default_factory=list)  # (second, requests, tokens) oldest first

    def free_after(self, now: float, index: int, used: int, need: int, limit: int) -> float:
        """Seconds until `used` (field `index` of the buckets) drops to limit - need."""
        for bucket in self.buckets:
            if used + need <= limit:
                break
            used -= bucket[index]
            wait = bucket[0] + WINDOW - now
            if used + need <= limit:
                return max(wait, 0.001)
        return 0.0 if used + need <= limit else float(WINDOW)

    def reset(self, now: float, index: int) -> float:
        for bucket in self.buckets:
            if bucket[index]:
                return max(0.0, bucket[0] + WINDOW - now)
        return 0.0


def judge(request: Reserve, window: Window, parallel: int,
          budgets: list[tuple[Budget, float, float]]) -> Verdict:
    """The one decision both backends make, from what they read inside their atomic step.

    budgets: (budget, spend in its period, reserved now) for each budget of the request."""
    now = request.now
    verdict = Verdict(ok=True, requests=window.requests, tokens=window.tokens,
                      requests_reset=window.reset(now, 1), tokens_reset=window.reset(now, 2))
    if request.max_parallel and request.stream and parallel >= request.max_parallel:
        return _refuse(verdict, "rate_limit_exceeded", f"max_parallel ({request.max_parallel} streams) reached", 1.0)
    if request.rpm and window.requests + 1 > request.rpm:
        wait = window.free_after(now, 1, window.requests, 1, request.rpm)
        return _refuse(verdict, "rate_limit_exceeded", f"rpm limit ({request.rpm} requests per minute) reached", wait)
    if request.tpm and window.tokens + request.tokens > request.tpm:
        wait = window.free_after(now, 2, window.tokens, request.tokens, request.tpm)
        return _refuse(verdict, "rate_limit_exceeded",
                       f"tpm limit ({request.tpm} tokens per minute) reached: this request reserves "
                       f"{request.tokens} tokens", wait)
    for budget, spend, reserved in budgets:
        if spend >= request.kill_at * budget.limit_usd or spend + reserved + request.usd > budget.limit_usd:
            what = "the global" if budget.scope == "global" else budget.scope.replace(":", " ", 1) + "'s"
            return _refuse(verdict, "budget_exceeded",
                           f"{what} budget ({budget.limit_usd:g} USD per {_period_name(budget.period)}) is "
                           f"spent up to its limit (spent {spend:.6f}, reserved {reserved:.6f}, this request "
                           f"needs up to {request.usd:.6f})", seconds_to_period_end(budget.period, now))
        if budget.scope.startswith("key:"):
            verdict.remaining_usd = budget.limit_usd - spend - reserved - request.usd
    verdict.requests += 1
    verdict.tokens += request.tokens
    if verdict.requests == 1:
        verdict.requests_reset = WINDOW
    if verdict.tokens == request.tokens:
        verdict.tokens_reset = WINDOW
    return verdict


def _period_name(period: str) -> str:
    return {"d": "day", "m": "month"}.get(period[:1], "all time") if period != "total" else "all time"


def _refuse(verdict: Verdict, code: str, reason: str, wait: float) -> Verdict:
    verdict.ok, verdict.code, verdict.reason, verdict.retry_after = False, code, reason, wait
    return verdict
