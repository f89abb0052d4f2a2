"""Where cache entries live: in this process (memory), in a SQLite file, or in Redis.

Every store keeps an entry until `expires` (the end of its stale-if-error window) and holds at most
`max_entries` entries: the least recently used go first. Memory and SQLite also hold at most
`max_bytes` of entries (sizes as `proxy/cache/entry.py` counts them); Redis bounds its memory
itself (`maxmemory` with an LRU policy: see README), the gateway bounds its entry count.

Rules: no store call blocks the event loop (SQLite runs in a worker thread, one connection behind
a lock; Redis is async); a store raises whatever its driver raises and the policy
(`proxy/cache/policy.py`) turns any failure into "no cache". A memory store holds `Entry`
objects (nothing to decode on a hit); the others hold the encoded bytes.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Any

import trio

from proxy.cache.entry import Entry

log = logging.getLogger("proxy.cache")


class MemoryStore:
    holds_bytes = False

    def __init__(self, max_entries: int, max_bytes: int, clock: Any = time.time):
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Entry, float, int]] = OrderedDict()  # entry, expires, size
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        pass

    async def get(self, key: str) -> Entry | None:
        return self.get_nowait(key)

    def get_nowait(self, key: str) -> Entry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return item[0]

    async def put(self, key: str, value: Entry, size: int, expires: float) -> None:
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (value, expires, size)
        self.bytes += size
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions += 1

    async def delete(self, key: str) -> None:
        if key in self._entries:
            self._remove(key)

    def _remove(self, key: str) -> None:
        self.bytes -= self._entries.pop(key)[2]


class SQLiteStore:
    """One table; `used` orders eviction (least recently used first).

    A miss costs no thread hop: the store keeps the set of keys the file holds (`might_have`),
    loaded by `run()` and kept current with what this process writes and, every KEYS_REFRESH
    seconds, with what other processes (workers) wrote; reloaded whole every KEYS_RELOAD seconds
    (dropping what others evicted). Bounded like the table (max_entries keys). A key another
    process wrote less than KEYS_REFRESH ago may still be a miss here: never a wrong answer."""

    holds_bytes = True
    KEYS_REFRESH = 1.0
    KEYS_RELOAD = 60.0
    # The value last: the bookkeeping columns are read without its overflow pages (a sum of sizes
    # over a table whose sizes came after the blobs read every blob: ~12 ms per write at 1,000 entries).
    SCHEMA = ("CREATE TABLE IF NOT EXISTS cache_entries (key TEXT PRIMARY KEY, size INTEGER NOT NULL, "
              "expires REAL NOT NULL, used REAL NOT NULL, value BLOB NOT NULL)",
              "CREATE INDEX IF NOT EXISTS cache_entries_used ON cache_entries (used)",
              "CREATE INDEX IF NOT EXISTS cache_entries_expires ON cache_entries (expires)")

    def __init__(self, path: str, max_entries: int, max_bytes: int):
        self._path = path
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._threads = trio.CapacityLimiter(2)
        self._keys: set[str] | None = None  # the keys in the file, as far as this process knows
        self.evictions = 0

    async def start(self) -> None:
        await self._run(lambda db: None)

    def might_have(self, key: str) -> bool:
        keys = self._keys
        return keys is None or key in keys

    async def run(self) -> None:
        """Keep the key set current (see the class docstring); on a failure, forget it (every
        lookup then asks the file, and the policy sees the file's failure)."""
        since, reloaded = 0.0, -math.inf
        while True:
            now = time.time()
            try:
                if now - reloaded >= self.KEYS_RELOAD or self._keys is None:
                    self._keys = await self._run(lambda db: {k for (k,) in db.execute(
                        "SELECT key FROM cache_entries WHERE expires > ?", (now,))})
                    reloaded = now
                else:
                    self._keys.update(await self._run(lambda db: [k for (k,) in db.execute(
                        "SELECT key FROM cache_entries WHERE used >= ?", (since,))]))
                since = now - 1.0  # a margin for commits that were slow to land
            except Exception:  # noqa: BLE001 - reported by the lookups that now reach the file
                self._keys = None
            await trio.sleep(self.KEYS_REFRESH)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, timeout=2.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")  # readers and the writer (and other workers) do not wait
        db.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last writes on power loss is fine
        for statement in self.SCHEMA:
            db.execute(statement)
        return db

    async def _run(self, work: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                if self._db is None:
                    self._db = self._connect()
                try:
                    return work(self._db)
                except sqlite3.DatabaseError:
                    self._db.close()  # reopened by the next call: the file may have been replaced
                    self._db = None
                    raise
        return await trio.to_thread.run_sync(locked, limiter=self._threads)

    async def get(self, key: str) -> bytes | None:
        def get(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT value, expires FROM cache_entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            now = time.time()
            if row[1] <= now:
                db.execute("DELETE FROM cache_entries WHERE key = ?", (key,))
                return None
            db.execute("UPDATE cache_entries SET used = ? WHERE key = ?", (now, key))
            return row[0]
        return await self._run(get)

    async def put(self, key: str, value: bytes, size: int, expires: float) -> None:
        def put(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR REPLACE INTO cache_entries (key, size, expires, used, value) "
                           "VALUES (?, ?, ?, ?, ?)", (key, size, expires, now, value))
                db.execute("DELETE FROM cache_entries WHERE expires <= ?", (now,))
                count, total = db.execute("SELECT count(*), total(size) FROM cache_entries").fetchone()
                while count > self._max_entries or total > self._max_bytes:
                    over = max(count - self._max_entries, 1)
                    rows = db.execute("SELECT key, size FROM cache_entries ORDER BY used LIMIT ?",
                                      (over,)).fetchall()
                    db.executemany("DELETE FROM cache_entries WHERE key = ?", [(k,) for k, _ in rows])
                    if self._keys is not None:
                        self._keys.difference_update(k for k, _ in rows)
                    count -= len(rows)
                    total -= sum(s for _, s in rows)
                    self.evictions += len(rows)
                db.execute("COMMIT")
                if self._keys is not None:
                    self._keys.add(key)
            except BaseException:
                db.execute("ROLLBACK")
                raise
        await self._run(put)

    async def delete(self, key: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM cache_entries WHERE key = ?", (key,)))
        if self._keys is not None:
            self._keys.discard(key)

    def __len__(self) -> int:  # tests and statistics; blocking, so never on the serving path
        with self._lock:
            if self._db is None:
                return 0
            return self._db.execute("SELECT count(*) FROM cache_entries").fetchone()[0]


class RedisStore:
    """Entries as `PREFIX + key` with a TTL; a sorted set `PREFIX + "lru"` (score: expiry) bounds
    their count. The client lives in `run()` (coredis clients are async context managers), which
    reconnects with backoff: while Redis is away every call raises and the cache is off."""

    holds_bytes = True

    def __init__(self, url: str, prefix: str, max_entries: int):
        import coredis

        self._client = coredis.Redis.from_url(url, decode_responses=False, connect_timeout=1.0,
                                              stream_timeout=1.0)
        self._prefix = prefix
        self._index = (prefix + "lru").encode()
        self._max_entries = max_entries
        self._ready = False
        self._tried = trio.Event()  # the first connection attempt is over (either way)
        self.evictions = 0

    async def run(self) -> None:
        """Hold the connection pool open; reopen it after a failure (backoff 0.5 s .. 10 s)."""
        delay = 0.5
        while True:
            try:
                async with self._client:
                    await self._client.ping()
                    self._ready, delay = True, 0.5
                    self._tried.set()
                    while True:  # a dead server ends the pool's tasks or fails this ping
                        await trio.sleep(5)
                        await self._client.ping()
            except Exception as e:  # noqa: BLE001 - any driver failure: retry later
                if self._ready:
                    log.warning("cache: redis connection lost (%s); the cache is off until it is back",
                                type(e).__name__)
            self._ready = False
            self._tried.set()
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _check(self) -> None:
        if not self._ready:
            await self._tried.wait()  # at start: the first requests wait for the first connection
            if not self._ready:
                raise ConnectionError("redis is not connected")

    async def start(self) -> None:
        pass

    async def get(self, key: str) -> bytes | None:
        await self._check()
        return await self._client.get(self._prefix + key)

    async def put(self, key: str, value: bytes, size: int, expires: float) -> None:
        await self._check()
        now = time.time()
        name = self._prefix + key
        await self._client.set(name, value, px=max(1, math.ceil((expires - now) * 1000)))
        await self._client.zadd(self._index, {name: expires})  # same TTL for all: the oldest first
        await self._client.zremrangebyscore(self._index, 0, now)  # expired: Redis dropped them
        over = await self._client.zcard(self._index) - self._max_entries
        if over > 0:
            oldest = await self._client.zpopmin(self._index, over)
            names = [member for member, _ in oldest] if oldest else []
            if names:
                await self._client.delete(names)
                self.evictions += len(names)

    async def delete(self, key: str) -> None:
        await self._check()
        await self._client.delete([self._prefix + key])
        await self._client.zrem(self._index, [self._prefix + key])
