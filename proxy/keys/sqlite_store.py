"""The embedded store: one SQLite file (WAL), one writer thread per process.

Rules:
- sqlite3 never runs on the event loop. Each process owns one connection, used by one thread;
  the event loop hands it operations through a queue and is woken with the result
  (`TrioToken.run_sync_soon`). The thread takes everything queued (up to MAX_BATCH operations)
  and runs it in one `BEGIN IMMEDIATE` transaction: one commit for many requests under load.
- BEGIN IMMEDIATE takes the database's write lock before reading, so a reserve's check and its
  write are one step across every process on the file (`serve --workers N`): that is the single
  writer discipline. Other processes wait for the lock (busy_timeout), they never read stale
  budgets. WAL keeps readers (the CLI) from blocking writers; synchronous=NORMAL (no fsync per
  commit: a power cut may lose the last commits, never corrupt the file).
- Settles (fire and forget) wait in a deque without waking the thread; they join the next
  transaction, at the latest SETTLE_EVERY (50 ms) later: one commit for all of them, their spend
  summed per counter and spend row before it is written (`_settle_all`). A reserve
  holds a request, so it wakes the thread at once.
- Both queues are bounded by MAX_QUEUE operations (about 200 bytes each): a settle that finds its
  full is logged and dropped rather than block; a reserve that finds it full is a 503.
- A failing commit (disk full, file gone, lock held past busy_timeout) fails every operation of
  its transaction with StoreUnavailable; its settles are tried once more, then logged as lost.
- Schema changes are numbered migrations, applied in order at open (`meta.schema_version`).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Any, Callable

import orjson
import trio

from proxy.core.errors import StoreUnavailable
from proxy.keys.records import KeyRecord
from proxy.keys.store import (WINDOW, Budget, BudgetAsk, Grant, RateAsk, Reserve, Settle, SlotAsk, SpendRow,
                              Verdict, Window, budget_grant, day_of, judge, rate_grant, slot_grant, spend_periods)

log = logging.getLogger("proxy.keys.sqlite")

MAX_BATCH = 256        # awaited operations (reserves, reads, key changes) per transaction
SETTLE_EVERY = 0.05    # seconds a settle may wait for a transaction (spend shows this late, at most)
MAX_QUEUE = 100_000
BUSY_TIMEOUT_MS = 5000
LOG_EVERY = 30.0  # seconds between error lines while the store stays unavailable

MIGRATIONS: list[str] = [
    # 1: keys, limits, budgets, spend
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta VALUES ('keys_version', 0);
    CREATE TABLE keys (
        id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, name TEXT NOT NULL,
        team TEXT, models TEXT, rpm INTEGER, tpm INTEGER, max_parallel INTEGER, budget_usd REAL,
        budget_period TEXT NOT NULL, expires_at REAL, metadata TEXT NOT NULL, created_at REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE windows (key_id TEXT NOT NULL, second INTEGER NOT NULL, requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL, PRIMARY KEY (key_id, second)) WITHOUT ROWID;
    CREATE TABLE reservations (id TEXT PRIMARY KEY, owner TEXT NOT NULL, key_id TEXT NOT NULL,
        second INTEGER NOT NULL, tokens INTEGER NOT NULL, usd REAL NOT NULL, stream INTEGER NOT NULL,
        scopes TEXT NOT NULL);
    CREATE INDEX reservations_key ON reservations (key_id, stream);
    CREATE INDEX reservations_owner ON reservations (owner);
    CREATE TABLE reserved (scope TEXT PRIMARY KEY, usd REAL NOT NULL) WITHOUT ROWID;
    CREATE TABLE counters (scope TEXT NOT NULL, period TEXT NOT NULL, spend REAL NOT NULL,
        PRIMARY KEY (scope, period)) WITHOUT ROWID;
    CREATE TABLE spend (day TEXT NOT NULL, key_id TEXT NOT NULL, team TEXT NOT NULL, model TEXT NOT NULL,
        spend_usd REAL NOT NULL, requests INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL, PRIMARY KEY (day, key_id, team, model)) WITHOUT ROWID;
    CREATE TABLE owners (owner TEXT PRIMARY KEY, seen REAL NOT NULL);
    """,
]

_KEY_COLUMNS = ("id", "hash", "prefix", "name", "team", "models", "rpm", "tpm", "max_parallel", "budget_usd",
                "budget_period", "expires_at", "metadata", "created_at", "revoked")
