"""Leases (proxy/keys/leases.py), on both backends: what the store grants and takes back, and a
gateway admitting from them without the store, renewing, falling back to per-request reserves at
the end of a budget, and giving leases back when idle or revoked."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from proxy.keys.store import (LEASE_SHARE, SLOT_SHARE, WINDOW, Budget, BudgetAsk, RateAsk, Settle, SlotAsk, period_key,
                              spend_periods)
from tests.conftest import chat_body
from tests.keys_gateway import bearer, create_key, keys_gateway  # noqa: F401 (fixture)
from tests.redis_server import redis_url  # noqa: F401 (fixture)
from tests.test_budgets import MAX_TOKENS, settled, state  # noqa: F401 (fixture: both backends)
from tests.test_keys_store import NOW, reserve, store  # noqa: F401 (fixture: both backends)

BUDGET = Budget("key:key_a", period_key("month", NOW), 1.0)


async def test_a_budget_lease_takes_a_share_and_counts_as_reserved(store):
    [grant] = await store.lease("p1", NOW, [BudgetAsk("l1", BUDGET, 1.0, want=0.5, least=0.01)])
    assert grant.usd == pytest.approx(1.0 / LEASE_SHARE) and grant.reserved == pytest.approx(0.125)
    # the lease is held like a reservation: nobody else can reserve it
    assert not (await store.reserve(reserve(1, owner="p2", usd=0.9, budgets=(BUDGET,)))).ok
    # a request spent 0.05 from it: the cost moves from the lease's hold to the spend, in one step
    store.settle_nowait(Settle(None, "key_a", None, "m", NOW, 0.05, 10, 5, ("key:key_a",), leases=("l1",)))
    await store.flush()
    assert await store.scope_spend("key:key_a", period_key("month", NOW)) == pytest.approx(0.05)
    assert not (await store.reserve(reserve(2, owner="p2", usd=0.9, budgets=(BUDGET,)))).ok  # 0.05 + 0.075 held
    # the unused rest goes back: all of the budget but the spend is free again
    [back] = await store.lease("p1", NOW, [BudgetAsk("l1", BUDGET, 1.0, back=0.075, fresh=False)])
    assert back.usd == 0 and back.reserved == pytest.approx(0.0, abs=1e-9)
    assert (await store.reserve(reserve(3, owner="p2", usd=0.95, budgets=(BUDGET,)))).ok
    # a top-up takes at most 1/8 of what is left; closing drops the row whatever it holds
    store.settle_nowait(Settle("r3", "key_a", None, "m", NOW, 0.0, 0, 0, ("key:key_a",)))
    await store.flush()
    [more] = await store.lease("p1", NOW, [BudgetAsk("l1", BUDGET, 1.0, want=1.0, least=0.01)])
    assert more.usd == pytest.approx(0.95 / LEASE_SHARE)
    await store.lease("p1", NOW, [BudgetAsk("l1", BUDGET, 1.0, close=True)])
    assert (await store.reserve(reserve(4, owner="p2", usd=0.95, budgets=(BUDGET,)))).ok


async def test_no_lease_near_the_end_of_a_budget_or_past_kill_at(store):
    # 0.2 left: 1/8 of it (0.025) would hold fewer than `least` (4 requests of 0.01): none
    store.settle_nowait(Settle(None, "key_a", None, "m", NOW, 0.8, 1, 1, ("key:key_a",)))
    await store.flush()
    [grant] = await store.lease("p1", NOW, [BudgetAsk("l1", BUDGET, 1.0, want=0.64, least=0.04)])
    assert grant.usd == 0 and grant.spend == pytest.approx(0.8)
    assert (await store.reserve(reserve(1, usd=0.19, budgets=(BUDGET,)))).ok  # per request: the last dollars
    [killed] = await store.lease("p1", NOW, [BudgetAsk("l2", BUDGET, 0.5, want=0.01, least=0.0)])
    assert killed.usd == 0  # spend 0.8 >= kill_at 0.5 x budget


async def test_a_slot_lease_counts_its_slots_as_open_streams(store):
    """Leased stream slots count against max_parallel whether in use or not; given back or closed,
    they are free for per-request reserves again; a crashed process's are swept."""
    streams = dict(max_parallel=8, stream=True)
    [grant] = await store.lease("p1", NOW, [SlotAsk("s1", "key_a", 8, want=6)])
    assert grant.slots == 8 // SLOT_SHARE == 4
    assert all([(await store.reserve(reserve(n, owner="p2", **streams))).ok for n in range(4)])
    refused = await store.reserve(reserve(4, owner="p2", **streams))
    assert not refused.ok and refused.reason.startswith("max_parallel")
    assert refused.leased_elsewhere == 4  # slots of another process's lease: worth asking again later
    assert (await store.reserve(reserve(5, owner="p2", max_parallel=8, stream=False))).ok  # not a stream
    [back] = await store.lease("p1", NOW, [SlotAsk("s1", "key_a", 8, back=3, fresh=False)])
    assert back.slots == 0 and not back.lost
    assert all([(await store.reserve(reserve(n, owner="p2", **streams))).ok for n in (6, 7, 8)])
    assert not (await store.reserve(reserve(9, owner="p2", **streams))).ok  # 7 streams + the lease's 1
    # a top-up takes at most half of what is free, none when that is nothing
    [none] = await store.lease("p1", NOW, [SlotAsk("s1", "key_a", 8, want=4, fresh=False)])
    assert none.slots == 0
    await store.lease("p1", NOW, [SlotAsk("s1", "key_a", 8, close=True)])
    assert (await store.reserve(reserve(10, owner="p2", **streams))).ok
    [lost] = await store.lease("p1", NOW, [SlotAsk("s1", "key_a", 8, back=1, fresh=False)])
    assert lost.lost  # the row is gone: the lease must start over
    # max_parallel 1: half of one slot is none, streams go one by one
    [one] = await store.lease("p1", NOW, [SlotAsk("s2", "key_b", 1, want=4)])
    assert one.slots == 0
    # a crashed process's slot lease is released by the sweep
    await store.heartbeat("dead", NOW - 100, 10)
    [dead] = await store.lease("dead", NOW, [SlotAsk("s3", "key_c", 4, want=4)])
    assert dead.slots == 2
    assert [(await store.reserve(reserve(n, key_id="key_c", max_parallel=4, stream=True))).ok
            for n in (11, 12, 13)] == [True, True, False]
    assert await store.heartbeat("alive", NOW, 10) >= 1
    assert (await store.reserve(reserve(14, key_id="key_c", max_parallel=4, stream=True))).ok


