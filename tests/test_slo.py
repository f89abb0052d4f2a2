"""SLOs: burn-rate and budget math on synthetic minutes, persistence across restarts, GET /admin/slo."""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from proxy.config import parse_config
from proxy.observability.slo import Counts, MinuteStore, SLOs, report
from proxy.server.exchange import OPEN, Exchange
from tests.conftest import chat_body
from tests.test_metrics import start_with

BASE = {"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "models": {"m": {"deployments": [{"provider": "p"}]}}}


def objectives(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["objectives"]}


def test_burn_rates_and_budget_from_synthetic_minutes():
    config = parse_config(BASE)  # availability 0.995, latency 0.95 @ 2.5 s, $0.015, 30 d
    whole = Counts(total=100_000, bad=250, latency_total=100_000, latency_good=97_000, priced=1000, cost_usd=10.0)
    hour = Counts(total=1000, bad=72, latency_total=1000, latency_good=900, priced=10, cost_usd=0.3)
    six = Counts(total=6000, bad=72, latency_total=6000, latency_good=5700, priced=60, cost_usd=0.9)
    days = Counts(total=30_000, bad=150, latency_total=30_000, latency_good=29_000, priced=300, cost_usd=3.0)
    body = report(config, {"window": whole, "1h": hour, "6h": six, "3d": days})
    assert body["window"] == "30d"
    got = objectives(body)
    availability = got["availability"]
    assert availability["objective"] == 0.995
    assert availability["sli"] == pytest.approx(0.9975)
    assert availability["error_budget_remaining"] == pytest.approx(0.5)  # half of the 0.5 % spent
    assert availability["burn_rate"] == pytest.approx({"1h": 14.4, "6h": 2.4, "3d": 1.0})
    latency = got["latency"]
    assert latency["sli"] == pytest.approx(0.97)
    assert latency["error_budget_remaining"] == pytest.approx(0.4)  # 3 % of the 5 % spent
    assert latency["burn_rate"] == pytest.approx({"1h": 2.0, "6h": 1.0, "3d": 0.6667}, abs=1e-4)
    cost = got["cost_per_request"]
    assert cost["sli"] == pytest.approx(0.01)
    assert cost["error_budget_remaining"] == pytest.approx(1 - 0.01 / 0.015)
    assert cost["burn_rate"] == pytest.approx({"1h": 2.0, "6h": 1.0, "3d": 0.6667}, abs=1e-4)
    empty = objectives(report(config, {w: Counts() for w in ("window", "1h", "6h", "3d")}))
    assert empty["availability"]["sli"] == 1.0 and empty["availability"]["burn_rate"]["1h"] == 0.0


def exchange(status=200, outcome="ok", stream=False, ttft=None, cost=None, model="m") -> Exchange:
    x = Exchange("r", "/v1/chat/completions", OPEN, time.perf_counter() - 0.1, endpoint="chat", model=model,
                 stream=stream, status=status, outcome=outcome, cost_usd=cost)
    if ttft is not None:
        x.first_token_at = x.started + ttft
    return x


def test_what_counts_as_bad_and_slow():
    clock = [1_000_000.0]
    slos = SLOs(parse_config(BASE), clock=lambda: clock[0])
    for x in (exchange(), exchange(status=502, outcome="error"), exchange(status=429, outcome="error"),
              exchange(status=200, outcome="error:upstream_error", stream=True, ttft=3.0),
              exchange(stream=True, ttft=0.2, cost=0.03), exchange(model="-")):
        slos.settle(x)
    [counts] = slos.minutes.values()
    # 429 is the client's (not counted); the stream cut after its first byte is bad; admin ("-") ignored
    assert counts == Counts(total=4, bad=2, latency_total=3, latency_good=2, priced=1, cost_usd=0.03)


async def test_window_edges_and_the_table_survives_a_restart(tmp_path):
    clock = [1_000_000 * 60.0]
    config = parse_config({**BASE, "state": {"path": str(tmp_path / "g.db")}})
    slos = SLOs(config, clock=lambda: clock[0])
    slos.settle(exchange(status=500, outcome="error"))  # now - 0 min
    clock[0] += 2 * 3600  # two hours later: outside the 1 h window, inside 6 h
    slos.settle(exchange())
    await slos.flush()
    assert not slos.minutes
    restarted = SLOs(config, clock=lambda: clock[0])
    windows = await restarted.windows()
    assert (windows["1h"].total, windows["1h"].bad) == (1, 0)
    assert (windows["6h"].total, windows["6h"].bad) == (2, 1)
    restarted.settle(exchange(status=503, outcome="error"))  # unflushed: still counted
    assert (await restarted.windows())["1h"].bad == 1
    clock[0] += 31 * 86400  # a month later the old minutes are out of the window and deleted at flush
    await restarted.flush()
    assert MinuteStore(str(tmp_path / "g.db")).sums({"all": 0})["all"].total == 0


async def test_a_store_that_cannot_be_written_keeps_the_counts(tmp_path):
    config = parse_config({**BASE, "state": {"path": str(tmp_path / "missing-dir" / "g.db")}})
    slos = SLOs(config)
    slos.settle(exchange())
    await slos.flush()
    assert sum(c.total for c in slos.minutes.values()) == 1


async def test_admin_slo_end_to_end(nursery, fake, http, tmp_path):
    url, gateway = await start_with(nursery, fake, state={"path": str(tmp_path / "g.db")},
                                    slo={"availability": 0.99, "latency_threshold": 1.0})
    for content in ("ok", "ok", 'fake: {"status": 500}'):
        await http.post(url + "/v1/chat/completions", json=chat_body(content))
    async with httpx.AsyncClient(timeout=30) as anonymous:
        assert (await anonymous.get(url + "/admin/slo")).status_code == 401
    response = await http.get(url + "/admin/slo")
    assert response.status_code == 200
    body = response.json()
    got = objectives(body)
    assert set(got) == {"availability", "latency", "cost_per_request"}
    for o in body["objectives"]:
        assert set(o) >= {"name", "objective", "sli", "error_budget_remaining", "burn_rate"}
        assert set(o["burn_rate"]) == {"1h", "6h", "3d"}
    availability = got["availability"]
    assert (availability["events"], availability["bad_events"]) == (3, 1)
    assert availability["burn_rate"]["1h"] == pytest.approx((1 / 3) / 0.01, rel=1e-3)
    assert got["latency"]["events"] == 2 and got["latency"]["sli"] == 1.0
    assert got["latency"]["threshold_seconds"] == 1.0


async def test_counts_are_flushed_at_shutdown_and_read_after_a_restart(fake, http, tmp_path):
    state = {"path": str(tmp_path / "g.db")}
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        url, _ = await start_with(nursery, fake, stop=stop, state=state)
        for content in ("ok", 'fake: {"status": 503}'):
            await http.post(url + "/v1/chat/completions", json=chat_body(content))
        stop.set()  # drain, then the lifespan shutdown flushes the unflushed minute
    async with trio.open_nursery() as nursery:
        url, _ = await start_with(nursery, fake, state=state)
        got = objectives((await http.get(url + "/admin/slo")).json())
        assert (got["availability"]["events"], got["availability"]["bad_events"]) == (2, 1)
        nursery.cancel_scope.cancel()
