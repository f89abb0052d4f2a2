"""Prices and cost: shipped table and overrides, cost from usage, cut streams billed, config errors."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
import trio

from proxy.accounting.model_info import PRICES_DATE, SHIPPED, ModelTable
from proxy.accounting.policy import AccountingPolicy
from proxy.accounting.prices import DEFAULT_MAX_OUTPUT, Prices
from proxy.accounting.relayed import MAX_KEPT_BYTES
from proxy.accounting.tokens import count_chat
from proxy.config import parse_config
from proxy.core.encodings import encoding
from proxy.core.errors import ConfigError
from proxy.core.usage import Usage
from proxy.routing.failover import Served
from proxy.server.exchange import OPEN, Exchange, Policies

from .conftest import chat_body, parse_sse
from .test_context import start


def config(**sections: Any):
    return parse_config({"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                         "models": {"m": {"deployments": [{"provider": "p"}]}}, **sections})


# -- the price table --

def test_shipped_prices_have_a_date_and_match_the_published_figures():
    assert PRICES_DATE.count("-") == 2
    prices = Prices.from_config(config())
    gpt4o = prices.info("gpt-4o-2024-08-06")
    assert (gpt4o.input_usd_per_mtok, gpt4o.output_usd_per_mtok, gpt4o.cached_input_usd_per_mtok) == (2.5, 10.0, 1.25)
    assert prices.info("gpt-4o-mini").input_usd_per_mtok == 0.15  # the longer pattern wins over gpt-4o*
    sonnet = prices.info("claude-sonnet-4-20250514")
    assert (sonnet.cached_input_usd_per_mtok, sonnet.cache_write_usd_per_mtok) == (0.30, 3.75)
    assert sonnet.encoding == "approximate" and sonnet.token_margin == 1.2
    assert prices.info("claude-opus-4-5-20251101").input_usd_per_mtok == 5.0
    assert all(row[4] > row[5] for row in SHIPPED.values())  # every window leaves room for its output cap


def test_config_overrides_only_the_fields_it_sets():
    prices = Prices.from_config(config(model_info={
        "gpt-4o": {"input_usd_per_mtok": 2.0, "context_window": 64000},
        "my-llama*": {"input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.2, "encoding": "cl100k_base",
                      "token_margin": 1.05, "max_output_tokens": 2048},
    }))
    gpt4o = prices.info("gpt-4o")
    assert (gpt4o.input_usd_per_mtok, gpt4o.output_usd_per_mtok, gpt4o.context_window) == (2.0, 10.0, 64000)
    assert prices.info("gpt-4o-2024-08-06").input_usd_per_mtok == 2.5  # an exact entry is only that name
    llama = prices.info("my-llama-3.1-8b")
    assert (llama.output_usd_per_mtok, llama.encoding, llama.token_margin, llama.context_window) == (0.2, "cl100k_base", 1.05, None)


def test_cost_prices_cached_and_written_tokens_at_their_own_rates():
    prices = Prices.from_config(config())
    usage = Usage(prompt_tokens=10_000, completion_tokens=2_000, cached_tokens=4_000, cache_write_tokens=1_000)
    expected = (5_000 * 3.0 + 4_000 * 0.30 + 1_000 * 3.75 + 2_000 * 15.0) / 1e6
    assert prices.cost_usd("claude-sonnet-4-5", usage) == pytest.approx(expected)
    # OpenAI has no cache write price: written tokens cost the input price.
    assert prices.cost_usd("gpt-4o", Usage(prompt_tokens=1000, cache_write_tokens=1000)) == pytest.approx(1000 * 2.5 / 1e6)


def test_worst_case_uses_max_tokens_or_the_models_output_cap():
    prices = Prices.from_config(config())
    assert prices.worst_case_usd("gpt-4o", 1000, 500) == pytest.approx((1000 * 2.5 + 500 * 10.0) / 1e6)
    assert prices.worst_case_usd("gpt-4o", 1000, None) == pytest.approx((1000 * 2.5 + 16_384 * 10.0) / 1e6)
    unknown = Prices.from_config(config(model_info={"house-model": {"output_usd_per_mtok": 1.0}}))
    assert unknown.worst_case_usd("house-model", 0, None) == pytest.approx(DEFAULT_MAX_OUTPUT / 1e6)


def test_an_unpriced_model_costs_nothing_and_says_so_once(caplog):
    prices = Prices.from_config(config())
    assert prices.cost_usd("llama3.1:8b", Usage(prompt_tokens=100, completion_tokens=100)) == 0.0
    prices.cost_usd("llama3.1:8b", Usage(prompt_tokens=100))
    assert [r.getMessage() for r in caplog.records].count(
        "no price for model 'llama3.1:8b': its cost counts as $0 (set [model_info.\"llama3.1:8b\"])") == 1


@pytest.mark.parametrize("section,key,expected", [
    ({"gpt-4o": {"input_usd_per_mtok": -1}}, 'model_info."gpt-4o".input_usd_per_mtok', ">= 0"),
    ({"gpt-4o": {"output_usd_per_mtok": "3"}}, 'model_info."gpt-4o".output_usd_per_mtok', "a number"),
    ({"gpt-4o": {"context_window": 1.5}}, 'model_info."gpt-4o".context_window', "an integer"),
    ({"gpt-4o": {"encoding": "p50k_base"}}, 'model_info."gpt-4o".encoding', '"o200k_base" or "cl100k_base" or "approximate"'),
    ({"gpt-4o": {"context_window": 1000, "max_output_tokens": 1000}}, 'model_info."gpt-4o".max_output_tokens', "less than context_window"),
    ({"gpt-4o": {"input_per_mtok": 1}}, 'model_info."gpt-4o".input_per_mtok', "no such key"),
    ({"gpt-4o": 3}, 'model_info."gpt-4o"', "a table"),
    ({"gpt-4o": {"token_margin": 0.5}}, 'model_info."gpt-4o".token_margin', ">= 1"),
])
def test_model_info_errors_name_the_key(section, key, expected):
    with pytest.raises(ConfigError) as raised:
        config(model_info=section)
    assert raised.value.key == key and expected in raised.value.expected


def test_context_strategy_errors_name_the_key():
    with pytest.raises(ConfigError) as raised:
        parse_config({"providers": {"p": {"kind": "openai", "base_url": "http://x"}},
                      "models": {"m": {"deployments": [{"provider": "p"}], "context_strategy": "truncate"}}})
    assert raised.value.key == 'models."m".context_strategy'
    assert raised.value.expected == '"reject" or "sliding_window"'


# -- the policy, end to end --

class Observed:
    """Settles after accounting (as metrics do) and keeps what it saw."""

    def __init__(self):
        self.seen: list[dict[str, Any]] = []

    async def admit(self, x, request):
        pass

    def settle(self, x):
        self.seen.append({"cost": x.cost_usd, "usage": x.usage, "outcome": x.outcome, "notes": dict(x.notes),
                          "served": x.served.model if x.served else None})


async def observe(gw) -> Observed:
    observed = Observed()
    gw.gateway.policies.add(observed, Policies.METRICS)
    return observed


async def settled(observed: Observed, n: int = 1) -> list[dict[str, Any]]:
    with trio.fail_after(5):  # the server settles just after the response's last byte
        while len(observed.seen) < n:
            await trio.sleep(0.01)
    return observed.seen


async def test_a_served_request_costs_its_providers_usage(nursery, fake, http):
    gw = await start(nursery, fake.port)
    observed = await observe(gw)
    body = chat_body("How much does this cost?", model="small", max_tokens=30)
    response = await http.post(gw.v1 + "/chat/completions", json=body)
    assert response.status_code == 200
    usage = response.json()["usage"]
    [seen] = await settled(observed)
    assert seen["served"] == "gpt-4o"
    assert seen["notes"]["prompt_tokens"] == count_chat(body, "o200k_base")
    assert seen["notes"]["max_tokens"] == 30
    assert seen["cost"] == pytest.approx((usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10.0) / 1e6)


async def test_without_max_tokens_the_reservation_is_the_output_cap_within_the_window(nursery, fake, http):
    gw = await start(nursery, fake.port, window=400)  # gpt-4o: max_output_tokens 50 in this config
    observed = await observe(gw)
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body("hi", model="small"))).status_code == 200
    long = "word " * 360
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body(long, model="small"))).status_code == 200
    first, second = await settled(observed, 2)
    assert first["notes"]["max_tokens"] == 50
    assert second["notes"]["max_tokens"] == 400 - second["notes"]["prompt_tokens"] < 50


async def test_a_stream_cut_before_its_usage_is_billed_for_what_was_relayed(nursery, fake, http):
    gw = await start(nursery, fake.port)
    observed = await observe(gw)
    body = chat_body('fake: {"drop_after": 5, "tokens": 40}', model="small", stream=True,
                     stream_options={"include_usage": True})
    async with http.stream("POST", gw.v1 + "/chat/completions", json=body) as response:
        raw = await response.aread()
    events = [orjson.loads(e) for e in parse_sse(raw)]
    assert "error" in events[-1] and not any(e.get("usage") for e in events)  # the provider's usage never came
    text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
    relayed = len(encoding("o200k_base").encode(text))
    assert relayed >= 5
    [seen] = await settled(observed)
    prompt = count_chat(body, "o200k_base")
    assert (seen["usage"].prompt_tokens, seen["usage"].completion_tokens) == (prompt, relayed)
    assert seen["notes"]["usage_counted"] is True
    assert seen["cost"] == pytest.approx((prompt * 2.5 + relayed * 10.0) / 1e6)


async def test_a_client_that_leaves_mid_stream_is_still_billed(nursery, fake, http):
    gw = await start(nursery, fake.port)
    observed = await observe(gw)
    body = chat_body('fake: {"tokens": 1000, "itl": 0.01}', model="small", stream=True)
    received = b""
    async with http.stream("POST", gw.v1 + "/chat/completions", json=body) as response:
        async for part in response.aiter_bytes():
            received += part
            if received.count(b"data: ") >= 6:
                break
    [seen] = await settled(observed)
    assert seen["outcome"] == "client_disconnected"
    assert seen["usage"].completion_tokens >= 5  # what the client got, at least
    assert seen["usage"].prompt_tokens == count_chat(body, "o200k_base")
    assert seen["cost"] > 0


async def test_a_long_cut_stream_is_extrapolated_past_the_kept_chunks(nursery, fake, http):
    gw = await start(nursery, fake.port)
    observed = await observe(gw)
    body = chat_body('fake: {"drop_after": 400, "tokens": 1000, "token_bytes": 3}', model="small", stream=True)
    async with http.stream("POST", gw.v1 + "/chat/completions", json=body) as response:
        raw = await response.aread()
    events = [orjson.loads(e) for e in parse_sse(raw)]
    assert len(raw) > 2 * MAX_KEPT_BYTES  # more than the tap keeps
    text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
    relayed = len(encoding("o200k_base").encode(text))
    [seen] = await settled(observed)
    assert abs(seen["usage"].completion_tokens - relayed) <= 0.1 * relayed


async def test_a_stream_with_usage_is_billed_from_the_providers_figures(nursery, fake, http):
    gw = await start(nursery, fake.port)
    observed = await observe(gw)
    body = chat_body("Hi there", model="small", stream=True, stream_options={"include_usage": True})
    async with http.stream("POST", gw.v1 + "/chat/completions", json=body) as response:
        events = [orjson.loads(e) for e in parse_sse(await response.aread())[:-1]]
    usage = events[-1]["usage"]
    [seen] = await settled(observed)
    assert (seen["usage"].prompt_tokens, seen["usage"].completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert "usage_counted" not in seen["notes"]


def test_answers_not_from_a_provider_cost_nothing():
    policy = AccountingPolicy(config())
    for cache in ("hit", "stale"):
        x = Exchange("r", "/v1/chat/completions", OPEN, 0.0, served=Served(model="gpt-4o"),
                     usage=Usage(prompt_tokens=100, completion_tokens=100), cache=cache)
        policy.settle(x)
        assert x.cost_usd == 0.0
    x = Exchange("r", "/v1/chat/completions", OPEN, 0.0, served=Served(model="gpt-4o"),
                 usage=Usage(prompt_tokens=1000, completion_tokens=100), cache="miss")
    policy.settle(x)
    assert x.cost_usd == pytest.approx((1000 * 2.5 + 100 * 10.0) / 1e6)
    refused = Exchange("r", "/v1/chat/completions", OPEN, 0.0)
    policy.settle(refused)
    assert refused.cost_usd is None


def test_model_lookups_are_cached_and_bounded():
    table = ModelTable()
    assert table.lookup("gpt-4o") is table.lookup("gpt-4o")
    for i in range(5000):
        table.lookup(f"client-model-{i}")
    assert len(table._cache) <= 4096
    assert math.isclose(table.lookup("gpt-4o").input_usd_per_mtok, 2.5)


async def test_a_cut_anthropic_passthrough_stream_is_billed_from_its_relayed_text(nursery, fake, http):
    gw = await start(nursery, fake.port, kind="anthropic")
    observed = await observe(gw)
    body = {"model": "small", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": 'fake: {"drop_after": 6, "tokens": 40}'}]}
    async with http.stream("POST", gw.url + "/v1/messages", json=body) as response:
        raw = await response.aread()
    events = [orjson.loads(e) for e in parse_sse(raw)]
    assert events[-1]["type"] == "error"
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    [seen] = await settled(observed)
    start_usage = events[0]["message"]["usage"]  # message_start: the provider's input count
    assert seen["usage"].prompt_tokens == start_usage["input_tokens"]
    assert seen["usage"].completion_tokens == len(encoding("o200k_base").encode(text)) >= 6
    assert seen["cost"] == pytest.approx((seen["usage"].prompt_tokens * 2.5 + seen["usage"].completion_tokens * 10.0) / 1e6)


def test_the_readme_example_is_a_valid_config():
    import re
    import tomllib
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Tokens, context windows and prices", 1)[1].split("\n## ", 1)[0]
    raw = tomllib.loads(re.findall(r"```toml\n(.*?)```", section, re.S)[0])
    parsed = parse_config({"providers": {"primary": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}}, **raw})
    assert parsed.route("gpt-4o").context_strategy == "sliding_window"
    assert Prices.from_config(parsed).info("llama3.1").token_margin == 1.05
