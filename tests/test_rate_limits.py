"""rpm, tpm and max_parallel per key end to end, on both backends: 429 rate_limit_exceeded with
Retry-After, and OpenAI's x-ratelimit-* headers on every response of a limited key."""

from __future__ import annotations

import openai
import pytest
import trio

from proxy.keys.policy import ratelimit_reset
from tests.conftest import chat_body
from tests.keys_gateway import bearer, create_key, keys_gateway  # noqa: F401 (fixture)
from tests.redis_server import redis_url  # noqa: F401 (fixture)
from tests.test_budgets import state  # noqa: F401 (fixture: both backends)


async def test_rpm_refuses_the_extra_request_with_retry_after_and_headers(keys_gateway, http, state):
    gw = await keys_gateway(state=state)
    key = bearer((await create_key(http, gw.url, rpm=3, tpm=100000))["key"])
    seen = []
    for _ in range(3):
        response = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=20))
        assert response.status_code == 200
        seen.append(response.headers)
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert all(h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-limit-tokens"] == "100000" for h in seen)
    assert int(seen[0]["x-ratelimit-remaining-tokens"]) < 100000
    assert seen[0]["x-ratelimit-reset-requests"] in ("1m0s", "59s")
    refused = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body())
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error" and "rpm" in refused.json()["error"]["message"]
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"  # on the refusal too
    # the OpenAI SDK reads it as its own RateLimitError
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=key["authorization"][7:], max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    # the master key and other keys are not limited by this one
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body())).status_code == 200


async def test_tpm_counts_the_reservation_then_settles_to_real_tokens(keys_gateway, http, state):
    gw = await keys_gateway(state=state)
    key = bearer((await create_key(http, gw.url, tpm=300))["key"])
    # Each request reserves prompt (~8) + max_tokens 100 tokens but uses ~16: sequential requests
    # fit many times over; if settle did not correct the window, only 2 would.
    for n in range(8):
        response = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=100))
        assert response.status_code == 200, (n, response.text)
        with trio.fail_after(5):  # the settle reaches the store just after the response
            while True:
                probe = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=250))
                if probe.status_code == 429:
                    break
                await trio.sleep(0.01)
    too_big = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body(max_tokens=1000))
    assert too_big.status_code == 429 and "tpm" in too_big.json()["error"]["message"]
    assert int(too_big.headers["retry-after"]) >= 1


async def test_max_parallel_streams(keys_gateway, http, state):
    gw = await keys_gateway(state=state)
    key = bearer((await create_key(http, gw.url, max_parallel=2))["key"])
    slow = chat_body("fake: {\"itl\": 0.05, \"tokens\": 10}", stream=True)
    async with http.stream("POST", gw.v1 + "/chat/completions", headers=key, json=slow) as one, \
            http.stream("POST", gw.v1 + "/chat/completions", headers=key, json=slow) as two:
        assert one.status_code == two.status_code == 200
        third = await http.post(gw.v1 + "/chat/completions", headers=key, json=slow)
        assert third.status_code == 429 and "max_parallel" in third.json()["error"]["message"]
        plain = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body())
        assert plain.status_code == 200  # parallel counts streams only
        await one.aread()
        await two.aread()
    with trio.fail_after(5):
        while (await http.post(gw.v1 + "/chat/completions", headers=key, json=slow)).status_code != 200:
            await trio.sleep(0.02)


async def test_a_key_without_limits_gets_no_ratelimit_headers(keys_gateway, http):
    gw = await keys_gateway()
    key = bearer((await create_key(http, gw.url))["key"])
    response = await http.post(gw.v1 + "/chat/completions", headers=key, json=chat_body())
    assert response.status_code == 200 and not any(h.startswith("x-ratelimit") for h in response.headers)


def test_reset_header_format_is_openais():
    assert [ratelimit_reset(s) for s in (0.02, 1, 59.2, 60, 360)] == [b"20ms", b"1s", b"1m0s", b"1m0s", b"6m0s"]
