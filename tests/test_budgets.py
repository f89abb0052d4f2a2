"""Budgets end to end, on both backends: reserve the worst case, settle the real cost, kill switch,
spend per key/team/model; 100 concurrent requests on one key never overspend by more than one
request's reservation."""

from __future__ import annotations

import pytest
import trio

from proxy.keys.sqlite_store import SqliteStore
from proxy.keys.store import Budget, Reserve, period_key
from tests.conftest import chat_body, parse_sse
from tests.keys_gateway import bearer, create_key, keys_gateway  # noqa: F401 (fixture)
from tests.redis_server import redis_url  # noqa: F401 (fixture)
from tests.test_keys_store import flush_redis

# The fake answers 8 tokens; the prompt "Hello" is about 8 tokens with the chat framing.
# At $10/$30 per Mtok: real cost ~ $0.0003; with max_tokens 20 the reservation is ~ $0.0007.
MAX_TOKENS = 20


@pytest.fixture(params=["sqlite", "redis"])
def state(request, tmp_path):
    if request.param == "sqlite":
        return {"path": str(tmp_path / "gateway.db")}
    url = request.getfixturevalue("redis_url")
    flush_redis(url)
    return {"backend": "redis", "url": url}


async def spend_of(http, gw, key_id: str) -> float:
    return (await http.get(f"{gw.url}/admin/keys/{key_id}")).json()["spend_usd"]


async def settled(http, gw, key_id: str, requests: int) -> list[dict]:
    """The key's spend rows once `requests` requests are in them (settle is asynchronous)."""
    with trio.fail_after(10):
        while True:
            rows = (await http.get(gw.url + "/admin/spend?group_by=key&period=total")).json()["data"]
            row = next((r for r in rows if r["group"] == key_id), None)
            if row is not None and row["requests"] >= requests:
                return rows
            await trio.sleep(0.02)


async def test_100_concurrent_requests_overspend_at_most_one_reservation(keys_gateway, http, state):
    gw = await keys_gateway(state=state, budgets={"kill_at": 1.0})
    budget = 0.004
    created = await create_key(http, gw.url, budget_usd=budget, budget_period="total")
    statuses: list[int] = []

    async def one() -> None:
        response = await http.post(gw.v1 + "/chat/completions", headers=bearer(created["key"]),
                                   json=chat_body(max_tokens=MAX_TOKENS))
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "budget_exceeded" and int(response.headers["retry-after"]) >= 1

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
    served = statuses.count(200)
    assert statuses.count(429) == 100 - served and 0 < served < 100
    rows = await settled(http, gw, created["id"], 100)
    row = next(r for r in rows if r["group"] == created["id"])
    assert row["requests"] == 100  # refused ones are recorded at $0
    one_cost = row["spend_usd"] / served
    reservation = (row["input_tokens"] / served * 10 + MAX_TOKENS * 30) / 1e6
    assert row["spend_usd"] <= budget + reservation
    # without reservations all 100 would have been served: the check is not vacuous
    assert 100 * one_cost > budget + reservation
    print(f"\n[{state.get('backend', 'sqlite')}] served {served}/100, spent {row['spend_usd']:.6f} of "
          f"{budget} (one request {one_cost:.6f}, one reservation {reservation:.6f})")


async def test_kill_switch_at_kill_at_and_running_streams_finish(keys_gateway, http, state):
    gw = await keys_gateway(state=state, budgets={"kill_at": 0.5})
    created = await create_key(http, gw.url, budget_usd=0.004, budget_period="day")
    key = bearer(created["key"])
    slow = chat_body("fake: {\"itl\": 0.05, \"tokens\": 8}", stream=True, max_tokens=MAX_TOKENS)
    async with http.stream("POST", gw.v1 + "/chat/completions", headers=key, json=slow) as running:
        assert running.status_code == 200
        served = 0
        while True:  # sequential requests until the kill switch (spend >= 0.5 x budget)
            response = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=MAX_TOKENS))
            if response.status_code == 429:
                break
            assert response.status_code == 200
            served += 1
            await settled(http, gw, created["id"], served)
            assert served < 50
        error = response.json()["error"]
        assert error["code"] == "budget_exceeded" and "key" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
        body = b"".join([chunk async for chunk in running.aiter_bytes()])
    assert parse_sse(body)[-1] == b"[DONE]"  # the stream already running finished
    spent = await spend_of(http, gw, created["id"])
    one = spent / (served + 1)
    assert 0.002 <= spent < 0.002 + 2 * one