async def test_a_crashed_process_lease_is_released_by_the_sweep(store):
    await store.heartbeat("dead", NOW - 100, 10)
    budget = Budget("global", period_key("month", NOW), 0.08)
    [grant] = await store.lease("dead", NOW, [BudgetAsk("l1", budget, 1.0, want=0.01, least=0.001)])
    assert grant.usd == pytest.approx(0.01)
    assert not (await store.reserve(reserve(1, owner="alive", usd=0.075, budgets=(budget,)))).ok
    assert await store.heartbeat("alive", NOW, 10) == 1
    assert (await store.reserve(reserve(2, owner="alive", usd=0.075, budgets=(budget,)))).ok
    # the dead process's lease is gone: a top-up of it (not fresh) says so instead of granting
    [lost] = await store.lease("dead", NOW, [BudgetAsk("l1", budget, 1.0, want=0.001, fresh=False)])
    assert lost.lost and lost.usd == 0
    store.settle_nowait(Settle(None, "key_a", None, "m", NOW, 0.002, 1, 1, ("global",), leases=("l1",)))
    await store.flush()  # a late settle from it still counts its spend, once
    assert await store.scope_spend("global", spend_periods(NOW)[1]) == pytest.approx(0.002)


async def test_a_rate_lease_is_counted_in_its_last_second_and_given_back(store):
    second = int(NOW) + 2
    [grant] = await store.lease("p1", NOW, [RateAsk("key_a", 80, 8000, second, want_requests=64,
                                                    want_tokens=6400, least_requests=4, least_tokens=400)])
    assert (grant.requests, grant.tokens) == (10, 1000)  # 80 // 8, 8000 // 8
    verdict = await store.reserve(reserve(1, rpm=80, tpm=8000, tokens=100))
    assert verdict.ok and (verdict.requests, verdict.tokens) == (11, 1100)
    # a request of the lease reserved 100 tokens and used 30: its settle corrects the lease's bucket
    store.settle_nowait(Settle(None, "key_a", None, "m", NOW, 0.0, 20, 10, window=(second, 100)))
    await store.flush()
    [back] = await store.lease("p1", NOW, [RateAsk("key_a", 80, 8000, second, back_second=second,
                                                   back_requests=9, back_tokens=900)])
    assert (back.requests, back.window_requests, back.window_tokens) == (0, 2, 130)
    # the lease's units stay in the window until their second leaves it (never earlier than used)
    late = await store.reserve(reserve(2, rpm=1, now=NOW + WINDOW + 1))  # the one at NOW has left
    assert not late.ok and late.code == "rate_limit_exceeded"
    assert (await store.reserve(reserve(3, rpm=1, now=second + WINDOW))).ok
    [small] = await store.lease("p1", NOW, [RateAsk("key_b", 20, None, second, want_requests=64, least_requests=4)])
    assert small.requests == 0  # 20 // 8 < 4: per-request reserves


