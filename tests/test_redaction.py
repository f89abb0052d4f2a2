"""No provider key ever reaches a client or a log line, whatever the upstream echoes, and echoed
input stays bounded in errors and logs.

The fake's `echo_key` puts the key it received everywhere a response can carry it: the status
line's reason, headers (Retry-After too), every field of an error body, error events mid-stream.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import httpx
import pytest
import trio

from proxy.config import parse_config
from proxy.server.app import Gateway
from proxy.server.serve import serve
from proxy.testing.fake import FakeProvider, FakeSettings

from .conftest import MASTER_KEY, PROVIDER_KEY, Running
from .kinds import KINDS, MODELS

FAKE_PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ollama": "/api/chat"}


def config(port: int):
    base = f"http://127.0.0.1:{port}"
    return parse_config({
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "router": {"backoff_initial": 0.001, "backoff_max": 0.002, "retry_after_max": 0.01},
        "providers": {
            "openai": {"kind": "openai", "base_url": base + "/v1", "api_key_env": "TEST_PROVIDER_KEY"},
            "anthropic": {"kind": "anthropic", "base_url": base, "api_key_env": "TEST_PROVIDER_KEY"},
            # a key for Ollama too (an auth proxy in front of it): it can be echoed as well
            "ollama": {"kind": "ollama", "base_url": base, "api_key_env": "TEST_PROVIDER_KEY"},
        },
        "models": {MODELS[k]: {"deployments": [{"provider": k, "model": f"{k}-fake"}]} for k in KINDS},
    })


@pytest.fixture
async def echoing(nursery):
    fake = FakeProvider(FakeSettings(tokens=4))
    fake.port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
    cfg = config(fake.port)
    gateway = Gateway(cfg, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    binds = await nursery.start(partial(serve, cfg, gateway, shutdown_trigger=trio.sleep_forever))
    return Running(binds[0], gateway, trio.Event()), fake


def leaks(response: httpx.Response) -> list[str]:
    """Where the key shows in what the client got."""
    found = []
    if PROVIDER_KEY in response.text:
        found.append("body")
    if PROVIDER_KEY in response.reason_phrase:
        found.append("reason")
    found += [f"header {name}" for name, value in response.headers.items()
              if PROVIDER_KEY in name or PROVIDER_KEY in value]
    return found


def logged(caplog) -> list[str]:
    """Gateway log lines (and tracebacks) that show the key; the fake's own lines are not ours."""
    return [r.getMessage() for r in caplog.records if not r.name.startswith("proxy.testing")
            and (PROVIDER_KEY in r.getMessage() or PROVIDER_KEY in (r.exc_text or ""))]


