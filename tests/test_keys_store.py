"""The store's behaviour, one suite run against both backends (SQLite file, real redis-server)."""

from __future__ import annotations

import logging
import socket
import time
from urllib.parse import urlparse

import pytest
import trio

from proxy.keys.records import new_record
from proxy.keys.redis_store import RedisStore
from proxy.keys.sqlite_store import SqliteStore
from proxy.keys.store import WINDOW, Budget, Reserve, Settle, period_key, spend_periods
from tests.redis_server import redis_url  # noqa: F401 (fixture)

NOW = 1_800_000_000.0  # a fixed clock: windows and periods are computed from the `now` passed in


def flush_redis(url: str) -> None:
    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=5) as s:
        s.sendall(b"FLUSHALL\r\n")
        assert s.recv(16).startswith(b"+OK")


@pytest.fixture(params=["sqlite", "redis"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        made = SqliteStore(str(tmp_path / "state.db"))
    else:
        url = request.getfixturevalue("redis_url")
        flush_redis(url)
        made = RedisStore(url)
    await made.open()
    yield made
    await made.aclose()


def reserve(n: int = 0, **kw) -> Reserve:
    fields = dict(id=f"r{n}", owner="p1", key_id="key_a", now=NOW, tokens=100, usd=0.01)
    fields.update(kw)
    return Reserve(**fields)


async def test_keys_round_trip_and_the_version_moves(store):
    v0 = await store.version()
    record, _ = new_record({"name": "a", "team": "t", "models": ("gpt-*",), "rpm": 5, "metadata": {"x": [1]}})
    await store.put_key(record)
    assert await store.version() > v0
    assert await store.get_key(record.id) == record
    version, records = await store.load_keys()
    assert records == [record] and version == await store.version()
    assert await store.get_key("key_nope") is None


async def test_concurrent_reserves_never_pass_the_budget(store):
    budget = Budget("key:key_a", period_key("month", NOW), 0.105)
    admitted = []

    async def one(n: int) -> None:
        verdict = await store.reserve(reserve(n, budgets=(budget,)))
        if verdict.ok:
            admitted.append(n)
        else:
            assert verdict.code == "budget_exceeded" and verdict.retry_after >= 1

    async with trio.open_nursery() as nursery:
        for n in range(100):
            nursery.start_soon(one, n)
    assert len(admitted) == 10  # 10 x 0.01 <= 0.105 < 11 x 0.01
    for n in admitted:  # each cost less than reserved: room for more comes back
        store.settle_nowait(Settle(f"r{n}", "key_a", None, "m", NOW, 0.004, 10, 5, ("key:key_a",)))
    await store.flush()
    assert abs(await store.scope_spend("key:key_a", period_key("month", NOW)) - 0.04) < 1e-9
    again = [await store.reserve(reserve(200 + n, budgets=(budget,))) for n in range(10)]
    assert sum(v.ok for v in again) == 6  # 0.04 spent + 6 x 0.01 <= 0.105


async def test_kill_at_refuses_once_spend_reaches_the_share(store):
    budget = Budget("team:ml", period_key("day", NOW), 1.0)
    store.settle_nowait(Settle(None, "key_a", "ml", "m", NOW, 0.89, 1, 1, ("team:ml",)))
    await store.flush()
    assert (await store.reserve(reserve(1, budgets=(budget,), kill_at=0.9, usd=0.001))).ok
    store.settle_nowait(Settle("r1", "key_a", "ml", "m", NOW, 0.011, 1, 1, ("team:ml",)))
    await store.flush()
    refused = await store.reserve(reserve(2, budgets=(budget,), kill_at=0.9, usd=0.001))
    assert not refused.ok and refused.code == "budget_exceeded" and "team ml" in refused.reason


async def test_rpm_window_slides_and_says_when(store):
    for n in range(3):
        verdict = await store.reserve(reserve(n, rpm=3, now=NOW + n * 10))
        assert verdict.ok and verdict.requests == n + 1
    refused = await store.reserve(reserve(9, rpm=3, now=NOW + 30))
    assert not refused.ok and refused.code == "rate_limit_exceeded"
    assert refused.retry_after == pytest.approx(WINDOW - 30, abs=1)  # the first request leaves at NOW+60
    assert refused.requests_reset == pytest.approx(WINDOW - 30, abs=1)
    assert (await store.reserve(reserve(10, rpm=3, now=NOW + WINDOW + 0.5))).ok


async def test_tpm_counts_reserved_tokens_then_the_real_ones(store):
    assert (await store.reserve(reserve(1, tpm=250, tokens=200))).ok
    refused = await store.reserve(reserve(2, tpm=250, tokens=200))
    assert not refused.ok and "tpm" in refused.reason
    store.settle_nowait(Settle("r1", "key_a", None, "m", NOW, 0.0, 20, 10))
    await store.flush()
    verdict = await store.reserve(reserve(3, tpm=250, tokens=200))
    assert verdict.ok and verdict.tokens == 230


async def test_max_parallel_counts_open_streams_only(store):
    assert (await store.reserve(reserve(1, max_parallel=1, stream=True))).ok
    assert (await store.reserve(reserve(2, max_parallel=1, stream=False))).ok
    assert not (await store.reserve(reserve(3, max_parallel=1, stream=True))).ok
    store.settle_nowait(Settle("r1", "key_a", None, "m", NOW, 0.0))
    await store.flush()
    assert (await store.reserve(reserve(4, max_parallel=1, stream=True))).ok


async def test_a_gone_process_reservations_are_released_by_the_next_sweep(store):
    budget = Budget("global", period_key("month", NOW), 0.01)
    await store.heartbeat("dead", NOW - 100, 10)
    assert (await store.reserve(reserve(1, owner="dead", budgets=(budget,)))).ok
    assert not (await store.reserve(reserve(2, owner="alive", budgets=(budget,)))).ok
    assert await store.heartbeat("alive", NOW, 10) == 1
    assert (await store.reserve(reserve(3, owner="alive", budgets=(budget,)))).ok
    # the late settle of the released reservation still counts its spend, once
    store.settle_nowait(Settle("r1", "key_a", None, "m", NOW, 0.002, 1, 1, ("global",)))
    await store.flush()
    assert await store.scope_spend("global", spend_periods(NOW)[1]) == pytest.approx(0.002)


async def test_spend_groups_by_key_team_and_model(store):
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW))
    for key, team, model, cost in (("k1", "a", "m1", 1.0), ("k1", "a", "m2", 2.0), ("k2", None, "m1", 4.0)):
        store.settle_nowait(Settle(None, key, team, model, NOW, cost, 10, 5))
    await store.flush()
    by_key = {r.group: r.to_json() for r in await store.spend("key", day, day)}
    assert by_key == {"k1": {"group": "k1", "spend_usd": 3.0, "requests": 2, "input_tokens": 20, "output_tokens": 10},
                      "k2": {"group": "k2", "spend_usd": 4.0, "requests": 1, "input_tokens": 10, "output_tokens": 5}}
    assert {r.group: r.spend_usd for r in await store.spend("team", day, day)} == {"a": 3.0, None: 4.0}
    assert {r.group: r.requests for r in await store.spend("model", day, day)} == {"m1": 2, "m2": 1}
    assert await store.spend("key", "2000-01-01", "2000-01-31") == []