async def test_team_and_global_budgets(keys_gateway, http, state):
    gw = await keys_gateway(state=state, budgets={"kill_at": 1.0, "monthly_usd": 0.05},
                            teams={"ml": {"budget_usd": 0.0015, "budget_period": "month"}})
    a = await create_key(http, gw.url, team="ml")
    b = await create_key(http, gw.url, team="ml")
    c = await create_key(http, gw.url, team="web")
    served = 0
    for n in range(20):  # two keys of one team share its budget
        response = await http.post(gw.v1 + "/chat/completions", headers=bearer((a, b)[n % 2]["key"]),
                                   json=chat_body(max_tokens=MAX_TOKENS))
        if response.status_code == 429:
            assert "team ml" in response.json()["error"]["message"]
            break
        served += 1
    assert 1 <= served < 10
    assert (await http.post(gw.v1 + "/chat/completions", headers=bearer(c["key"]),
                            json=chat_body(max_tokens=MAX_TOKENS))).status_code == 200
    with trio.fail_after(10):
        while True:
            teams = {r["group"]: r for r in (await http.get(gw.url + "/admin/spend?group_by=team")).json()["data"]}
            if teams.get("ml", {}).get("requests", 0) >= served + 1 and "web" in teams:
                break
            await trio.sleep(0.02)
    assert teams["ml"]["spend_usd"] <= 0.0015 and teams["web"]["spend_usd"] > 0
    models = (await http.get(gw.url + "/admin/spend?group_by=model&period=day")).json()["data"]
    assert [m["group"] for m in models] == ["gpt-4o"] and models[0]["output_tokens"] > 0


async def test_spend_endpoint_rejects_bad_parameters(keys_gateway, http):
    gw = await keys_gateway()
    for query, param in (("group_by=user", "group_by"), ("period=week", "period")):
        response = await http.get(f"{gw.url}/admin/spend?{query}")
        assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_cache_hits_and_refusals_cost_nothing_and_a_cut_stream_is_billed(keys_gateway, http, state):
    gw = await keys_gateway(state=state)
    created = await create_key(http, gw.url, models=["gpt-4o"])
    key = bearer(created["key"])
    assert (await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(model="alias"))).status_code == 403
    cut = chat_body("fake: {\"tokens\": 30, \"drop_after\": 10}", stream=True)
    async with http.stream("POST", gw.v1 + "/chat/completions", headers=key, json=cut) as response:
        async for _ in response.aiter_bytes():
            pass
    rows = await settled(http, gw, created["id"], 2)
    row = next(r for r in rows if r["group"] == created["id"])
    assert row["spend_usd"] > 0 and row["output_tokens"] >= 5  # the relayed tokens were billed


async def test_a_reservation_left_by_a_crash_is_released_on_restart(keys_gateway, http, tmp_path):
    path = str(tmp_path / "gateway.db")
    crashed = SqliteStore(path)
    await crashed.open()
    await crashed.heartbeat("crashed", 0.0, 10)  # a process last seen long ago, holding the whole budget
    budget = Budget("global", period_key("month", __import__("time").time()), 0.01)
    assert (await crashed.reserve(Reserve("r1", "crashed", "key_x", __import__("time").time(), 10, 0.01,
                                          budgets=(budget,)))).ok
    await crashed.aclose()
    gw = await keys_gateway(state={"path": path, "stale_after": 2}, budgets={"monthly_usd": 0.01, "kill_at": 1.0})
    response = await http.post(gw.v1 + "/chat/completions", json=chat_body(max_tokens=MAX_TOKENS))
    assert response.status_code == 200, response.text  # the master key is under the global budget too