# What the upstream does, as a fake directive (echo_key is added). Status errors before any byte,
# error events before and after the first token (a 5xx kind and a 4xx kind), and a success whose
# headers and status line carry the key.
SCENARIOS = {
    "400": {"status": 400},
    "401": {"status": 401},
    "429": {"status": 429},
    "500": {"status": 500},
    "event-first": {"error_after": 0},
    "event-later": {"error_after": 2},
    "event-4xx": {"error_after": 0, "error_event_status": 400},
    "ok": {},
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_echoing_its_key_never_gets_it_to_the_client_or_the_log(
        echoing, caplog, kind, scenario, path, stream):
    gw, fake = echoing
    caplog.set_level(logging.DEBUG)
    directive = orjson_line({**SCENARIOS[scenario], "echo_key": True})
    body = {"model": MODELS[kind], "stream": stream, "max_tokens": 20,
            "messages": [{"role": "user", "content": f"Hi\n{directive}"}]}
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        response = await client.post(gw.url + path, json=body)
        snapshot = (await client.get(gw.url + "/admin/routing")).text
    assert fake.records, "the request reached the fake"
    if scenario == "ok" or not stream and scenario.startswith("event"):  # no events without a stream
        assert response.status_code == 200, response.text
    elif scenario.isdigit():
        assert response.status_code >= 400, response.text
    else:  # an error event: in the body of a 200 once the stream was committed, else a status
        assert response.status_code >= 400 or b"error" in response.content, response.text
    assert leaks(response) == []
    assert logged(caplog) == []
    assert PROVIDER_KEY not in snapshot  # the breaker's reason and last_error (/admin/routing)


def orjson_line(directive: dict) -> str:
    import orjson

    return "fake: " + orjson.dumps(directive).decode()


@pytest.mark.parametrize("kind", ["openai", "ollama"])
@pytest.mark.parametrize("status", [400, 401, 429, 500, 200])
async def test_embeddings_from_an_echoing_upstream_carry_no_key(echoing, caplog, kind, status):
    gw, fake = echoing
    caplog.set_level(logging.DEBUG)
    fake.settings = dataclasses.replace(fake.settings, status=status, echo_key=True)
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        response = await client.post(gw.url + "/v1/embeddings", json={"model": MODELS[kind], "input": "hi"})
    assert response.status_code == (200 if status == 200 else status if status < 500 else 502)
    assert leaks(response) == [] and logged(caplog) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_the_fake_really_echoes_the_key_everywhere(echoing, kind):
    """The counter-check: without the gateway in between, the key is everywhere."""
    _, fake = echoing
    headers = {"x-api-key": PROVIDER_KEY} if kind == "anthropic" else {"authorization": f"Bearer {PROVIDER_KEY}"}
    url = f"http://127.0.0.1:{fake.port}{FAKE_PATHS[kind]}"
    async with httpx.AsyncClient(timeout=10, headers=headers) as client:
        for directive, stream in (({"status": 429}, False), ({"error_after": 1}, True)):
            content = orjson_line({**directive, "echo_key": True})
            body = {"model": "m", "max_tokens": 10, "stream": stream, "messages": [{"role": "user", "content": content}]}
            response = await client.post(url, json=body)
            where = leaks(response)
            assert "body" in where and "reason" in where and "header x-echo-key" in where, where
            if directive.get("status") == 429:
                assert response.headers["retry-after"] == PROVIDER_KEY
            if kind == "openai" and not stream:
                error = response.json()["error"]
                assert error["type"] == error["param"] == error["code"] == PROVIDER_KEY


async def test_a_retry_after_that_is_not_a_delay_or_a_date_is_dropped(echoing):
    gw, fake = echoing
    fake.settings = dataclasses.replace(fake.settings, status=429)
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        echoed = await client.post(gw.v1 + "/chat/completions", json={
            "model": MODELS["openai"], "messages": [{"role": "user", "content": 'x\nfake: {"echo_key": true}'}]})
        honest = await client.post(gw.v1 + "/chat/completions", json={  # after: it cools the deployment
            "model": MODELS["openai"], "messages": [{"role": "user", "content": 'x\nfake: {"retry_after": 7}'}]})
    assert honest.status_code == 429 and honest.headers["retry-after"] == "7"
    assert echoed.status_code == 429 and "retry-after" not in echoed.headers


# -- echoed input is bounded --

async def test_a_huge_model_name_is_neither_echoed_nor_logged_whole(echoing, caplog):
    gw, _ = echoing
    caplog.set_level(logging.INFO)
    huge = "m" * 1_000_000
    async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        for path, body in (("/v1/chat/completions", {"model": huge, "messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/messages", {"model": huge, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/embeddings", {"model": huge, "input": "x"})):
            response = await client.post(gw.url + path, json=body)
            assert response.status_code == 400 and len(response.content) < 1000, response.text[:300]
        # an unknown model under the length bound is a 404 that echoes it cut to 200 characters
        long = "x" * 250
        response = await client.post(gw.v1 + "/chat/completions",
                                     json={"model": long, "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 404
        message = response.json()["error"]["message"]
        assert "x" * 200 + "…" in message and "x" * 201 not in message
        # a huge path: bounded by the same rule
        response = await client.get(gw.url + "/" + "p" * 20_000)
        assert response.status_code == 404 and len(response.content) < 1500
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("proxy.server")]
    assert lines and max(map(len, lines)) < 1500, max(map(len, lines))