async def test_summed_settles_equal_one_at_a_time_and_a_bad_one_loses_only_itself(tmp_path, caplog):
    """The SQLite writer sums a transaction's settles per counter and spend row; the sums equal
    what one settle at a time writes, and a settle that breaks the summing is set aside alone."""
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW))
    settles = [Settle(None, f"k{n % 3}", "t" if n % 2 else None, f"m{n % 2}", NOW, 0.001 * n, n, 2 * n,
                      ("global", f"key:k{n % 3}")) for n in range(1, 41)]
    figures = []
    for batched in (True, False):
        store = SqliteStore(str(tmp_path / f"state-{batched}.db"))
        await store.open()
        try:
            for settle in settles:
                store.settle_nowait(settle)
                if not batched:
                    await store.flush()  # one transaction each
            await store.flush()
            figures.append(([r.to_json() for r in await store.spend("key", day, day)],
                            [r.to_json() for r in await store.spend("model", day, day)],
                            await store.scope_spend("global", spend_periods(NOW)[1]),
                            await store.scope_spend("key:k1", "total")))
        finally:
            await store.aclose()
    assert figures[0][:2] == figures[1][:2] and figures[0][2:] == pytest.approx(figures[1][2:])
    assert figures[0][2] == pytest.approx(sum(0.001 * n for n in range(1, 41)))
    store = SqliteStore(str(tmp_path / "state-bad.db"))
    await store.open()
    try:
        bad = Settle(None, "k9", None, "m", "not a time", 1.0, 1, 1, ("global",))  # type: ignore[arg-type]
        for settle in (settles[0], bad, settles[1]):
            store.settle_nowait(settle)
        with caplog.at_level(logging.ERROR, "proxy.keys.sqlite"):
            await store.flush()
        assert {r.group: r.requests for r in await store.spend("key", day, day)} == {"k1": 1, "k2": 1}
        assert "lost" in caplog.text and "k9" in caplog.text
    finally:
        await store.aclose()


async def test_an_idle_sqlite_writer_sleeps_until_there_is_work(tmp_path):
    """No settle waiting, nothing queued: the writer thread does not wake up (it polled every
    50 ms before); a settle wakes it and lands within SETTLE_EVERY."""
    import queue as queues

    class Counting(queues.Queue):
        gets = 0

        def get(self, *args, **kwargs):
            Counting.gets += 1
            return super().get(*args, **kwargs)

    store = SqliteStore(str(tmp_path / "idle.db"))
    store._queue = Counting(store._queue.maxsize)
    await store.open()
    try:
        await store.flush()
        await trio.sleep(0.1)
        before = Counting.gets
        await trio.to_thread.run_sync(time.sleep, 0.5)  # idle (a real wait: the thread runs on its own)
        assert Counting.gets - before <= 1
        store.settle_nowait(Settle(None, "k1", None, "m", NOW, 0.5, 1, 1, ("global",)))
        await trio.to_thread.run_sync(time.sleep, 0.3)  # no store call: only the wake-up commits it

        def committed() -> float:
            import sqlite3
            with sqlite3.connect(str(tmp_path / "idle.db")) as db:
                row = db.execute("SELECT spend FROM counters WHERE scope = 'global' AND period = ?",
                                 (spend_periods(NOW)[1],)).fetchone()
            return row[0] if row else 0.0

        assert await trio.to_thread.run_sync(committed) == pytest.approx(0.5)
    finally:
        await store.aclose()
