"""The fault matrix end to end: gateway + two fake providers on real sockets, real clients."""

import dataclasses
from functools import partial
from types import SimpleNamespace

import openai
import pytest
import trio

from proxy.server.app import Gateway
from proxy.config import parse_config
from proxy.testing.fake import FakeControl, FakeProvider, FakeSettings
from proxy.server.serve import serve

from .conftest import MASTER_KEY, chat_body, parse_sse

FAST = {"backoff_initial": 0.01, "backoff_max": 0.02}


@pytest.fixture
async def pair(nursery):
    """primary and secondary fake providers; `start(router=..., models=...)` runs a gateway."""
    fakes = {}
    for name in ("primary", "secondary"):
        fake = FakeProvider(FakeSettings(tokens=5))
        fake.port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
        fakes[name] = fake

    async def start(router=None, models=None):
        config = parse_config({
            "server": {"port": 0},
            "auth": {"master_key_env": "K"},
            "router": {**FAST, **(router or {})},
            "providers": {name: {"kind": "openai", "base_url": f"http://127.0.0.1:{f.port}/v1"}
                          for name, f in fakes.items()},
            "models": models or {"gpt-4o": {"deployments": [
                {"provider": "primary", "priority": 0}, {"provider": "secondary", "priority": 1}]}},
        })
        gateway = Gateway(config, {"K": MASTER_KEY})
        binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=trio.sleep_forever))
        return binds[0] + "/v1", gateway

    return SimpleNamespace(start=start, **fakes)


def fail(fake, **settings):
    fake.settings = dataclasses.replace(fake.settings, **settings)


async def test_503_on_the_primary_fails_over_invisibly(pair, http):
    url, _ = await pair.start()
    fail(pair.primary, status=503)
    for stream in (False, True):
        response = await http.post(url + "/chat/completions", json=chat_body(stream=stream))
        assert response.status_code == 200
        assert response.headers["x-gateway-deployment"] == "secondary/gpt-4o"
        assert response.headers["x-gateway-attempts"] == "2"
        if stream:
            assert parse_sse(response.content)[-1] == b"[DONE]"


async def test_429_with_short_retry_after_is_waited_for_then_another_deployment(pair, http):
    url, _ = await pair.start(router={"retry_after_max": 5})
    fail(pair.primary, status=429, retry_after=0.2)
    response = await http.post(url + "/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200 and response.headers["x-gateway-attempts"] == "2"


async def test_hang_before_headers_fails_over_on_the_ttft_timeout(pair, http):
    url, _ = await pair.start(router={"ttft_timeout": 0.3})
    fail(pair.primary, hang_before_headers=True)
    response = await http.post(url + "/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["x-gateway-deployment"] == "secondary/gpt-4o"
    with trio.fail_after(5):  # the abandoned attempt's socket was closed
        await pair.primary.records[-1].closed.wait()


async def test_slow_first_token_after_headers_fails_over_too(pair, http):
    url, _ = await pair.start(router={"ttft_timeout": 0.3})
    fail(pair.primary, ttft=5.0)
    response = await http.post(url + "/chat/completions", json=chat_body(stream=True))
    assert response.headers["x-gateway-deployment"] == "secondary/gpt-4o"
    events = parse_sse(response.content)
    assert events[-1] == b"[DONE]" and sum(b'"role"' in e for e in events) == 1  # no doubled role chunk


async def test_reset_before_the_first_token_fails_over(pair, http):
    url, _ = await pair.start()
    fail(pair.primary, drop_after=0)
    response = await http.post(url + "/chat/completions", json=chat_body(stream=True))
    assert response.headers["x-gateway-deployment"] == "secondary/gpt-4o"
    assert parse_sse(response.content)[-1] == b"[DONE]"


async def test_reset_after_tokens_went_out_is_an_error_event_not_a_switch(pair, http):
    url, _ = await pair.start()
    fail(pair.primary, drop_after=2)
    response = await http.post(url + "/chat/completions", json=chat_body(stream=True))
    assert response.headers["x-gateway-deployment"] == "primary/gpt-4o"
    assert b"[DONE]" not in response.content and b"upstream_error" in response.content
    assert pair.secondary.records == []


async def test_revoked_key_opens_the_breaker_and_traffic_moves(pair, http):
    url, gateway = await pair.start()
    fail(pair.primary, status=401)
    first = await http.post(url + "/chat/completions", json=chat_body())
    assert first.status_code == 200 and first.headers["x-gateway-attempts"] == "2"
    second = await http.post(url + "/chat/completions", json=chat_body())
    assert second.headers["x-gateway-attempts"] == "1"  # straight to the secondary
    assert len(pair.primary.records) == 1
    routing = (await http.get(url.removesuffix("/v1") + "/admin/routing")).json()
    primary = next(d for d in routing["deployments"] if d["name"] == "primary/gpt-4o")
    assert primary["state"] == "open" and "invalid_api_key" in primary["reason"]


async def test_400_is_not_retried(pair, http):
    url, _ = await pair.start()
    fail(pair.primary, status=400)
    response = await http.post(url + "/chat/completions", json=chat_body())
    assert response.status_code == 400
    assert pair.secondary.records == [] and len(pair.primary.records) == 1


async def test_the_sdk_never_sees_a_failover(pair):
    url, _ = await pair.start()
    fail(pair.primary, status=503)

    def call():
        client = openai.OpenAI(base_url=url, api_key=MASTER_KEY, max_retries=0)
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "hi"}]) if c.choices)

    assert await trio.to_thread.run_sync(call)


