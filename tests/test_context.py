"""The context window: 400 before any provider is paid, or the sliding window (system kept, pairs kept)."""

from __future__ import annotations

from functools import partial
from typing import Any

import anthropic
import orjson
import pytest
import trio

from proxy.accounting import context
from proxy.accounting.tokens import count_chat, count_prompt
from proxy.config import parse_config
from proxy.core.request import parse_chat_request
from proxy.formats.messages_api import parse_messages_request
from proxy.server.app import Gateway
from proxy.server.serve import serve

from .conftest import MASTER_KEY, PROVIDER_KEY, Running

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"


def turn(i: int, n: int = 40) -> str:
    return f"turn {i}: " + " ".join(WORDS.split()[(i + k) % 16] for k in range(n))


async def start(nursery, fake_port: int, *, window: int = 400, strategy: str = "reject",
                kind: str = "openai", **sections: Any) -> Running:
    base = f"http://127.0.0.1:{fake_port}" + ("/v1" if kind == "openai" else "")
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "providers": {"fake": {"kind": kind, "base_url": base, "api_key_env": "TEST_PROVIDER_KEY"}},
        "models": {"small": {"deployments": [{"provider": "fake", "model": "gpt-4o"}], "context_strategy": strategy},
                   "big": {"deployments": [{"provider": "fake", "model": "gpt-4o-mini"}]}},
        "model_info": {"gpt-4o": {"context_window": window, "max_output_tokens": 50}},
        **sections,
    })
    gateway = Gateway(config, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=trio.Event().wait))
    return Running(binds[0], gateway, trio.Event())


def conversation(turns: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn(i)})
    return out


# -- the plan, on its own --

def test_turns_keep_tool_results_with_their_call():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "a"}, {"id": "b"}]},
                {"role": "tool", "tool_call_id": "a", "content": "1"}, {"role": "tool", "tool_call_id": "b", "content": "2"},
                {"role": "assistant", "content": "done"}, {"role": "developer", "content": "d"}, {"role": "user", "content": "u2"}]
    system, groups = context.turns(messages, anthropic=False)
    assert system == [0, 6]
    assert groups == [[1], [2, 3, 4], [5], [7]]


def test_plan_drops_oldest_turns_and_never_splits_a_pair():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]},
                {"role": "tool", "tool_call_id": "a", "content": "1"}, {"role": "user", "content": "last"}]
    count = count_prompt({"messages": messages}, "o200k_base")
    everything = count.total
    # Just too long for everything: the first user turn goes, the pair stays whole.
    assert context.plan(messages, count, everything - 1, anthropic=False) == [0, 2, 3, 4]
    # A bit less room: the whole pair goes (never the call without its result).
    assert context.plan(messages, count, everything - count.messages[1] - 1, anthropic=False) == [0, 4]
    assert context.plan(messages, count, count.fixed + count.messages[0], anthropic=False) is None


# -- end to end --

async def test_a_prompt_over_the_window_is_refused_before_any_provider_is_paid(nursery, fake, http):
    gw = await start(nursery, fake.port, window=400)
    body = {"model": "small", "messages": conversation(12), "max_tokens": 20}
    prompt = count_chat(body, "o200k_base")
    assert prompt + 20 > 400
    response = await http.post(gw.v1 + "/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert "maximum context length is 400 tokens" in error["message"]
    assert f"({prompt} in the messages, 20 in the completion)" in error["message"]
    assert fake.records == []  # no provider request at all
    # A prompt that fits goes through.
    ok = await http.post(gw.v1 + "/chat/completions", json={"model": "small", "messages": conversation(2)})
    assert ok.status_code == 200 and len(fake.records) == 1


async def test_max_tokens_counts_against_the_window(nursery, fake, http):
    gw = await start(nursery, fake.port, window=400)
    messages = conversation(6)
    prompt = count_chat({"messages": messages}, "o200k_base")
    assert prompt < 400
    fits = await http.post(gw.v1 + "/chat/completions", json={"model": "small", "messages": messages,
                                                                "max_tokens": 400 - prompt})
    over = await http.post(gw.v1 + "/chat/completions", json={"model": "small", "messages": messages,
                                                                "max_completion_tokens": 401 - prompt})
    assert fits.status_code == 200
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    assert len(fake.records) == 1


async def test_messages_route_refuses_in_anthropics_shape(nursery, fake):
    gw = await start(nursery, fake.port, window=400)
    client = anthropic.Anthropic(base_url=gw.url, api_key=MASTER_KEY, max_retries=0, timeout=30)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn(i)} for i in range(13)]

    def call():
        return client.messages.create(model="small", max_tokens=20, messages=messages)

    with pytest.raises(anthropic.BadRequestError) as raised:
        await trio.to_thread.run_sync(call)
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "maximum context length is 400 tokens" in raised.value.body["error"]["message"]
    assert fake.records == []


