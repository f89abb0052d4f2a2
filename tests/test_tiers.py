"""Cost-aware routing: the rules offline (a pure function), the config, and the alias end to end."""

from __future__ import annotations

import os
import sys
from functools import partial

import httpx
import pytest
import trio

from proxy.accounting.tokens import count_chat
from proxy.config import ConfigError, parse_config
from proxy.routing.tiers import Classifier, Features, features
from proxy.server.app import Gateway
from proxy.server.exchange import Policies
from proxy.server.serve import serve

from .conftest import MASTER_KEY, PROVIDER_KEY, Running

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import tier_savings  # noqa: E402 - the labelled prompt set and its request bodies


def config(tiers: dict, models=("gpt-4o-mini", "gpt-4o", "claude-haiku-4-5", "claude-sonnet-4-5",
                                 "claude-opus-4-1"), port: int = 9):
    return parse_config({
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "providers": {"fake": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                               "api_key_env": "TEST_PROVIDER_KEY"}},
        "models": {m: {"deployments": [{"provider": "fake"}]} for m in models},
        "tiers": tiers,
    })


def classify(tiers: dict, f: Features):
    tier, reason = Classifier(config({"auto": tiers}).tiers["auto"]).classify(f)
    return tier.name, reason


GPT = {"preset": "gpt"}
CLAUDE = {"preset": "claude"}


def test_the_gpt_preset_explains_each_decision():
    assert classify(GPT, Features(200, last_user="What is the capital of France?")) == ("cheap", "tokens<1000")
    assert classify(GPT, Features(1000)) == ("strong", "tokens>=1000")
    assert classify(GPT, Features(10, max_tokens=1024)) == ("cheap", "tokens<1000")
    assert classify(GPT, Features(10, max_tokens=1025)) == ("strong", "max_tokens>1024")
    assert classify(GPT, Features(10, tools=True)) == ("cheap", "tokens<1000")  # gpt-4o-mini calls tools well
    assert classify(GPT, Features(10, json_schema=True)) == ("strong", "json_schema")
    assert classify(GPT, Features(10, images=True)) == ("strong", "images")
    assert classify(GPT, Features(10, last_user="Please PROVE this.")) == ("strong", "keyword:prove")
    assert classify(GPT, Features(10, last_user="go step by step")) == ("strong", "keyword:step_by_step")
    assert classify(GPT, Features(10, last_user="improved planning")) == ("cheap", "tokens<1000")  # whole words


def test_the_claude_preset_has_three_tiers():
    assert classify(CLAUDE, Features(10, last_user="hi")) == ("cheap", "tokens<1000")
    assert classify(CLAUDE, Features(10, tools=True)) == ("balanced", "tokens<50000")
    assert classify(CLAUDE, Features(5000, last_user="summarize")) == ("balanced", "tokens<50000")
    assert classify(CLAUDE, Features(10, last_user="prove the theorem")) == ("strong", "keyword:prove")
    assert classify(CLAUDE, Features(60000)) == ("strong", "tokens>=50000")


def test_custom_tiers_patterns_and_the_budget_floor():
    tiers = {"budget_floor_usd": 2.5, "tiers": [
        {"name": "small", "model": "gpt-4o-mini", "patterns": [r"\bSQL\b", r"^translate:"], "tools": False},
        {"name": "big", "model": "gpt-4o"}]}
    assert classify(tiers, Features(10, last_user="write SQL for me")) == ("big", "pattern#0")
    assert classify(tiers, Features(10, last_user="translate: hola")) == ("big", "pattern#1")
    assert classify(tiers, Features(10, tools=True)) == ("big", "tools")
    assert classify(tiers, Features(10, last_user="hello")) == ("small", "fits")
    # near the kill switch: the cheapest tier, whatever was asked
    assert classify(tiers, Features(10, tools=True, budget_remaining_usd=2.0)) == ("small", "budget<2.5")
    assert classify(tiers, Features(10, tools=True, budget_remaining_usd=3.0)) == ("big", "tools")


