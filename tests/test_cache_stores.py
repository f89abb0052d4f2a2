"""The SQLite and Redis stores: entries that outlive a gateway, shared by two gateways, bounded,
and a store that is away or broken never fails a request."""

from __future__ import annotations

import logging
import sqlite3

import httpx
import orjson
import pytest
import trio

from proxy.cache.entry import CorruptEntry, Entry, Replay, decode, encode, flatten
from proxy.cache.stores import SQLiteStore
from proxy.core.events import Chunk

from .conftest import MASTER_KEY, parse_sse
from .redis_server import redis_url  # noqa: F401 - the fixture
from .test_cache import body, settled, start_cached, upstream_calls

HEADERS = {"authorization": f"Bearer {MASTER_KEY}"}


async def post(http, gw, payload):
    r = await http.post(gw.v1 + "/chat/completions", json=payload)
    assert r.status_code == 200, r.text
    return r


def test_encode_decode_round_trip_and_refusals():
    chunks = [Chunk(b'{"choices":[{"index":0,"delta":{"content":"hi"}}]}'),
              Chunk(b'{"choices":[],"usage":{"prompt_tokens":1}}', True, {"prompt_tokens": 1}),
              Chunk(b'{"type":"message_stop"}', True, None, "message_stop")]
    entry = decode(encode(Entry("chat", 12.5, chunks=chunks)))
    assert [(c.data, c.visible, c.usage, c.event) for c in entry.chunks] == \
        [(c.data, c.visible, c.usage, c.event) for c in chunks]
    assert entry.stored_at == 12.5 and entry.completion is None
    for bad in (b"", b"[]", b'{"v":2}', b'{"v":1,"e":"chat","t":1,"c":null,"p":null}',
                b'{"v":1,"e":"chat","t":1,"c":[["x",1,null,null]],"p":null}',
                b'{"v":1,"e":"chat","t":"x","c":null,"p":{}}', b'{"v":1,"e":"chat","t":1,"c":[[1]],"p":null}'):
        try:
            decode(bad)
        except ValueError:
            continue
        raise AssertionError(f"decoded {bad!r}")


def test_offsets_round_trip_in_milliseconds_and_bad_ones_are_refused():
    chunks = [Chunk(b'{"a":1}'), Chunk(b'{"a":2}', True), Chunk(b'{"a":3}', True)]
    entry = decode(encode(Entry("chat", 1.0, chunks=chunks, offsets=[0.0, 0.0, 0.2504])))
    assert entry.offsets == [0.0, 0.0, 0.25]
    assert decode(encode(Entry("chat", 1.0, chunks=chunks))).offsets is None  # written by a fast cache
    good = orjson.loads(encode(Entry("chat", 1.0, chunks=chunks, offsets=[0, 0, 1])))
    for offsets in ([0, 1], [0, 2, 1], [0, -1, 2], [0, 0.5, 1], "0,1,2", [0, None, 2]):
        with pytest.raises(CorruptEntry):
            decode(orjson.dumps({**good, "o": offsets}))
    with pytest.raises(CorruptEntry):  # offsets without chunks
        decode(orjson.dumps({"v": 1, "e": "chat", "t": 1, "c": None, "p": {"a": 1}, "o": [0]}))


def test_a_recording_flattens_to_chunks_and_offsets_from_the_first_read():
    a, b, c = Chunk(b'{"a":1}'), Chunk(b'{"b":1}', True), Chunk(b'{"c":1}', True)
    assert flatten([[a, b], [c]]) == ([a, b, c], None)
    assert flatten([[a, b], [c]], [10.0, 10.5]) == ([a, b, c], [0.0, 0.0, 0.5])
    assert flatten([], []) == ([], [])