async def test_admin_needs_the_master_key_and_bypass_toggles(pair, http):
    url, gateway = await pair.start()
    base = url.removesuffix("/v1")
    assert (await http.get(base + "/admin/routing", headers={"authorization": "Bearer nope"})).status_code == 401
    bad = await http.post(base + "/admin/bypass", json={"enabled": "yes"})
    assert bad.status_code == 400
    fail(pair.primary, status=503)
    assert (await http.post(base + "/admin/bypass", json={"enabled": True})).json() == {"bypass": True}
    response = await http.post(url + "/chat/completions", json=chat_body())
    assert response.status_code == 502  # bypass: the primary's failure reaches the client
    assert (await http.get(base + "/admin/routing")).json()["bypass"] is True
    await http.post(base + "/admin/bypass", json={"enabled": False})
    response = await http.post(url + "/chat/completions", json=chat_body())
    assert response.status_code == 200


async def test_deployment_header_only_where_allowed(pair, http):
    models = {"gpt-4o": {"allow_deployment_header": True, "deployments": [
        {"provider": "primary"}, {"provider": "secondary"}]}}
    url, _ = await pair.start(models=models)
    response = await http.post(url + "/chat/completions", json=chat_body(),
                               headers={"x-gateway-deployment": "secondary/gpt-4o"})
    assert response.headers["x-gateway-deployment"] == "secondary/gpt-4o"
    response = await http.post(url + "/chat/completions", json=chat_body(),
                               headers={"x-gateway-deployment": "elsewhere"})
    assert response.status_code == 400


async def test_embeddings_fail_over_like_chat(pair, http):
    url, _ = await pair.start()
    fail(pair.primary, status=503)
    response = await http.post(url + "/embeddings", json={"model": "gpt-4o", "input": ["a", "b"]})
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-deployment"] == "secondary/gpt-4o"
    assert len(response.json()["data"]) == 2


async def test_a_burst_of_503s_on_half_the_primarys_requests_never_reaches_clients(pair, http):
    # 9:1 at one priority, breaker tolerant enough to stay closed: retries alone absorb the burst
    models = {"gpt-4o": {"deployments": [{"provider": "primary", "weight": 9},
                                         {"provider": "secondary", "weight": 1}]}}
    url, gateway = await pair.start(router={"breaker_failures": 1000, "breaker_failure_rate": 1.0},
                                    models=models)
    pair.primary.control = FakeControl(fail_percent=50, fail_status=503)

    async def one(stream):
        response = await http.post(url + "/chat/completions", json=chat_body(stream=stream))
        assert response.status_code == 200, response.text
        results.append(response.headers["x-gateway-attempts"])

    results = []
    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i % 2 == 0)
    assert len(results) == 40 and "2" in results  # some needed their retry, none failed
    failed = sum(r.status == 503 for r in pair.primary.records)
    assert failed >= 10


async def test_a_full_provider_is_waited_for_at_most_queue_timeout_then_429(start_gateway, http):
    """A provider's max_concurrency is admission control like a deployment's: bounded by
    queue_timeout, a 429 gateway_saturated (no breaker failure), never a silent queue."""
    running = await start_gateway(provider={"max_concurrency": 1}, router={"queue_timeout": 0.2})
    slow = {"model": "gpt-4o", "messages": [{"role": "user", "content": 'fake: {"ttft": 1.0, "tokens": 2}'}]}
    statuses: list[int] = []
    bodies: list[dict] = []

    async def ask():
        response = await http.post(running.v1 + "/chat/completions", json=slow)
        statuses.append(response.status_code)
        bodies.append(response.json())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.sleep(0.1)  # the first holds the provider's one slot for ~1 s
        nursery.start_soon(ask)
    assert statuses == [429, 200]
    assert bodies[0]["error"]["code"] == "gateway_saturated" and "provider fake" in bodies[0]["error"]["message"]
    routing = (await http.get(running.url + "/admin/routing")).json()
    assert [(d["state"], d["consecutive_failures"]) for d in routing["deployments"]] == [("closed", 0)] * 2