# -- a gateway on leases --

def keys_of(gw):
    return gw.gateway.keys


async def held(gw, scope: str) -> float:
    """USD the store holds against a scope (reservations and leases)."""
    store = keys_of(gw).store
    if hasattr(store, "_client"):
        value = await store._command(lambda: store._client.hget(store.prefix + "reserved", scope))
        return float(value or 0)
    row = await store._call(lambda conn: conn.execute("SELECT usd FROM reserved WHERE scope = ?", (scope,)).fetchone())
    return row[0] if row else 0.0


async def test_requests_are_admitted_from_leases_renewed_and_the_rest_given_back(keys_gateway, http, state):
    gw = await keys_gateway(state=state, budgets={"kill_at": 1.0})
    created = await create_key(http, gw.url, budget_usd=10, rpm=1_000_000, tpm=10**9, budget_period="total")
    key = bearer(created["key"])
    leases = keys_of(gw).leases
    statuses = []

    async def one() -> None:
        response = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=MAX_TOKENS))
        statuses.append(response.status_code)
        assert int(response.headers["x-ratelimit-remaining-requests"]) < 1_000_000

    for _ in range(3):  # 3 x 100 concurrent: more than one lease's worth (64 requests)
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
    assert statuses == [200] * 300
    assert leases.local >= 290 and 2 <= leases.renewals <= 60, (leases.local, leases.renewals)
    assert await held(gw, f"key:{created['id']}") > 0  # a lease is held while in use
    rows = await settled(http, gw, created["id"], 300)
    row = next(r for r in rows if r["group"] == created["id"])
    assert row["requests"] == 300 and row["spend_usd"] > 0  # spend is persisted per request
    with trio.fail_after(5):  # idle for a second: the lease goes back
        while await held(gw, f"key:{created['id']}") > 1e-9:
            await trio.sleep(0.1)


async def test_leases_overspend_at_most_one_reservation_and_fall_back_at_the_end(keys_gateway, http, state):
    gw = await keys_gateway(state=state, budgets={"kill_at": 1.0})
    budget = 0.05  # ~190 requests, ~80 reservations: leased at first, per request near the end
    created = await create_key(http, gw.url, budget_usd=budget, budget_period="total")
    key = bearer(created["key"])
    leases = keys_of(gw).leases
    statuses = []

    async def one() -> None:
        response = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=MAX_TOKENS))
        statuses.append(response.status_code)

    for _ in range(4):
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
    served = statuses.count(200)
    assert statuses.count(429) == 400 - served and 0 < served < 400
    assert leases.local > 0 and leases.local < served  # leases first, the store's reserve at the end
    rows = await settled(http, gw, created["id"], 400)
    row = next(r for r in rows if r["group"] == created["id"])
    reservation = (row["input_tokens"] / served * 10 + MAX_TOKENS * 30) / 1e6
    assert row["spend_usd"] <= budget + reservation
    print(f"\n[{state.get('backend', 'sqlite')}] leases: served {served}/400 ({leases.local} from leases), "
          f"spent {row['spend_usd']:.6f} of {budget} (one reservation {reservation:.6f})")


async def test_revocation_drops_the_key_leases(keys_gateway, http, state):
    gw = await keys_gateway(state=state)
    created = await create_key(http, gw.url, budget_usd=10, rpm=100_000)
    key = bearer(created["key"])
    for _ in range(3):
        assert (await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body())).status_code == 200
    scope = f"key:{created['id']}"
    assert keys_of(gw).leases.local >= 2 and await held(gw, scope) > 0
    await http.delete(f"{gw.url}/admin/keys/{created['id']}")
    start = trio.current_time()
    with trio.fail_after(1.0):
        while (await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body())).status_code != 401:
            await trio.sleep(0.02)
        while await held(gw, scope) > 1e-9:  # given back by the next renewal tick, not after IDLE
            await trio.sleep(0.02)
    print(f"\nrevoked: refused and its lease given back after {trio.current_time() - start:.2f} s")


HELD = chat_body("fake: {\"itl\": 10, \"tokens\": 2}", stream=True)  # stays open, first token at once


async def two_gateways(keys_gateway, http, state, **limits):
    """Two gateways on one store and a key made through the first, seen by the second."""
    a = await keys_gateway(state=state)
    b = await keys_gateway(state=state)
    created = await create_key(http, a.url, **limits)
    key = bearer(created["key"])
    with trio.fail_after(5):  # the second refreshes its keys
        while (await http.post(b.v1 + "/chat/completions", headers=key, json=chat_body())).status_code != 200:
            await trio.sleep(0.05)
    return a, b, created, key


