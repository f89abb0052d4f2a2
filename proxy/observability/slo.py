"""SLOs measured at the edge: availability, latency and cost per request, with error budgets and
burn rates, from the gateway's own counts (GET /admin/slo).

Rules:
- Counted at settle from the same exchange the metrics see, only for model requests (chat,
  messages, embeddings), with the same definitions as the Prometheus rules (deploy/prometheus):
    availability  total: requests not answered 4xx (a client's fault is not ours);
                  bad: 5xx, or a stream that failed after its first byte (status 200, outcome error)
    latency       total: streams that relayed a first token, and plain answers served (status < 400,
                  outcome ok); good: TTFT (streams) or the whole answer (plain) <= latency_threshold
    cost          priced requests (x.cost_usd set by the keys feature) and their USD
- Error budget remaining = 1 - (bad share over the window) / (1 - objective); burn rate over 1 h,
  6 h, 3 d = bad share in that window / (1 - objective): 1 spends the budget exactly over the
  window, 14.4 over 1 h spends 2 % of a 30-day budget. Cost: remaining = 1 - mean / objective,
  burn = mean over the window / objective.
- Counts are per wall-clock minute. With [state] on (SQLite), a minute's counts go to the table
  `slo_minutes` of [state] path every FLUSH_EVERY seconds and at shutdown, in a thread; each worker
  adds its own counts (upsert), so the table is the whole server's and survives restarts; rows older
  than the window are deleted. A reader sees the table plus its own worker's unflushed minute (other
  workers' last < FLUSH_EVERY s are not in it yet). Unflushed minutes are bounded (MAX_PENDING: the
  oldest go first, logged) if the file cannot be written. Without [state]: minutes kept in memory for
  the window, at most window_days * 1440 of them (about 6 MB for 30 days), lost at restart.
  Why not from Prometheus recording rules: /admin/slo and the dashboard must answer without a
  Prometheus server; the shipped rules compute the same SLIs for alerting.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import trio

from proxy.config import Config
from proxy.server.asgi import send_json
from proxy.server.exchange import Exchange

if TYPE_CHECKING:
    from proxy.server.app import Gateway

log = logging.getLogger("proxy.observability.slo")

MINUTE = 60
BURN_WINDOWS = {"1h": 60, "6h": 360, "3d": 3 * 1440}  # in minutes
FLUSH_EVERY = 30.0
MAX_PENDING = 1440  # unflushed minutes kept when the file cannot be written (a day)
TABLE = "slo_minutes"
FIELDS = ("total", "bad", "latency_total", "latency_good", "priced", "cost_usd")


@dataclass(slots=True)
class Counts:
    total: int = 0          # availability: requests that count
    bad: int = 0
    latency_total: int = 0
    latency_good: int = 0
    priced: int = 0
    cost_usd: float = 0.0

    def add(self, other: "Counts") -> None:
        for name in FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def row(self) -> tuple:
        return tuple(getattr(self, name) for name in FIELDS)


def count(x: Exchange, threshold: float, now: float) -> Counts | None:
    """What one settled request adds (None: not a model request)."""
    if x.model == "-" or x.endpoint == "-":
        return None
    c = Counts()
    failed_midway = x.status < 400 and x.outcome.startswith("error")
    if not 400 <= x.status < 500:
        c.total = 1
        c.bad = int(x.status >= 500 or failed_midway)
    if x.first_token_at is not None:
        c.latency_total, c.latency_good = 1, int(x.first_token_at - x.started <= threshold)
    elif not x.stream and x.status < 400 and x.outcome == "ok":
        c.latency_total, c.latency_good = 1, int(now - x.started <= threshold)
    if x.cost_usd is not None:
        c.priced, c.cost_usd = 1, x.cost_usd
    return c


def report(config: Config, windows: dict[str, Counts]) -> dict[str, Any]:
    """The /admin/slo body from the counts over the SLO window ("window") and each burn window."""
    slo = config.slo
    whole = windows["window"]

    def ratio_objective(name: str, objective: float, bad: Callable[[Counts], int],
                        total: Callable[[Counts], int], **extra: Any) -> dict[str, Any]:
        budget = 1.0 - objective

        def bad_share(c: Counts) -> float:
            return bad(c) / total(c) if total(c) else 0.0

        return {"name": name, "objective": objective, **extra,
                "sli": round(1.0 - bad_share(whole), 6), "events": total(whole), "bad_events": bad(whole),
                "error_budget_remaining": round(1.0 - bad_share(whole) / budget, 6),
                "burn_rate": {w: round(bad_share(windows[w]) / budget, 4) for w in BURN_WINDOWS}}

    def mean_cost(c: Counts) -> float:
        return c.cost_usd / c.priced if c.priced else 0.0

    objective = slo.cost_per_request
    return {
        "window": f"{slo.window_days}d",
        "objectives": [
            ratio_objective("availability", slo.availability, lambda c: c.bad, lambda c: c.total),
            ratio_objective("latency", slo.latency_objective, lambda c: c.latency_total - c.latency_good,
                            lambda c: c.latency_total, threshold_seconds=slo.latency_threshold),
            {"name": "cost_per_request", "objective": objective, "sli": round(mean_cost(whole), 6),
             "events": whole.priced, "spend_usd": round(whole.cost_usd, 6),
             "error_budget_remaining": round(1.0 - mean_cost(whole) / objective, 6),
             "burn_rate": {w: round(mean_cost(windows[w]) / objective, 4) for w in BURN_WINDOWS}},
        ],
    }


class MinuteStore:
    """The SQLite table of per-minute counts. Blocking: call from a thread."""

    def __init__(self, path: str):
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (minute INTEGER PRIMARY KEY, total INTEGER NOT NULL, "
                   "bad INTEGER NOT NULL, latency_total INTEGER NOT NULL, latency_good INTEGER NOT NULL, "
                   "priced INTEGER NOT NULL, cost_usd REAL NOT NULL)")
        return db

    def add(self, minutes: dict[int, Counts], keep_after: int) -> None:
        db = self._connect()
        try:
            with db:
                db.executemany(
                    f"INSERT INTO {TABLE} (minute, {', '.join(FIELDS)}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(minute) DO UPDATE SET "
                    + ", ".join(f"{f} = {f} + excluded.{f}" for f in FIELDS),
                    [(minute, *c.row()) for minute, c in minutes.items()])
                db.execute(f"DELETE FROM {TABLE} WHERE minute < ?", (keep_after,))
        finally:
            db.close()

    def sums(self, since: dict[str, int]) -> dict[str, Counts]:
        db = self._connect()
        try:
            out = {}
            for name, first in since.items():
                row = db.execute(f"SELECT {', '.join(f'COALESCE(SUM({f}), 0)' for f in FIELDS)} FROM {TABLE} "
                                 "WHERE minute >= ?", (first,)).fetchone()
                out[name] = Counts(*row)
            return out
        finally:
            db.close()


class SLOs:
    """The SLO policy (counts at settle) and GET /admin/slo."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time):
        self._config = config
        self._clock = clock
        self._threshold = config.slo.latency_threshold
        self._window = config.slo.window_days * 1440
        state = config.state
        persist = state.enabled and state.backend == "sqlite"
        self.store = MinuteStore(state.path) if persist else None
        # minute -> counts: unflushed minutes (with a store) or the whole window (without one).
        self.minutes: collections.OrderedDict[int, Counts] = collections.OrderedDict()
        self._flusher_started = False
        self._flush_lock = trio.Lock()

    async def admit(self, x: Exchange, request: Any) -> None:
        pass

    def settle(self, x: Exchange) -> None:
        now = self._clock()
        c = count(x, self._threshold, time.perf_counter())
        if c is None:
            return
        minute = int(now // MINUTE)
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = Counts()
            self._trim(minute)
        bucket.add(c)
        if self.store is not None and not self._flusher_started:
            self._flusher_started = True  # one per process, on its first request (after any fork)
            trio.lowlevel.spawn_system_task(self._flush_every)

    def _trim(self, minute: int) -> None:
        limit = MAX_PENDING if self.store is not None else self._window
        while self.minutes and (len(self.minutes) > limit or next(iter(self.minutes)) <= minute - self._window):
            dropped, _ = self.minutes.popitem(last=False)
            if self.store is not None:
                log.warning("slo: minute %d dropped unflushed (%s not writable?)", dropped, self.store.path)

    async def _flush_every(self) -> None:
        while True:
            await trio.sleep(FLUSH_EVERY)
            try:
                await self.flush()
            except Exception:  # a system task must not raise: that would end the whole server
                log.exception("slo: flush failed")

    async def flush(self) -> None:
        """Unflushed minutes to the table (in a thread); on failure they stay for the next try."""
        if self.store is None or not self.minutes:
            return
        async with self._flush_lock:
            pending, self.minutes = self.minutes, collections.OrderedDict()
            keep_after = int(self._clock() // MINUTE) - self._window
            try:
                await trio.to_thread.run_sync(self.store.add, dict(pending), keep_after)
            except Exception as e:  # a full disk must not end the gateway: keep the counts, say so
                log.warning("slo: cannot write %s: %s", self.store.path, e)
                for minute, counts in self.minutes.items():  # settled while we were writing
                    pending.setdefault(minute, Counts()).add(counts)
                self.minutes = pending

    async def windows(self) -> dict[str, Counts]:
        """Counts over the SLO window and each burn window: the table (if any) plus this process's."""
        current = int(self._clock() // MINUTE)
        since = {"window": current - self._window + 1, **{w: current - n + 1 for w, n in BURN_WINDOWS.items()}}
        if self.store is not None:
            out = await trio.to_thread.run_sync(self.store.sums, since)
        else:
            out = {name: Counts() for name in since}
        for minute, counts in list(self.minutes.items()):
            for name, first in since.items():
                if minute >= first:
                    out[name].add(counts)
        return out

    async def report(self) -> dict[str, Any]:
        return report(self._config, await self.windows())

    # -- GET /admin/slo --

    def routes(self, gateway: "Gateway") -> None:
        from proxy.server.app import Route

        gateway.add_route("/admin/slo", Route({"GET": self._admin_slo}, auth="admin", body=False))
        if self.store is not None:
            gateway.on_shutdown.append(self.flush)

    async def _admin_slo(self, x: Exchange, body: bytes, headers: Any, receive: Any, send: Any) -> None:
        await send_json(send, 200, await self.report(), x.response_headers)
