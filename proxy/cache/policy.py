"""The response cache as a per-request policy (proxy/server/exchange.py): look up in `admit`,
record the answer on its way to the client, write it in `settle`.

    admit    the request's key (proxy/cache/key.py) is looked up unless the client said not to; a
             fresh entry answers (x.answer, `x-gateway-cache: hit`); an expired one still within
             stale_if_error waits in x.stale (served, as `stale`, if every provider fails before
             the first byte); else `miss`, and a stream gets a tap that records its chunks.
    settle   an answer that ended well (x.outcome "ok": nothing from a failed or cut stream) and
             was not itself from the cache goes to the writer through a bounded queue
             (`write_queue` items; when full the write is dropped and counted): the stream being
             relayed never waits for a store.

A store that fails (down, timing out, unreadable) turns the cache off for `RETRY_AFTER` seconds:
every request then goes upstream as if there were no cache, a WARNING says so (at most one per
`WARN_EVERY` seconds, with the count of failures) and `statistics().store_errors` counts them.
A corrupt entry is dropped and the request goes upstream. An answer larger than max_entry_bytes
is not cached (logged, counted); a recording holds at most max_entry_bytes / 32 reads of a stream
(`recorder`).
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from proxy.cache import key as keys
from proxy.cache.entry import CorruptEntry, Entry, Replay, chunks_size, decode, encode, flatten
from proxy.cache.stores import MemoryStore, RedisStore, SQLiteStore
from proxy.config import CacheConfig
from proxy.server.exchange import Exchange

log = logging.getLogger("proxy.cache")

RETRY_AFTER = 5.0       # seconds the cache stays off after a store failure
WARN_EVERY = 30.0       # seconds between WARNINGs about a failing store
LOOKUP_TIMEOUT = 0.5    # a lookup slower than this is a store failure (the request goes upstream)
DECODE_IN_THREAD = 64 * 1024  # entries larger than this are decoded off the event loop


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    hits: int
    misses: int
    stale: int
    writes: int
    dropped_writes: int  # the write queue was full
    too_large: int       # answers over max_entry_bytes, not cached
    corrupt: int         # entries that could not be read, dropped
    store_errors: int
    evictions: int
    entries: int | None  # None for stores that cannot say without a round trip
    queued: int


MIN_CHUNK_BYTES = 32  # no chunk a provider writes is smaller (`{"choices":[{"delta":{}}]}` and up)


def recorder(max_entry_bytes: int) -> deque:
    """A stream's tap: its batches of chunks, appended as relayed (a builtin call per read, ~25 ns).
    An answer that fits max_entry_bytes has fewer reads than `maxlen`; one with more is too large
    to cache and keeps only its last `maxlen` reads meanwhile (the bound on what it holds)."""
    return deque(maxlen=max_entry_bytes // MIN_CHUNK_BYTES + 1)


@dataclass(slots=True)
class Pending:
    """The cache's note on a request (x.notes["cache"])."""
    key: str
    write: bool
    recorder: deque | None = None  # the batches of a stream (see `recorder`)
    times: deque | None = None     # with replay = "original": when each batch was read (monotonic)