async def test_a_paced_replay_emits_each_read_at_its_offset(autojump_clock):
    """Chunks of one original read go out together, each read at its original offset; the same
    entry replays at once when not paced, and an entry without offsets is never paced."""
    chunks = [Chunk(b'{"role":1}'), Chunk(b'{"x":1}', True), Chunk(b'{"y":1}', True), Chunk(b'{"z":1}', True)]
    entry = Entry("chat", 1.0, chunks=chunks, offsets=[0.0, 0.0, 0.3, 1.25])

    async def replay(paced, entry=entry):
        start, sent = trio.current_time(), []

        async def emit(batch):
            sent.append((round(trio.current_time() - start, 3), [c.data for c in batch]))
        await Replay(entry, paced).stream(emit)
        return sent

    assert await replay(True) == [(0.0, [b'{"role":1}', b'{"x":1}']), (0.3, [b'{"y":1}']), (1.25, [b'{"z":1}'])]
    fast = await replay(False)
    assert {at for at, _ in fast} == {0.0} and [d for _, batch in fast for d in batch] == [c.data for c in chunks]
    assert {at for at, _ in await replay(True, Entry("chat", 1.0, chunks=chunks))} == {0.0}


async def test_sqlite_entries_outlive_the_gateway(nursery, fake, tmp_path):
    path = str(tmp_path / "cache.db")
    first = await start_cached(nursery, fake.port, backend="sqlite", path=path)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        one = await post(http, first, body("persist", stream=True))
        await settled(first, 1)
        first.stop.set()
        second = await start_cached(nursery, fake.port, backend="sqlite", path=path)
        two = await post(http, second, body("persist", stream=True))
        plain = await post(http, second, body("persist"))
    assert (one.headers["x-gateway-cache"], two.headers["x-gateway-cache"]) == ("miss", "hit")
    assert parse_sse(two.content) == parse_sse(one.content)
    assert plain.headers["x-gateway-cache"] == "hit" and upstream_calls(fake) == 1


async def test_sqlite_evicts_the_least_recently_used(tmp_path):
    store = SQLiteStore(str(tmp_path / "lru.db"), max_entries=2, max_bytes=10_000)
    value = encode(Entry("chat", 1.0, completion={"a": 1}))
    far = 4e9
    for key in "ab":
        await store.put(key, value, len(value), far)
        await trio.sleep(0.002)  # `used` is wall-clock: keep the order unambiguous
    assert await store.get("a") is not None  # a is used: b is now the oldest
    await trio.sleep(0.002)
    await store.put("c", value, len(value), far)
    assert [await store.get(k) is not None for k in "abc"] == [True, False, True]
    assert store.evictions == 1
    big = SQLiteStore(str(tmp_path / "bytes.db"), max_entries=100, max_bytes=3 * len(value))
    for key in "abcd":
        await big.put(key, value, len(value), far)
    assert len(big) == 3 and await big.get("a") is None
    await big.put("old", value, len(value), 1.0)  # expired: gone at the next write
    await big.put("e", value, len(value), far)
    assert await big.get("old") is None


async def test_sqlite_corrupt_row_is_dropped_and_answered_upstream(nursery, fake, tmp_path, caplog):
    path = str(tmp_path / "corrupt.db")
    gw = await start_cached(nursery, fake.port, backend="sqlite", path=path)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        await post(http, gw, body("rot"))
        await settled(gw, 1)
        with sqlite3.connect(path) as db:
            db.execute("UPDATE cache_entries SET value = ?", (b'{"v":1,"e":"chat","t":0,"c":[[', ))
        r = await post(http, gw, body("rot"))
        assert r.headers["x-gateway-cache"] == "miss" and upstream_calls(fake) == 2
        with trio.fail_after(5):  # dropped, then written again by that request
            while gw.gateway.cache.statistics().writes < 2:
                await trio.sleep(0.005)
        assert (await post(http, gw, body("rot"))).headers["x-gateway-cache"] == "hit"
    assert gw.gateway.cache.statistics().corrupt == 1
    assert any("corrupt" in r.getMessage() for r in caplog.records)