_STOP = object()
_WAKE = object()  # the first settle after an idle spell: the thread starts its SETTLE_EVERY wait


class SqliteStore:
    def __init__(self, path: str):
        self.path = path
        self._queue: queue.Queue = queue.Queue(MAX_QUEUE)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._settles: collections.deque[tuple[Settle, int]] = collections.deque()  # (settle, attempt)
        self._logged_at = -LOG_EVERY

    # -- the writer thread --

    async def open(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._run, name="keys-sqlite", daemon=True)
        self._thread.start()
        await self._call(_migrate)

    async def aclose(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await trio.to_thread.run_sync(self._thread.join)
        self._thread = None

    def _connect(self) -> sqlite3.Connection:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        stopping = False
        while not stopping:
            # Settles wait in their deque (no wake-up per settle) until an awaited operation comes
            # or SETTLE_EVERY passes: then everything goes in one transaction. With no settle
            # waiting the thread sleeps until an operation or the next settle (_WAKE) comes: an
            # idle gateway wakes it not at all (was 20 times a second).
            try:
                batch = [self._queue.get(timeout=SETTLE_EVERY if self._settles else None)]
            except queue.Empty:
                batch = []
            if batch == [_WAKE]:
                continue  # settles are waiting now: give them SETTLE_EVERY to gather
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch or _WAKE in batch:
                stopping = _STOP in batch
                batch = [item for item in batch if item is not _STOP and item is not _WAKE]
            # Settles after the awaited operations, and only once those are all taken: a settle
            # never runs before the reserve it releases (queued before it).
            full = len(batch) == MAX_BATCH
            settles = [] if full else [self._settles.popleft() for _ in range(len(self._settles))]
            if settles:  # one operation: their spend summed per counter and row (see _settle_all)
                batch.append((_settle_all, ([settle for settle, _ in settles],), 0))
            leased = _leased(settle for settle, _ in settles)
            if leased is not None:  # after the settles: one statement per lease, not per request
                batch.append((_lease_settles, leased, 0))
            if not batch:
                continue
            try:
                if conn is None:
                    conn = self._connect()
                results = self._transaction(conn, batch)
            except (sqlite3.Error, OSError) as e:
                now = time.monotonic()
                if now - self._logged_at > LOG_EVERY:  # a store that stays down logs twice a minute
                    self._logged_at = now
                    log.error("state store %s: %s (%d operations failed)", self.path, e, len(batch))
                if conn is not None:
                    try:
                        conn.close()
                    except sqlite3.Error:
                        pass
                conn = None  # reconnect next time: the file may be back
                failure = StoreUnavailable(f"the key and spend store is unavailable ({type(e).__name__})")
                results = [(False, failure)] * len(batch)
                for settle, attempt in settles:  # a settle is tried twice, then logged as lost
                    if attempt == 1:
                        self._settles.append((settle, 2))
                    else:
                        log.error("state store: spend of %.6f USD for %s lost", settle.cost_usd, settle.key_id)
            answers = [(done, result) for (fn, args, done), result in zip(batch, results) if callable(done)]
            if answers:  # one wake-up of the event loop for the whole batch
                try:
                    assert self._token is not None
                    self._token.run_sync_soon(_deliver, answers)
                except trio.RunFinishedError:
                    pass
        if conn is not None:
            conn.close()

    @staticmethod
    def _transaction(conn: sqlite3.Connection, batch: list) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn, args, done in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, fn(conn, *args)))
                    conn.execute("RELEASE op")
                except sqlite3.OperationalError:
                    raise
                except Exception as e:  # a bug in one operation: undo it alone, keep the batch
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    log.exception("state store operation %s failed", getattr(fn, "__name__", fn))
                    results.append((False, StoreUnavailable(f"state store operation failed: {type(e).__name__}")))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None or self._token is None:
            raise StoreUnavailable("the key and spend store is not open")
        done = trio.Event()
        box: list[tuple[bool, Any]] = []

        def deliver(ok: bool, value: Any) -> None:  # on the event loop (see _deliver)
            box.append((ok, value))
            done.set()

        try:
            self._queue.put_nowait((fn, args, deliver))
        except queue.Full:
            raise StoreUnavailable("the key and spend store is overloaded (its queue is full)") from None
        await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    # -- the Store protocol --

    async def version(self) -> int:
        return await self._call(_version)

    async def load_keys(self) -> tuple[int, list[KeyRecord]]:
        return await self._call(_load_keys)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._call(_get_key, key_id)

    async def put_key(self, record: KeyRecord) -> None:
        await self._call(_put_key, record)

    async def reserve(self, request: Reserve) -> Verdict:
        return await self._call(_reserve, request)

    def settle_nowait(self, settle: Settle) -> None:
        if len(self._settles) < MAX_QUEUE:
            if not self._settles:  # the thread may be asleep with nothing to wait for: wake it
                try:                # (only this loop appends; only the thread empties)
                    self._queue.put_nowait(_WAKE)
                except queue.Full:
                    pass  # the thread has work queued: it looks at the settles when done
            self._settles.append((settle, 1))  # thread-safe, no lock, no wake-up: the thread looks
        else:
            log.error("state store queue full: spend of %.6f USD for %s not recorded", settle.cost_usd,
                      settle.key_id)

    async def flush(self) -> None:
        """Returns once everything queued before it is committed."""
        await self._call(_version)

    async def spend(self, group_by: str, first_day: str, last_day: str) -> list[SpendRow]:
        return await self._call(_spend, group_by, first_day, last_day)

    async def scope_spend(self, scope: str, period: str) -> float:
        return await self._call(_scope_spend, scope, period)

    async def heartbeat(self, owner: str, now: float, stale_after: float) -> int:
        return await self._call(_heartbeat, owner, now, stale_after)

    async def lease(self, owner: str, now: float, asks: list[BudgetAsk | RateAsk | SlotAsk]) -> list[Grant]:
        return await self._call(_lease, owner, now, asks)