def test_features_of_a_request():
    body = {"model": "auto", "max_completion_tokens": 50, "response_format": {"type": "json_schema"},
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "look"},
                                                      {"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert features(body, 42) == Features(42, 50, True, True, True, "look", None)
    assert features({"messages": [{"role": "user", "content": "x"}]}, 1) == Features(1, last_user="x")


@pytest.mark.parametrize("tiers, where", [
    ({"preset": "llama"}, 'tiers."auto".preset'),
    ({"tiers": [{"name": "a", "model": "gpt-4o"}]}, 'tiers."auto".tiers'),
    ({"tiers": [{"name": "a", "model": "gpt-4o-mini"}, {"name": "b", "model": "gpt-4o", "tools": False}]},
     'tiers."auto".tiers[1]'),
    ({"tiers": [{"name": "a", "model": "gpt-4o-mini", "patterns": ["("]}, {"name": "b", "model": "gpt-4o"}]},
     'tiers."auto".tiers[0].patterns[0]'),
    ({"tiers": [{"name": "a", "model": "gpt-4o-mini", "max_prompt_tokens": 0}, {"name": "b", "model": "x"}]},
     'tiers."auto".tiers[0].max_prompt_tokens'),
    ({"tiers": [{"name": "a", "model": "gpt-4o-mini"}, {"name": "a", "model": "gpt-4o"}]}, 'tiers."auto".tiers'),
    ({"preset": "gpt", "models": {"huge": "x"}}, 'tiers."auto".models.huge'),
    ({"preset": "gpt", "colour": 1}, 'tiers."auto".colour'),
])
def test_bad_tier_config_names_the_key(tiers, where):
    with pytest.raises(ConfigError) as e:
        config({"auto": tiers})
    assert where in str(e.value)


def test_tier_models_must_be_model_groups_and_the_alias_must_not_be_one():
    with pytest.raises(ConfigError) as e:
        Gateway(config({"auto": {"preset": "gpt", "models": {"cheap": "nope"}}}), {"TEST_PROVIDER_KEY": "k"})
    assert 'tiers."auto".tiers[0].model' in str(e.value) and "nope" in str(e.value)
    with pytest.raises(ConfigError) as e:
        Gateway(config({"gpt-4o": {"preset": "gpt"}}), {"TEST_PROVIDER_KEY": "k"})
    assert 'tiers."gpt-4o"' in str(e.value)


async def test_the_alias_routes_each_request_to_its_tier(nursery, fake):
    cfg = config({"auto": {"preset": "gpt"}}, port=fake.port)
    gateway = Gateway(cfg, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    seen = []

    class Notes:
        async def admit(self, x, request):
            pass

        def settle(self, x):
            seen.append((x.notes.get("tier"), x.notes.get("tier_reason")))

    gateway.policies.add(Notes(), Policies.METRICS)
    stop = trio.Event()
    gw = Running((await nursery.start(partial(serve, cfg, gateway, shutdown_trigger=stop.wait)))[0], gateway, stop)
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=30) as http:
        async def ask(text, path="/v1/chat/completions", **extra):
            payload = {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}
            if path == "/v1/messages":
                payload["max_tokens"] = extra.get("max_tokens", 100)
            r = await http.post(gw.url + path, json=payload)
            assert r.status_code == 200, r.text
            return r.headers["x-gateway-route"], fake.records[-1].model

        assert await ask("What is 2+2?") == ("tier=cheap reason=tokens<1000", "gpt-4o-mini")
        assert await ask("Prove it") == ("tier=strong reason=keyword:prove", "gpt-4o")
        assert await ask("hi", stream=True) == ("tier=cheap reason=tokens<1000", "gpt-4o-mini")
        assert await ask("hi", path="/v1/messages", max_tokens=4000) == ("tier=strong reason=max_tokens>1024",
                                                                          "gpt-4o")
        assert await ask("word " * 1200) == ("tier=strong reason=tokens>=1000", "gpt-4o")
        # a model that is not an alias is left alone
        r = await http.post(gw.url + "/v1/chat/completions",
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
        assert "x-gateway-route" not in r.headers
    with trio.fail_after(5):
        while len(seen) < 6:
            await trio.sleep(0.01)
    assert seen[:2] == [("cheap", "tokens<1000"), ("strong", "keyword:prove")] and seen[5] == (None, None)


def test_the_labelled_prompt_set_routes_every_complex_prompt_up():
    """The shipped gpt preset on tests/data/tier_prompts.jsonl: no complex prompt on the cheap tier,
    every simple one on it (the figures in bench.md come from scripts/tier_savings.py)."""
    cfg = config({"auto": {"preset": "gpt"}})
    classifier = Classifier(cfg.tiers["auto"])
    items = tier_savings.load()
    assert len(items) == 40 and sum(i["label"] == "simple" for i in items) == 20
    decided = [(i["label"], classifier.classify(features(body, count_chat(body, "o200k_base")))[0].name)
               for i in items for body in [tier_savings.request_body(i)]]
    assert [tier for label, tier in decided if label == "complex"] == ["strong"] * 20
    assert [tier for label, tier in decided if label == "simple"] == ["cheap"] * 20
    result = tier_savings.run("gpt", 150, 800)
    assert 0 < result["routed"] < result["baseline"]


async def test_the_prompt_is_counted_once_for_the_tier_and_the_accounting(nursery, fake, monkeypatch):
    from proxy.accounting import tokens

    calls = []
    original = tokens.count_prompt_async

    async def counting(request, encoding_name, *args):
        calls.append(encoding_name)
        return await original(request, encoding_name, *args)

    monkeypatch.setattr(tokens, "count_prompt_async", counting)
    cfg = config({"auto": {"preset": "gpt"}}, port=fake.port)
    gateway = Gateway(cfg, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    stop = trio.Event()
    url = (await nursery.start(partial(serve, cfg, gateway, shutdown_trigger=stop.wait)))[0]
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=30) as http:
        r = await http.post(url + "/v1/chat/completions",
                            json={"model": "auto", "messages": [{"role": "user", "content": "What is 2+2?"}]})
    assert r.status_code == 200 and r.headers["x-gateway-route"].startswith("tier=cheap")
    assert calls == ["o200k_base"]  # the tier's count served the accounting's window check too
    stop.set()