async def test_sqlite_file_that_cannot_be_opened_means_no_cache(nursery, fake, tmp_path, caplog):
    gw = await start_cached(nursery, fake.port, backend="sqlite", path=str(tmp_path / "missing" / "x.db"))
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        for i in range(3):
            assert (await post(http, gw, body(f"nofile {i}", stream=i == 1))).headers["x-gateway-cache"] == "miss"
    assert gw.gateway.cache.statistics().store_errors == 1
    assert sum("no cache" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


async def test_two_gateways_share_entries_through_redis(nursery, fake, redis_url):  # noqa: F811
    prefix = f"t{trio.current_time()}:"
    a = await start_cached(nursery, fake.port, backend="redis", url=redis_url, key_prefix=prefix)
    b = await start_cached(nursery, fake.port, backend="redis", url=redis_url, key_prefix=prefix)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        first = await post(http, a, body("shared", stream=True))
        await settled(a, 1)
        second = await post(http, b, body("shared", stream=True))
        plain = await post(http, b, body("shared"))
        # and the other way round, plain first
        await post(http, b, body("other way"))
        await settled(b, 1)
        back = await post(http, a, body("other way", stream=True))
    assert (first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]) == ("miss", "hit")
    assert parse_sse(second.content) == parse_sse(first.content)
    assert plain.headers["x-gateway-cache"] == "hit" and back.headers["x-gateway-cache"] == "hit"
    assert upstream_calls(fake) == 2


async def test_redis_bounds_the_entry_count(nursery, fake, redis_url):  # noqa: F811
    prefix = f"n{trio.current_time()}:"
    gw = await start_cached(nursery, fake.port, backend="redis", url=redis_url, key_prefix=prefix,
                            max_entries=3)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        for i in range(5):
            await post(http, gw, body(f"bound {i}"))
            await settled(gw, i + 1)
        # Newest first: a miss is written back (and evicts the oldest), so asking for 0 and 1
        # before 2 would race their writes against the lookups of 2, 3 and 4.
        states = [(await post(http, gw, body(f"bound {i}"))).headers["x-gateway-cache"] for i in (4, 3, 2, 1, 0)]
    assert states == ["hit", "hit", "hit", "miss", "miss"]
    assert gw.gateway.cache.store.evictions >= 2


async def test_redis_that_is_down_means_no_cache(nursery, fake, caplog):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = await start_cached(nursery, fake.port, backend="redis", url=f"redis://127.0.0.1:{port}/0")
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        with trio.fail_after(10):
            for i in range(4):
                r = await post(http, gw, body(f"redis down {i}", stream=i % 2 == 0))
                assert r.headers["x-gateway-cache"] == "miss"
    assert upstream_calls(fake) == 4 and gw.gateway.cache.statistics().store_errors == 1
    assert sum("no cache" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1


async def test_sqlite_misses_skip_the_file_and_other_workers_entries_appear(nursery, tmp_path, monkeypatch):
    """Two stores on one file (two workers): a key the file lacks is a miss without a thread hop;
    what the other worker writes is found within KEYS_REFRESH."""
    monkeypatch.setattr(SQLiteStore, "KEYS_REFRESH", 0.05)
    path = str(tmp_path / "shared.db")
    mine, other = SQLiteStore(path, 100, 1 << 20), SQLiteStore(path, 100, 1 << 20)
    value = encode(Entry("chat", 1.0, completion={"a": 1}))
    await mine.put("old", value, len(value), 4e9)
    nursery.start_soon(mine.run)
    with trio.fail_after(5):
        while mine._keys is None:
            await trio.sleep(0.01)
    assert mine.might_have("old") and not mine.might_have("new")
    await other.put("new", value, len(value), 4e9)
    with trio.fail_after(5):
        while not mine.might_have("new"):
            await trio.sleep(0.01)
    await mine.delete("new")
    assert not mine.might_have("new")