async def open_streams(stack, http, gw, key, body, n):
    """n streams held open (their headers read); their status codes."""
    codes = []
    for _ in range(n):
        response = await stack.enter_async_context(http.stream("POST", gw.v1 + "/chat/completions",
                                                               headers=key, json=body))
        codes.append(response.status_code)
    return codes


async def open_slots(gw, key_id: str) -> int:
    """Stream slots the store counts for a key: per-request streams and leased slots."""
    store = keys_of(gw).store
    if hasattr(store, "_client"):
        members = await store._command(lambda: store._client.scard(store.prefix + "par:" + key_id))
        leased = await store._command(lambda: store._client.hvals(store.prefix + "pl:" + key_id))
        return int(members) + sum(int(n) for n in leased)
    row = await store._call(lambda conn: conn.execute(
        "SELECT COALESCE(SUM(stream), 0) FROM reservations WHERE key_id = ? AND stream > 0", (key_id,)).fetchone())
    return row[0]


async def test_streams_of_a_key_with_max_parallel_take_leased_slots(keys_gateway, http, state):
    """max_parallel 4: the streams take slots from a lease (no store round trip each), the limit
    holds exactly, and the free slots go back to the store at the next tick."""
    gw = await keys_gateway(state=state)
    created = await create_key(http, gw.url, max_parallel=4, budget_usd=10)
    key = bearer(created["key"])
    before = keys_of(gw).leases.local
    async with AsyncExitStack() as stack:
        assert await open_streams(stack, http, gw, key, HELD, 4) == [200] * 4
        assert (await http.post(gw.v1 + "/chat/completions", headers=key, json=HELD)).status_code == 429
        assert await open_slots(gw, created["id"]) == 4
        assert keys_of(gw).leases.local - before >= 2  # a lease of 2 (half of 4), then one by one
    # the four streams cut (the client closed them): settled, their slots given back at the next ticks
    with trio.fail_after(5):
        while await open_slots(gw, created["id"]) > 0:
            await trio.sleep(0.05)
    ok = chat_body("fake: {\"tokens\": 2}", stream=True)
    assert (await http.post(gw.v1 + "/chat/completions", headers=key, json=ok)).status_code == 200


async def test_slots_leased_by_one_gateway_do_not_refuse_another(keys_gateway, http, state):
    """Two gateways on one store, max_parallel 4: gateway A runs one stream from a lease of 2 (one
    slot idle); gateway B may still open 3 streams: its refused stream asks again after A's tick
    gave the idle slot back. A 5th stream is refused for real."""
    a, b, created, key = await two_gateways(keys_gateway, http, state, max_parallel=4)
    async with AsyncExitStack() as stack:
        assert await open_streams(stack, http, a, key, HELD, 1) == [200]
        assert await open_streams(stack, http, b, key, HELD, 3) == [200] * 3
        fifth = await http.post(b.v1 + "/chat/completions", headers=key, json=HELD)
        assert fifth.status_code == 429 and "max_parallel" in fifth.json()["error"]["message"]
        assert await open_slots(a, created["id"]) == 4


async def test_concurrent_streams_on_two_gateways_never_pass_max_parallel(keys_gateway, http, state):
    """20 streams at once, 10 on each of two gateways sharing the store, max_parallel 6: at most 6
    are open at any time (leased slots and per-request streams counted together)."""
    a, b, created, key = await two_gateways(keys_gateway, http, state, max_parallel=6)
    codes: list[int] = []
    async with AsyncExitStack() as stack:
        async def one(gw):
            response = await stack.enter_async_context(http.stream("POST", gw.v1 + "/chat/completions",
                                                                   headers=key, json=HELD))
            codes.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for gw in [a, b] * 10:
                nursery.start_soon(one, gw)
        assert sorted(set(codes)) == [200, 429] and codes.count(200) <= 6, codes
        assert await open_slots(a, created["id"]) <= 6
        print(f"\n20 concurrent streams, max_parallel 6, two gateways: {codes.count(200)} admitted")


async def test_streams_of_a_key_with_max_parallel_are_counted_by_the_store(keys_gateway, http, state):
    gw = await keys_gateway(state=state)
    key = bearer((await create_key(http, gw.url, max_parallel=1, budget_usd=10))["key"])
    slow = chat_body("fake: {\"itl\": 0.05, \"tokens\": 10}", stream=True)
    before = keys_of(gw).leases.local
    async with http.stream("POST", gw.v1 + "/chat/completions", headers=key, json=slow) as one:
        assert one.status_code == 200
        assert (await http.post(gw.v1 + "/chat/completions", headers=key, json=slow)).status_code == 429
        assert (await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body())).status_code == 200
        await one.aread()
    assert keys_of(gw).leases.local == before + 1  # only the plain request came from a lease
