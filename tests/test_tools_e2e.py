"""Tool calls end to end, both client formats x every provider kind, streaming and not; validation."""

from __future__ import annotations

import anthropic
import openai
import orjson
import pytest
import trio

from .conftest import MASTER_KEY, parse_sse
from .kinds import KINDS, MODELS, start_kinds

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"], "additionalProperties": False}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Forecast",
                                                  "parameters": WEATHER}},
                {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}}]
ANTHROPIC_TOOLS = [{"name": "weather", "description": "Forecast", "input_schema": WEATHER},
                   {"name": "time", "input_schema": {"type": "object"}}]


def directive(*calls, tokens=2, **extra) -> str:
    spec = [{"name": n, "arguments": a} for n, a in calls]
    return "fake: " + orjson.dumps({"tool_call": spec, "tokens": tokens, **extra}).decode()


TWO_CALLS = directive(("weather", '{"city": "Paris", "days": 3}'), ("time", '{"tz": "UTC"}'))


@pytest.fixture
async def kgw(nursery, fake):
    return await start_kinds(nursery, fake.port)


def oai(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0, timeout=30)


def ant(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=MASTER_KEY, max_retries=0, timeout=30)


@pytest.mark.parametrize("kind", KINDS)
async def test_openai_client_streams_tool_calls_from_every_kind(kgw, kind):
    def call():
        return list(oai(kgw).chat.completions.create(
            model=MODELS[kind], stream=True, tools=OPENAI_TOOLS,
            messages=[{"role": "user", "content": TWO_CALLS}]))

    chunks = await trio.to_thread.run_sync(call)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(delta_call.index, {"id": None, "name": None, "args": ""})
            entry["id"] = delta_call.id or entry["id"]
            entry["name"] = (delta_call.function.name if delta_call.function else None) or entry["name"]
            entry["args"] += (delta_call.function.arguments or "") if delta_call.function else ""
    assert sorted(calls) == [0, 1]
    assert calls[0]["name"] == "weather" and orjson.loads(calls[0]["args"]) == {"city": "Paris", "days": 3}
    assert calls[1]["name"] == "time" and orjson.loads(calls[1]["args"]) == {"tz": "UTC"}
    assert all(c["id"] for c in calls.values())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " The quick"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("kind", KINDS)
async def test_openai_client_non_streaming_tool_calls_from_every_kind(kgw, kind):
    completion = await trio.to_thread.run_sync(lambda: oai(kgw).chat.completions.create(
        model=MODELS[kind], tools=OPENAI_TOOLS, messages=[{"role": "user", "content": TWO_CALLS}]))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["weather", "time"]
    assert orjson.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}


@pytest.mark.parametrize("kind", KINDS)
async def test_anthropic_client_streams_tool_use_from_every_kind(kgw, kind):
    def call():
        with ant(kgw).messages.stream(model=MODELS[kind], max_tokens=100, tools=ANTHROPIC_TOOLS,
                                      messages=[{"role": "user", "content": TWO_CALLS}]) as stream:
            events = [e.type for e in stream]
            return events, stream.get_final_message()

    events, message = await trio.to_thread.run_sync(call)
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == " The quick"
    assert message.content[1].name == "weather" and message.content[1].input == {"city": "Paris", "days": 3}
    assert message.content[2].name == "time" and message.content[2].input == {"tz": "UTC"}
    assert message.content[1].id != message.content[2].id
    assert message.stop_reason == "tool_use"
    assert events[-1] == "message_stop"


@pytest.mark.parametrize("kind", KINDS)
async def test_anthropic_client_non_streaming_tool_use_from_every_kind(kgw, kind):
    message = await trio.to_thread.run_sync(lambda: ant(kgw).messages.create(
        model=MODELS[kind], max_tokens=100, tools=ANTHROPIC_TOOLS,
        messages=[{"role": "user", "content": TWO_CALLS}]))
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].input == {"city": "Paris", "days": 3}
    assert message.stop_reason == "tool_use"