def _deliver(answers: list[tuple[Callable[[bool, Any], None], tuple[bool, Any]]]) -> None:
    for deliver, (ok, value) in answers:
        deliver(ok, value)


# -- operations: run in the writer thread, inside its transaction --

def _migrate(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    current = row[0] if row else 0
    if row is None:
        conn.execute("INSERT INTO schema_version VALUES (0)")
    for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = ?", (number,))
        log.info("state store: schema migrated to version %d", number)
    return len(MIGRATIONS)


def _version(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()[0]


def _row(columns: tuple[str, ...], values: tuple) -> dict[str, Any]:
    return dict(zip(columns, values))


def _load_keys(conn: sqlite3.Connection) -> tuple[int, list[KeyRecord]]:
    rows = conn.execute(f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys").fetchall()
    return _version(conn), [KeyRecord.from_row(_row(_KEY_COLUMNS, r)) for r in rows]


def _get_key(conn: sqlite3.Connection, key_id: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys WHERE id = ?", (key_id,)).fetchone()
    return None if row is None else KeyRecord.from_row(_row(_KEY_COLUMNS, row))


def _put_key(conn: sqlite3.Connection, record: KeyRecord) -> None:
    row = record.to_row()
    conn.execute(f"INSERT OR REPLACE INTO keys ({', '.join(_KEY_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(_KEY_COLUMNS))})", [row[c] for c in _KEY_COLUMNS])
    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_version'")


def _reserve(conn: sqlite3.Connection, request: Reserve) -> Verdict:
    now_s = int(request.now)
    window = Window()
    if request.rpm or request.tpm:
        window.buckets = conn.execute(
            "SELECT second, requests, tokens FROM windows WHERE key_id = ? AND second > ? ORDER BY second",
            (request.key_id, now_s - WINDOW)).fetchall()
        window.requests = sum(b[1] for b in window.buckets)
        window.tokens = sum(b[2] for b in window.buckets)
    parallel = 0
    if request.max_parallel and request.stream:  # a stream's row counts 1, a slot lease's its slots
        parallel = conn.execute("SELECT COALESCE(SUM(stream), 0) FROM reservations WHERE key_id = ? AND stream > 0",
                                (request.key_id,)).fetchone()[0]
    budgets: list[tuple[Budget, float, float]] = []
    for budget in request.budgets:
        spend = conn.execute("SELECT spend FROM counters WHERE scope = ? AND period = ?",
                             (budget.scope, budget.period)).fetchone()
        reserved = conn.execute("SELECT usd FROM reserved WHERE scope = ?", (budget.scope,)).fetchone()
        budgets.append((budget, spend[0] if spend else 0.0, max(0.0, reserved[0]) if reserved else 0.0))
    verdict = judge(request, window, parallel, budgets)
    if not verdict.ok:
        if parallel and parallel >= (request.max_parallel or 0):
            verdict.leased_elsewhere = conn.execute(
                "SELECT COALESCE(SUM(stream), 0) FROM reservations WHERE key_id = ? AND stream > 0 "
                "AND id LIKE 's%' AND owner != ?", (request.key_id, request.owner)).fetchone()[0]
        return verdict
    scopes = [b.scope for b in request.budgets]
    conn.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (request.id, request.owner, request.key_id, now_s, request.tokens, request.usd,
                  int(request.stream), orjson.dumps(scopes).decode()))
    if request.rpm or request.tpm:
        conn.execute("INSERT INTO windows VALUES (?, ?, 1, ?) ON CONFLICT (key_id, second) DO UPDATE "
                     "SET requests = requests + 1, tokens = tokens + excluded.tokens",
                     (request.key_id, now_s, request.tokens))
        if not window.buckets or window.buckets[-1][0] != now_s:  # a new bucket: at most once a second
            conn.execute("DELETE FROM windows WHERE key_id = ? AND second <= ?", (request.key_id, now_s - WINDOW))
    if scopes:
        conn.executemany("INSERT INTO reserved VALUES (?, ?) ON CONFLICT (scope) DO UPDATE "
                         "SET usd = usd + excluded.usd", [(scope, request.usd) for scope in scopes])
    return verdict


def _release(conn: sqlite3.Connection, reservation: str) -> tuple[int, int] | None:
    """Drop a reservation and its hold on the budgets; returns its (second, tokens) or None."""
    row = conn.execute("DELETE FROM reservations WHERE id = ? RETURNING second, tokens, usd, scopes",
                       (reservation,)).fetchone()
    if row is None:
        return None
    second, tokens, usd, scopes = row
    if scopes != "[]":
        conn.executemany("UPDATE reserved SET usd = usd - ? WHERE scope = ?",
                         [(usd, scope) for scope in orjson.loads(scopes)])
    return second, tokens


_COUNTERS = ("INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (scope, period) DO UPDATE "
             "SET spend = spend + excluded.spend")
_SPEND = ("INSERT INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, key_id, team, model) "
          "DO UPDATE SET spend_usd = spend_usd + excluded.spend_usd, requests = requests + excluded.requests, "
          "input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens")


def _settle_all(conn: sqlite3.Connection, settles: list[Settle]) -> None:
    """A transaction's settles: each reservation released alone, the spend summed per counter and
    per spend row first (one upsert each instead of ~7 statements per settle: at 600 requests a
    second, ~20 settles a transaction, the writer thread's CPU per request drops by about half).
    A bug in the summing undoes it and falls back to one settle at a time (each alone)."""
    conn.execute("SAVEPOINT settles")
    try:
        counters: dict[tuple[str, str], float] = {}
        rows: dict[tuple[str, str, str, str], list] = {}
        for settle in settles:
            _release_settled(conn, settle)
            if settle.cost_usd or settle.scopes:
                for scope in settle.scopes:
                    for period in spend_periods(settle.now):
                        counters[(scope, period)] = counters.get((scope, period), 0.0) + settle.cost_usd
            row = rows.get(where := (day_of(settle.now), settle.key_id, settle.team or "", settle.model))
            if row is None:
                rows[where] = [settle.cost_usd, 1, settle.input_tokens, settle.output_tokens]
            else:
                row[0] += settle.cost_usd
                row[1] += 1
                row[2] += settle.input_tokens
                row[3] += settle.output_tokens
        conn.executemany(_COUNTERS, [(scope, period, usd) for (scope, period), usd in counters.items()])
        conn.executemany(_SPEND, [(*where, *row) for where, row in rows.items()])
        conn.execute("RELEASE settles")
    except sqlite3.OperationalError:
        raise
    except Exception:  # noqa: BLE001 - a bug: one at a time, so one bad settle loses only itself
        conn.execute("ROLLBACK TO settles")
        conn.execute("RELEASE settles")
        log.exception("state store: summed settles failed; settling one at a time")
        for settle in settles:
            conn.execute("SAVEPOINT one")
            try:
                _settle(conn, settle)
                conn.execute("RELEASE one")
            except sqlite3.OperationalError:
                raise
            except Exception:  # noqa: BLE001
                conn.execute("ROLLBACK TO one")
                conn.execute("RELEASE one")
                log.exception("state store: spend of %.6f USD for %s lost", settle.cost_usd, settle.key_id)


def _release_settled(conn: sqlite3.Connection, settle: Settle) -> None:
    """The settle's reservation goes; the window counted its reserved tokens, now the real ones."""
    if settle.reservation is None:
        return
    held = _release(conn, settle.reservation)
    if held is not None:
        used = settle.input_tokens + settle.output_tokens
        if used != held[1]:
            conn.execute("UPDATE windows SET tokens = MAX(0, tokens + ?) WHERE key_id = ? AND second = ?",
                         (used - held[1], settle.key_id, held[0]))


def _settle(conn: sqlite3.Connection, settle: Settle) -> None:
    """One settle alone (the fallback of _settle_all)."""
    _release_settled(conn, settle)
    if settle.cost_usd or settle.scopes:
        conn.executemany(_COUNTERS, [(scope, period, settle.cost_usd) for scope in settle.scopes
                                     for period in spend_periods(settle.now)])
    conn.execute(_SPEND, (day_of(settle.now), settle.key_id, settle.team or "", settle.model, settle.cost_usd, 1,
                          settle.input_tokens, settle.output_tokens))


def _spend(conn: sqlite3.Connection, group_by: str, first_day: str, last_day: str) -> list[SpendRow]:
    column = {"key": "key_id", "team": "team", "model": "model"}[group_by]
    rows = conn.execute(f"SELECT {column}, SUM(spend_usd), SUM(requests), SUM(input_tokens), "
                        f"SUM(output_tokens) FROM spend WHERE day >= ? AND day <= ? GROUP BY {column} "
                        f"ORDER BY SUM(spend_usd) DESC", (first_day, last_day)).fetchall()
    return [SpendRow(group or None, *rest) for group, *rest in rows]  # type: ignore[arg-type]


def _scope_spend(conn: sqlite3.Connection, scope: str, period: str) -> float:
    row = conn.execute("SELECT spend FROM counters WHERE scope = ? AND period = ?", (scope, period)).fetchone()
    return row[0] if row else 0.0


def _heartbeat(conn: sqlite3.Connection, owner: str, now: float, stale_after: float) -> int:
    """Mark this process alive; release the reservations of processes gone for stale_after."""
    conn.execute("INSERT INTO owners VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET seen = excluded.seen",
                 (owner, now))
    gone = [row[0] for row in conn.execute("SELECT owner FROM owners WHERE seen < ?", (now - stale_after,))]
    released = 0
    for dead in gone:
        for (reservation,) in conn.execute("SELECT id FROM reservations WHERE owner = ?", (dead,)).fetchall():
            _release(conn, reservation)
            released += 1
        conn.execute("DELETE FROM owners WHERE owner = ?", (dead,))
    if released:
        log.warning("state store: released %d reservations of %d processes not seen for %.0f s",
                    released, len(gone), stale_after)
    return released


def _lease(conn: sqlite3.Connection, owner: str, now: float, asks: list[BudgetAsk | RateAsk | SlotAsk]) -> list[Grant]:
    return [_lease_budget(conn, owner, ask) if isinstance(ask, BudgetAsk) else
            _lease_slots(conn, owner, ask) if isinstance(ask, SlotAsk) else _lease_rate(conn, now, ask)
            for ask in asks]


def _lease_slots(conn: sqlite3.Connection, owner: str, ask: SlotAsk) -> Grant:
    """A slot lease is a reservation row of the key whose `stream` is its number of slots."""
    row = conn.execute("SELECT stream FROM reservations WHERE id = ?", (ask.id,)).fetchone()
    if row is not None and ask.close:
        conn.execute("DELETE FROM reservations WHERE id = ?", (ask.id,))
        return Grant()
    if row is None and not ask.fresh and not ask.close:
        return Grant(lost=True)
    if row is not None and ask.back > 0:
        conn.execute("UPDATE reservations SET stream = MAX(0, stream - ?) WHERE id = ?", (ask.back, ask.id))
    if ask.close or ask.want <= 0:
        return Grant()
    in_use = conn.execute("SELECT COALESCE(SUM(stream), 0) FROM reservations WHERE key_id = ? AND stream > 0",
                          (ask.key_id,)).fetchone()[0]
    grant = slot_grant(ask, in_use)
    if grant:
        conn.execute("INSERT INTO reservations VALUES (?, ?, ?, 0, 0, 0.0, ?, '[]') ON CONFLICT (id) DO UPDATE "
                     "SET stream = stream + excluded.stream", (ask.id, owner, ask.key_id, grant))
    return Grant(slots=grant)


def _lease_budget(conn: sqlite3.Connection, owner: str, ask: BudgetAsk) -> Grant:
    scope = ask.budget.scope
    row = conn.execute("SELECT usd FROM reservations WHERE id = ?", (ask.id,)).fetchone()
    if row is not None and (ask.back > 0 or ask.close):
        back = row[0] if ask.close else min(ask.back, row[0])
        if ask.close:
            conn.execute("DELETE FROM reservations WHERE id = ?", (ask.id,))
            row = None
        else:
            conn.execute("UPDATE reservations SET usd = usd - ? WHERE id = ?", (back, ask.id))
        conn.execute("UPDATE reserved SET usd = usd - ? WHERE scope = ?", (back, scope))
    if row is None and not ask.fresh and not ask.close:
        return Grant(lost=True)
    spend = conn.execute("SELECT spend FROM counters WHERE scope = ? AND period = ?",
                         (scope, ask.budget.period)).fetchone()
    reserved = conn.execute("SELECT usd FROM reserved WHERE scope = ?", (scope,)).fetchone()
    spent, held = spend[0] if spend else 0.0, max(0.0, reserved[0]) if reserved else 0.0
    grant = budget_grant(ask, spent, held)
    if grant > 0:
        conn.execute("INSERT INTO reservations VALUES (?, ?, ?, 0, 0, ?, 0, ?) ON CONFLICT (id) DO UPDATE "
                     "SET usd = usd + excluded.usd", (ask.id, owner, scope, grant, orjson.dumps([scope]).decode()))
        conn.execute("INSERT INTO reserved VALUES (?, ?) ON CONFLICT (scope) DO UPDATE SET usd = usd + excluded.usd",
                     (scope, grant))
    return Grant(usd=grant, spend=spent, reserved=held + grant)


def _lease_rate(conn: sqlite3.Connection, now: float, ask: RateAsk) -> Grant:
    now_s = int(now)
    if ask.back_requests or ask.back_tokens:
        conn.execute("UPDATE windows SET requests = MAX(0, requests - ?), tokens = MAX(0, tokens - ?) "
                     "WHERE key_id = ? AND second = ?",
                     (ask.back_requests, ask.back_tokens, ask.key_id, ask.back_second))
    requests, tokens = conn.execute("SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(tokens), 0) FROM windows "
                                    "WHERE key_id = ? AND second > ?", (ask.key_id, now_s - WINDOW)).fetchone()
    r, t = rate_grant(ask, requests, tokens)
    if r or t:
        conn.execute("INSERT INTO windows VALUES (?, ?, ?, ?) ON CONFLICT (key_id, second) DO UPDATE "
                     "SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens",
                     (ask.key_id, ask.second, r, t))
        conn.execute("DELETE FROM windows WHERE key_id = ? AND second <= ?", (ask.key_id, now_s - WINDOW))
    return Grant(requests=r, tokens=t, window_requests=requests + r, window_tokens=tokens + t)


def _leased(settles: Any) -> tuple[dict[str, float], dict[tuple[str, int], int]] | None:
    """What the settles of leased requests change, summed: each lease's hold shrinks by the costs
    (which the same transaction adds to the spend), each rate lease's bucket gets the real tokens."""
    costs: dict[str, float] = {}
    tokens: dict[tuple[str, int], int] = {}
    for settle in settles:
        for lease in settle.leases:
            costs[lease] = costs.get(lease, 0.0) + settle.cost_usd
        if settle.reservation is None and settle.window is not None:
            where = (settle.key_id, settle.window[0])
            tokens[where] = tokens.get(where, 0) + settle.input_tokens + settle.output_tokens - settle.window[1]
    return (costs, tokens) if costs or tokens else None


def _lease_settles(conn: sqlite3.Connection, costs: dict[str, float], tokens: dict[tuple[str, int], int]) -> None:
    for lease, cost in costs.items():
        row = conn.execute("SELECT usd, key_id FROM reservations WHERE id = ?", (lease,)).fetchone()
        if row is not None and cost > 0:  # gone (closed, or released as stale): the spend alone counts
            take = min(row[0], cost)
            conn.execute("UPDATE reservations SET usd = usd - ? WHERE id = ?", (take, lease))
            conn.execute("UPDATE reserved SET usd = usd - ? WHERE scope = ?", (take, row[1]))
    for (key_id, second), change in tokens.items():
        if change:
            conn.execute("UPDATE windows SET tokens = MAX(0, tokens + ?) WHERE key_id = ? AND second = ?",
                         (change, key_id, second))