async def test_a_redis_outage_fails_closed_then_recovers(keys_gateway, http, tmp_path):
    import os
    import signal
    import subprocess

    from tests.redis_server import _free_port

    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        await trio.sleep(0.3)
        url = f"redis://127.0.0.1:{port}/0"
        closed = await keys_gateway(state={"backend": "redis", "url": url})
        opened = await keys_gateway(state={"backend": "redis", "url": url, "fail_open": True})
        created = await create_key(http, closed.url, rpm=1000, budget_usd=1.0)
        key = bearer(created["key"])
        with trio.fail_after(2):
            while (await http.post(opened.v1 + "/chat/completions", headers=key, json=chat_body())).status_code != 200:
                await trio.sleep(0.05)
        assert (await http.post(closed.v1 + "/chat/completions", headers=key, json=chat_body())).status_code == 200
        os.kill(server.pid, signal.SIGSTOP)  # the store stops answering
        try:
            # Requests may be served from allowances already leased for up to ~1 s after the store's
            # last answer (never beyond them); then every request fails closed.
            with trio.fail_after(6):
                while (refused := await http.post(closed.v1 + "/chat/completions", headers=key,
                                                  json=chat_body())).status_code == 200:
                    await trio.sleep(0.1)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
            assert "unavailable" in refused.json()["error"]["message"]
            served = await http.post(opened.v1 + "/chat/completions", headers=key, json=chat_body())
            assert served.status_code == 200  # fail_open: the known key is served without limits
        finally:
            os.kill(server.pid, signal.SIGCONT)
        with trio.fail_after(20):  # the client reconnects (backoff up to 10 s) and serves again
            while (await http.post(closed.v1 + "/chat/completions", headers=key, json=chat_body())).status_code != 200:
                await trio.sleep(0.2)
    finally:
        server.kill()
        server.wait()


async def test_on_budget_downgrade_routes_to_the_cheaper_model_until_the_budget_is_spent(keys_gateway, http, state):
    gw = await keys_gateway(state=state, budgets={"kill_at": 0.5, "on_budget": "downgrade",
                                                  "downgrade": {"gpt-4o": "gpt-4o-mini"}})
    created = await create_key(http, gw.url, budget_usd=0.002, budget_period="day")
    key = bearer(created["key"])
    models = []
    for _ in range(300):
        response = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=MAX_TOKENS))
        if response.status_code == 429:
            break
        assert response.status_code == 200
        downgraded = response.headers.get("x-gateway-downgraded")
        models.append(response.headers["x-gateway-deployment"])
        assert downgraded in (None, "gpt-4o -> gpt-4o-mini")
        await settled(http, gw, created["id"], len(models))
    assert response.json()["error"]["code"] == "budget_exceeded"
    first_cheap = models.index("fake/gpt-4o-mini")
    assert first_cheap > 0 and set(models[:first_cheap]) == {"fake/gpt-4o"}
    assert set(models[first_cheap:]) == {"fake/gpt-4o-mini"} and len(models) - first_cheap > 5
    spent = await spend_of(http, gw, created["id"])
    assert 0.0015 < spent <= 0.002


def test_downgrade_needs_a_table_of_known_models(tmp_path):
    from proxy.config import ConfigError
    from tests.keys_gateway import keys_config

    for budgets, key in (({"on_budget": "downgrade"}, "budgets.downgrade"),
                         ({"on_budget": "downgrade", "downgrade": {"gpt-4o": "nope"}}, "budgets.downgrade.gpt-4o"),
                         ({"on_budget": "sometimes"}, "budgets.on_budget"), ({"kill_at": 1.5}, "budgets.kill_at")):
        with pytest.raises(ConfigError) as failed:
            keys_config(9, {"path": str(tmp_path / "x.db")}, budgets=budgets)
        assert failed.value.key == key


async def test_the_cost_tiers_budget_floor_sees_the_keys_remaining_budget(keys_gateway, http):
    """Tiers run before keys: the floor reads the budget the key had left after its last request."""
    gw = await keys_gateway(tiers={"auto": {"preset": "gpt", "budget_floor_usd": 0.0099}})
    key = await create_key(http, gw.url, budget_usd=0.01, budget_period="total")

    async def ask() -> str:
        response = await http.post(gw.url + "/v1/chat/completions", headers=bearer(key["key"]),
                                   json=chat_body("Prove it", model="auto", max_tokens=MAX_TOKENS))
        assert response.status_code == 200, response.text
        return response.headers["x-gateway-route"]

    assert await ask() == "tier=strong reason=keyword:prove"  # nothing known of the key yet
    with trio.fail_after(10):
        while (left := gw.gateway.keys.last_remaining(gw.gateway.keys.authenticate(key["key"].encode()))) is None:
            await trio.sleep(0.01)
    assert 0.009 < left < 0.0099  # $0.01 less the first answer's cost
    assert await ask() == "tier=cheap reason=budget<0.0099"