async def test_sliding_window_keeps_the_system_prompt_and_the_newest_turns(nursery, fake, http):
    gw = await start(nursery, fake.port, window=400, strategy="sliding_window")
    messages = conversation(12)
    body = {"model": "small", "messages": messages, "max_tokens": 20}
    response = await http.post(gw.v1 + "/chat/completions", json=body)
    assert response.status_code == 200
    dropped = int(response.headers["x-gateway-context-trimmed"])
    sent = fake.records[-1].body["messages"]
    assert sent[0] == messages[0]  # the system prompt
    assert sent[1:] == messages[1 + dropped:]  # the newest turns, in order
    assert count_chat({"messages": sent}, "o200k_base") + 20 <= 400
    # As many as fit: one more turn would not have.
    assert count_chat({"messages": [messages[0]] + messages[dropped:]}, "o200k_base") + 20 > 400
    fitting = await http.post(gw.v1 + "/chat/completions", json={"model": "small", "messages": conversation(2)})
    assert "x-gateway-context-trimmed" not in fitting.headers


async def test_sliding_window_keeps_tool_calls_with_their_results(nursery, fake, http):
    gw = await start(nursery, fake.port, window=300, strategy="sliding_window")
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You call tools."}]
    for i in range(6):
        messages += [{"role": "user", "content": turn(i, 10)},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": turn(i + 1, 20)}]
    messages.append({"role": "user", "content": "and now?"})
    drops = set()
    for max_tokens in range(10, 160, 3):  # cuts at every place in the conversation
        response = await http.post(gw.v1 + "/chat/completions",
                                   json={"model": "small", "messages": messages, "max_tokens": max_tokens})
        assert response.status_code == 200
        drops.add(int(response.headers["x-gateway-context-trimmed"]))
        sent = fake.records[-1].body["messages"]
        assert sent[0]["role"] == "system" and sent[-1]["content"] == "and now?"
        calls = {c["id"] for m in sent for c in m.get("tool_calls") or ()}
        results = {m["tool_call_id"] for m in sent if m["role"] == "tool"}
        assert calls == results  # no call without its result, no result without its call
        assert sent[1]["role"] != "tool"
    assert len(drops) >= 4 and 0 not in drops


async def test_sliding_window_on_messages_starts_with_a_user_turn(nursery, fake):
    gw = await start(nursery, fake.port, window=400, strategy="sliding_window", kind="anthropic")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn(i)} for i in range(13)]
    client = anthropic.Anthropic(base_url=gw.url, api_key=MASTER_KEY, max_retries=0, timeout=30)

    def call():
        return client.messages.with_raw_response.create(model="small", max_tokens=20, system="Be brief.",
                                                        messages=messages)

    raw = await trio.to_thread.run_sync(call)
    dropped = int(raw.headers["x-gateway-context-trimmed"])
    sent = fake.records[-1].body
    assert sent["system"] == "Be brief."
    assert sent["messages"] == messages[dropped:] and sent["messages"][0]["role"] == "user"
    assert dropped % 2 == 0 and dropped > 0


async def test_a_single_turn_too_long_for_the_window_is_refused_even_with_the_sliding_window(nursery, fake, http):
    gw = await start(nursery, fake.port, window=100, strategy="sliding_window")
    body = {"model": "small", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": turn(0, 200)}]}
    response = await http.post(gw.v1 + "/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert fake.records == []


def test_trim_rewrites_the_canonical_body_of_a_messages_request():
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": turn(i)} for i in range(5)]
    request = parse_messages_request(orjson.dumps({"model": "m", "max_tokens": 5, "system": "sys", "messages": messages}))
    count = count_prompt(request, "o200k_base")
    dropped, after = context.trim(request, count, count.total - 1)
    assert dropped == 2
    assert request.anthropic_body["messages"] == messages[2:]
    assert [m["content"] for m in request.body["messages"]] == ["sys"] + [m["content"] for m in messages[2:]]
    assert after.total == count_prompt(request, "o200k_base").total


def test_chat_trim_matches_a_recount():
    request = parse_chat_request(orjson.dumps({"model": "m", "messages": conversation(9)}))
    count = count_prompt(request, "o200k_base")
    dropped, after = context.trim(request, count, count.total // 2)
    assert dropped > 0 and after.total <= count.total // 2
    assert after.total == count_prompt(request, "o200k_base").total