class ResponseCache:
    def __init__(self, config: CacheConfig, store: Any = None, clock: Any = time.time):
        self.config = config
        self.clock = clock  # wall-clock seconds: entries outlive a restart (and are shared)
        self.store = store if store is not None else make_store(config, clock)
        self._in_memory = type(self.store) is MemoryStore  # holds Entry objects, never fails
        self._might_have = getattr(self.store, "might_have", None)
        self._cache_all = config.mode == "all"
        self._paced = config.replay == "original"  # record each read's time, replay with its gaps
        self._window = config.ttl + config.stale_if_error  # an entry's whole life in the store
        self._send: trio.MemorySendChannel | None = None  # opened with the writer, at first use
        self._off_until = -math.inf  # trio time until which the store is not asked (it failed)
        self._warned_at = -math.inf
        self._unwarned = 0
        self._counts = dict.fromkeys(("hit", "miss", "stale", "writes", "dropped_writes", "too_large",
                                      "corrupt", "store_errors"), 0)

    # -- the policy --

    async def admit(self, x: Exchange, request: Any) -> None:
        if self._send is None:
            self._start()
        endpoint = x.endpoint
        if endpoint == "embeddings":
            body, extra, certain = request, None, True
        elif request.anthropic_body is not None:  # /v1/messages: the client's own body
            body, extra = request.anthropic_body, request.anthropic_beta
            certain = body.get("temperature") == 0
        else:
            body, extra = request.body, None
            certain = keys.deterministic(body)
        wanted = keys.directive(x.headers, self._cache_all, certain)  # a bad header: 400, no cache state
        x.cache = "miss"
        if not (wanted.read or wanted.write):
            return
        principal = x.principal
        key = keys.cache_key(keys.namespace(principal.team, principal.key_id), endpoint, x.model, body, extra)
        pending = x.notes["cache"] = Pending(key, wanted.write)
        if wanted.read and (entry := await self._lookup(key)) is not None:
            age = self.clock() - entry.stored_at
            if age < self.config.ttl:
                x.answer, x.cache = Replay(entry, self._paced), "hit"
                return
            if age < self._window:
                x.stale = Replay(entry, self._paced)
        if wanted.write and x.stream:
            pending.recorder = recorder(self.config.max_entry_bytes)
            x.taps.append(pending.recorder.append)
            if self._paced:  # and each read's time: a Python call and a clock read per read, only when asked
                pending.times = deque(maxlen=pending.recorder.maxlen)  # floats: no GC-tracked tuple per read
                append, now = pending.times.append, time.monotonic
                x.taps.append(lambda chunks: append(now()))

    def settle(self, x: Exchange) -> None:
        if x.cache is None:
            return
        self._counts[x.cache] += 1
        pending = x.notes.get("cache")
        if pending is None or not pending.write or x.cache != "miss" or x.outcome != "ok":
            return
        if x.stream:
            batches = pending.recorder
            if not batches:
                return
            if len(batches) == batches.maxlen:
                self._too_large(None)
                return
            entry = Entry(x.endpoint, self.clock(), chunks=batches, offsets=pending.times)  # flattened by the writer
        elif x.completion is not None:
            entry = Entry(x.endpoint, self.clock(), completion=x.completion)
        else:
            return
        if trio.current_time() < self._off_until:
            return
        try:
            self._send.send_nowait((pending.key, entry))
        except trio.WouldBlock:
            self._counts["dropped_writes"] += 1

    # -- reading --

    async def _lookup(self, key: str) -> Entry | None:
        if self._in_memory:  # cannot fail or wait: no deadline (a cancel scope costs ~10 us)
            return self.store.get_nowait(key)
        if self._might_have is not None and not self._might_have(key):
            return None  # a miss the store can tell without I/O
        if trio.current_time() < self._off_until:
            return None
        try:
            with trio.fail_after(LOOKUP_TIMEOUT):
                value = await self.store.get(key)
        except Exception as e:  # noqa: BLE001 - whatever the driver raises: no cache, not a failure
            self._failed("lookup", e)
            return None
        if value is None or isinstance(value, Entry):
            return value
        try:
            if len(value) > DECODE_IN_THREAD:
                return await trio.to_thread.run_sync(decode, value)
            return decode(value)
        except CorruptEntry as e:
            self._counts["corrupt"] += 1
            log.warning("cache: dropped a corrupt entry (%s)", e)
            self._queue(key, None)
            return None

    # -- writing, in the background --

    def _start(self) -> None:
        """The writer (and a Redis store's connection) run as system tasks: they live as long as the
        event loop, and never raise (a failure is logged and counted)."""
        self._send, receive = trio.open_memory_channel(self.config.write_queue)
        clean = contextvars.Context()  # not the first request's context (its request id in the logs)
        trio.lowlevel.spawn_system_task(self._writer, receive, context=clean)
        if isinstance(self.store, (RedisStore, SQLiteStore)):  # its connection / its key set
            trio.lowlevel.spawn_system_task(self._guard, self.store.run, context=clean)

    def _queue(self, key: str, entry: Entry | None) -> None:
        try:
            self._send.send_nowait((key, entry))
        except trio.WouldBlock:
            self._counts["dropped_writes"] += 1

    async def _guard(self, run: Any) -> None:
        try:
            await run()
        except Exception:  # noqa: BLE001 - a system task must not raise
            log.exception("cache: the store's connection task failed")

    async def _writer(self, receive: trio.MemoryReceiveChannel) -> None:
        async for item in receive:
            await self._store(*item)
            while True:  # what else is queued, in this turn (one scheduler round per item is slow)
                try:
                    item = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                await self._store(*item)

    async def _store(self, key: str, entry: Entry | None) -> None:
        try:
            if entry is None:
                await self.store.delete(key)
            else:
                await self._write(key, entry)
        except Exception as e:  # noqa: BLE001
            self._failed("write", e)

    async def _write(self, key: str, entry: Entry) -> None:
        if trio.current_time() < self._off_until:
            return
        if isinstance(entry.chunks, deque):
            entry.chunks, entry.offsets = flatten(entry.chunks, entry.offsets)
        if self.store.holds_bytes:
            value = await trio.to_thread.run_sync(encode, entry)  # ~1 ms for 1,000 chunks: off the loop
            entry.size = len(value)
        else:
            value = entry
            entry.size = (chunks_size(entry.chunks) if entry.chunks is not None
                          else len(orjson.dumps(entry.completion)))
        if entry.size > self.config.max_entry_bytes:
            self._too_large(entry.size)
            return
        await self.store.put(key, value, entry.size, entry.stored_at + self._window)
        self._counts["writes"] += 1

    def _too_large(self, size: int | None) -> None:
        self._counts["too_large"] += 1
        log.info("cache: answer not cached: %s bytes > max_entry_bytes %d", size if size is not None else "more",
                 self.config.max_entry_bytes)

    def _failed(self, what: str, error: BaseException) -> None:
        self._counts["store_errors"] += 1
        now = trio.current_time()
        self._off_until = now + RETRY_AFTER
        self._unwarned += 1
        if now - self._warned_at >= WARN_EVERY:
            log.warning("cache: %s failed (%s: %.200s); no cache for %.0f s (%d store errors since the "
                        "last warning)", what, type(error).__name__, error, RETRY_AFTER, self._unwarned)
            self._warned_at, self._unwarned = now, 0

    def statistics(self) -> CacheStatistics:
        c = self._counts
        entries = len(self.store) if isinstance(self.store, MemoryStore) else None
        queued = self._send.statistics().current_buffer_used if self._send is not None else 0
        return CacheStatistics(hits=c["hit"], misses=c["miss"], stale=c["stale"], writes=c["writes"],
                               dropped_writes=c["dropped_writes"], too_large=c["too_large"],
                               corrupt=c["corrupt"], store_errors=c["store_errors"],
                               evictions=self.store.evictions, entries=entries, queued=queued)


def make_store(config: CacheConfig, clock: Any = time.time) -> Any:
    if config.backend == "memory":
        return MemoryStore(config.max_entries, config.max_bytes, clock)
    if config.backend == "redis":
        return RedisStore(config.url, config.key_prefix, config.max_entries)
    return SQLiteStore(config.path, config.max_entries, config.max_bytes)


async def admin_statistics(cache: ResponseCache, x: Exchange, send: Any) -> None:
    """GET /admin/cache: the counters since start (hits, misses, stale, writes, drops ...)."""
    from dataclasses import asdict

    from proxy.server.asgi import send_json

    await send_json(send, 200, asdict(cache.statistics()), x.response_headers)