async def test_anthropic_tool_history_reaches_an_openai_provider_translated(kgw, fake):
    await trio.to_thread.run_sync(lambda: ant(kgw).messages.create(
        model="via-openai", max_tokens=50, tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        system="Be brief.",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {"type": "text", "text": "And tomorrow?"}]},
        ]))
    body = fake.records[-1].body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]
    assert body["tools"][0]["function"] == {"name": "weather", "parameters": WEATHER, "description": "Forecast"}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["parallel_tool_calls"] is False


async def test_openai_tool_history_reaches_an_anthropic_provider_translated(kgw, fake):
    await trio.to_thread.run_sync(lambda: oai(kgw).chat.completions.create(
        model="via-anthropic", tools=OPENAI_TOOLS, tool_choice="required",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and the time?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
        ]))
    body = fake.records[-1].body
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and the time?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "c2", "name": "time", "input": {}}]},
        {"role": "user", "content": [  # consecutive tool results merge into one user turn
            {"type": "tool_result", "tool_use_id": "c1", "content": "Sunny"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "12:00"}]},
    ]
    assert body["tools"][0] == {"name": "weather", "description": "Forecast", "input_schema": WEATHER}
    assert body["tool_choice"] == {"type": "any"}


# -- tool_arguments = "validate" --

@pytest.fixture
async def vgw(nursery, fake):
    return await start_kinds(nursery, fake.port, extra={k: {"tool_arguments": "validate"} for k in KINDS})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("args", ['{"city": 5}', '{"days": 2}', '{"city": "Rome", "extra": 1}'])
async def test_validate_rejects_arguments_that_break_the_schema(vgw, http, kind, args):
    body = {"model": MODELS[kind], "stream": True, "tools": OPENAI_TOOLS,
            "messages": [{"role": "user", "content": directive(("weather", args))}]}
    async with http.stream("POST", vgw.v1 + "/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = parse_sse(await response.aread())
    assert b"[DONE]" not in events
    error = orjson.loads(events[-1])["error"]
    assert error["code"] == "tool_arguments_invalid" and "weather" in error["message"]
    assert not any(b'"finish_reason":"tool_calls"' in e for e in events)  # never passed as if fine


async def test_validate_rejects_arguments_that_are_not_json(vgw, http):
    body = {"model": "via-openai", "tools": OPENAI_TOOLS,
            "messages": [{"role": "user", "content": directive(("weather", '{"city": "Par'))}]}
    response = await http.post(vgw.v1 + "/chat/completions", json=body)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "tool_arguments_invalid"
    assert "not valid JSON" in response.json()["error"]["message"]


async def test_validate_rejects_an_undeclared_tool_on_messages(vgw, http):
    body = {"model": "via-ollama", "max_tokens": 50, "tools": ANTHROPIC_TOOLS,
            "messages": [{"role": "user", "content": directive(("launch", "{}"))}]}
    response = await http.post(vgw.url + "/v1/messages", json=body)
    assert response.status_code == 502
    assert response.json()["type"] == "error" and "launch" in response.json()["error"]["message"]


@pytest.mark.parametrize("kind", KINDS)
async def test_validate_passes_valid_calls(vgw, kind):
    completion = await trio.to_thread.run_sync(lambda: oai(vgw).chat.completions.create(
        model=MODELS[kind], tools=OPENAI_TOOLS, messages=[{"role": "user", "content": TWO_CALLS}]))
    assert completion.choices[0].finish_reason == "tool_calls"


async def test_pass_mode_relays_invalid_arguments_unchanged(kgw):
    completion = await trio.to_thread.run_sync(lambda: oai(kgw).chat.completions.create(
        model="via-openai", tools=OPENAI_TOOLS,
        messages=[{"role": "user", "content": directive(("weather", '{"city": 5}'))}]))
    assert completion.choices[0].message.tool_calls[0].function.arguments == '{"city": 5}'
