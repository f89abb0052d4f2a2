"""Every wrong type or range a client sends is a 400 naming the field, through every adapter kind,
and nothing a client sends counts against a deployment's breaker."""

from __future__ import annotations

import logging
import statistics
import time
from functools import partial

import anthropic
import httpx
import openai
import orjson
import pytest
import trio

from proxy.config import parse_config
from proxy.core.errors import InvalidRequest
from proxy.core.request import parse_chat_request, parse_embeddings_request
from proxy.formats.messages_api import parse_messages_request
from proxy.server.app import Gateway
from proxy.server.serve import serve
from proxy.testing.fake import FakeProvider, FakeSettings

from .conftest import MASTER_KEY, PROVIDER_KEY, Running
from .kinds import KINDS, MODELS

USER = {"role": "user", "content": "Hi"}


def chat(**extra):
    return {"model": "m", "messages": [USER], **extra}


def with_message(message, before=(USER,)):
    return chat(messages=[*before, message])


# (body, the param the 400 must name). The first rows are the issue's own findings.
CHAT_CASES = [
    (chat(messages=[{"role": {}, "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": [], "content": "x"}]), "messages[0].role"),
    (chat(messages=[USER, {"role": ["user"], "content": "x", "name": "n"}]), "messages[1].role"),
    (chat(stop=5), "stop"),
    (chat(stop=["a", 5]), "stop[1]"),
    (with_message({"role": "assistant", "content": None, "tool_calls": "x"}), "messages[1].tool_calls"),
    (with_message({"role": "assistant", "content": None, "tool_calls": [1]}), "messages[1].tool_calls[0]"),
    (with_message({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                        "function": {"name": "f", "arguments": {}}}]}),
     "messages[1].tool_calls[0].function.arguments"),
    (chat(messages=[{"role": "system", "content": [5]}, USER]), "messages[0].content[0]"),
    (chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (chat(response_format={"type": "json_schema", "json_schema": 5}), "response_format.json_schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": 5}}),
     "response_format.json_schema.schema"),
    (chat(response_format={"type": "yaml"}), "response_format.type"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=2.5), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(n=1000), "n"),
    (chat(n=0), "n"),
    (chat(tools="x"), "tools"),
    (chat(tools=[{"type": "function", "function": {"name": 5}}]), "tools[0].function.name"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
     "tools[0].function.parameters"),
    (chat(tools=[{"type": "retrieval"}]), "tools[0].type"),
    (chat(tool_choice="sometimes"), "tool_choice"),
    (chat(tool_choice={"type": "function", "function": {}}), "tool_choice.function.name"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_completion_tokens=True), "max_completion_tokens"),
    (chat(frequency_penalty=3), "frequency_penalty"),
    (chat(presence_penalty=-2.5), "presence_penalty"),
    (chat(logit_bias={"50256": 101}), "logit_bias.50256"),
    (chat(logprobs="yes"), "logprobs"),
    (chat(top_logprobs=21), "top_logprobs"),
    (chat(seed=1.5), "seed"),
    (chat(user=5), "user"),
    (chat(metadata={"k": 1}), "metadata.k"),
    (chat(parallel_tool_calls="no"), "parallel_tool_calls"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(modalities=["video"]), "modalities[0]"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]),
     "messages[0].content[0].image_url"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "max"}}]}]),
     "messages[0].content[0].image_url.detail"),
    (chat(messages=[{"role": "user", "content": [{"text": "no type"}]}]), "messages[0].content[0].type"),
    (with_message({"role": "tool", "content": "r"}), "messages[1].tool_call_id"),
    (with_message({"role": "tool", "content": "r", "tool_call_id": 5}), "messages[1].tool_call_id"),
    (chat(messages=[USER, 5]), "messages[1]"),
    (chat(model="x" * 300), "model"),
]


@pytest.mark.parametrize("body, param", CHAT_CASES)
def test_wrong_chat_fields_are_400_naming_the_field(body, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(orjson.dumps(body))
    assert caught.value.param == param, caught.value.message
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"


def test_the_messages_never_echo_the_value_unbounded():
    body = chat(temperature="h" * 100_000, user=["u" * 100_000])
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(orjson.dumps(body))
    assert len(caught.value.message) < 200 and "hhhh" not in caught.value.message


# Every documented field with a valid value: nothing here may be refused.
FULL_CHAT = {
    "model": "m", "stream": True, "stream_options": {"include_usage": True},
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "system", "content": "You help.", "name": "sys"},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "Look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            {"type": "file", "file": {"file_id": "f1"}},
            {"type": "video_url", "video_url": {"url": "u"}}]},  # a compatible server's own part type
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "no"}]},
        {"role": "function", "name": "f", "content": None},
        {"role": "user", "content": "Go"}],
    "temperature": 0, "top_p": 1, "n": 1, "max_tokens": 5, "max_completion_tokens": 5, "stop": ["x"],
    "frequency_penalty": -2, "presence_penalty": 2.0, "logit_bias": {"1": -100}, "logprobs": True,
    "top_logprobs": 20, "seed": -1, "user": "u", "metadata": {"k": "v"}, "parallel_tool_calls": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"},
                                                               "strict": True}},
    "tools": [{"type": "function", "function": {"name": "f", "description": "d", "strict": None,
                                                "parameters": {"type": "object", "properties": {}}}}],
    "tool_choice": {"type": "function", "function": {"name": "f"}}, "store": False, "service_tier": "auto",
    "reasoning_effort": "low", "modalities": ["text"], "verbosity": "low", "prompt_cache_key": "k",
    "safety_identifier": "s", "prediction": {"type": "content", "content": "x"}, "top_k": 5,
    "audio": None, "functions": None, "web_search_options": {},
}


def test_every_documented_field_with_a_valid_value_passes():
    request = parse_chat_request(orjson.dumps(FULL_CHAT))
    assert request.stream and request.include_usage and request.body["top_k"] == 5  # unknown: kept


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "input"),
    ({"model": "m", "input": ""}, "input"),
    ({"model": "m", "input": [1, "a"]}, "input[1]"),
    ({"model": "m", "input": [[1], []]}, "input[1]"),
    ({"model": "m", "input": ["a"] * 2049}, "input"),
    ({"model": "m", "input": "a", "dimensions": 0}, "dimensions"),
    ({"model": "m", "input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "m", "input": "a", "user": {}}, "user"),
    ({"model": {}, "input": "a"}, "model"),
])
def test_wrong_embeddings_fields_are_400_naming_the_field(body, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_embeddings_request(orjson.dumps(body))
    assert caught.value.param == param


def msg(**extra):
    return {"model": "m", "max_tokens": 10, "messages": [USER], **extra}


@pytest.mark.parametrize("body, param", [
    (msg(messages=[{"role": {}, "content": "x"}]), "messages[0].role"),
    (msg(messages=[{"role": "user", "content": [{"type": {}}]}]), "messages[0].content[0].type"),
    (msg(system=[5]), "system[0]"),
    (msg(stop_sequences=5), "stop_sequences"),
    (msg(temperature="hot"), "temperature"),
    (msg(temperature=1.5), "temperature"),
    (msg(top_k=-1), "top_k"),
    (msg(stream="yes"), "stream"),
    (msg(thinking={"type": "enabled"}), "thinking.budget_tokens"),
    (msg(metadata={"user_id": 5}), "metadata.user_id"),
    (msg(tool_choice={"type": "auto", "disable_parallel_tool_use": "yes"}),
     "tool_choice.disable_parallel_tool_use"),
    (msg(messages=[{"role": "user", "content": [{"type": "document", "source": "x"}]}]),
     "messages[0].content[0].source"),
    (msg(messages=[USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]), "messages[1].content[0].input"),
    (msg(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]),
     "messages[0].content[0].content"),
    (msg(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "text", "text": 5}]}]}]),
     "messages[0].content[0].content[0]"),
    ({"model": "m", "messages": [USER]}, "max_tokens"),
])
def test_wrong_messages_fields_are_400_naming_the_field(body, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_messages_request(orjson.dumps(body))
    assert caught.value.param == param, caught.value.message


def test_validation_of_a_typical_request_costs_microseconds():
    """A 10-message request with the usual parameters; the figure goes into the report."""
    messages = [{"role": "system", "content": "You are a helpful assistant." * 4}]
    messages += [{"role": "user" if i % 2 else "assistant", "content": "Tell me more about it. " * 8}
                 for i in range(1, 10)]
    body = {"model": "gpt-4o", "messages": messages, "stream": True, "temperature": 0.7,
            "max_tokens": 256, "stream_options": {"include_usage": True}}
    from proxy.core.validate import check_chat

    timings = []
    for _ in range(7):
        started = time.process_time()
        for _ in range(2000):
            check_chat(body)
        timings.append((time.process_time() - started) / 2000)
    median_us = statistics.median(timings) * 1e6
    print(f"validation of a 10-message chat request: {median_us:.2f} µs (median of 7 x 2000)")
    assert median_us < 20, median_us


# -- end to end: a real gateway in front of the fake provider, every adapter kind --

def kinds_gateway_config(port: int, **router):
    base = f"http://127.0.0.1:{port}"
    return parse_config({
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "router": {"backoff_initial": 0.001, "backoff_max": 0.002, **router},
        "providers": {
            "openai": {"kind": "openai", "base_url": base + "/v1", "api_key_env": "TEST_PROVIDER_KEY",
                       "tool_arguments": "validate"},
            "anthropic": {"kind": "anthropic", "base_url": base, "api_key_env": "TEST_PROVIDER_KEY"},
            "ollama": {"kind": "ollama", "base_url": base},
        },
        "models": {MODELS[k]: {"deployments": [{"provider": k, "model": f"{k}-fake"}]} for k in KINDS},
    })


@pytest.fixture
async def kinds_gw(nursery):
    fake = FakeProvider(FakeSettings(tokens=3))
    fake.port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
    config = kinds_gateway_config(fake.port, breaker_failures=3)
    gateway = Gateway(config, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=trio.sleep_forever))
    return Running(binds[0], gateway, trio.Event())


ISSUE_CASES = [  # the issue's 500s and pass-throughs, as (mutation of a valid body, param)
    ({"messages": [{"role": {}, "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": [], "content": "x"}]}, "messages[0].role"),
    ({"stop": 5}, "stop"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages[1].tool_calls"),
    ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [1]}]}, "messages[1].tool_calls[0]"),
    ({"messages": [{"role": "system", "content": [5]}, USER]}, "messages[0].content[0]"),
    ({"response_format": {"type": "json_schema", "json_schema": 5}}, "response_format.json_schema"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": 1000}, "n"),
    ({"tools": "x"}, "tools"),
]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_issues_inputs_are_400s_through_every_adapter_and_logged(kinds_gw, http, kind, caplog):
    caplog.set_level(logging.INFO, logger="proxy")
    client = openai.AsyncOpenAI(base_url=kinds_gw.v1, api_key=MASTER_KEY, max_retries=0)
    for mutation, param in ISSUE_CASES:
        for stream in (False, True):
            body = {"model": MODELS[kind], "messages": [USER], "stream": stream, **mutation}
            response = await http.post(kinds_gw.v1 + "/chat/completions", json=body)
            assert response.status_code == 400, (mutation, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, error
            logged = [r for r in caplog.records if r.name == "proxy.server.app" and "-> 400" in r.getMessage()]
            assert logged and f"'{param}'" in logged[-1].getMessage()
            caplog.clear()
        # and the official SDK raises its own 400 class for one of them
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODELS[kind], messages=[USER], temperature="hot")
        assert caught.value.body["param"] == "temperature"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback, no 500
    response = await http.post(kinds_gw.v1 + "/chat/completions", json={"model": MODELS[kind], "messages": [USER]})
    assert response.status_code == 200


async def test_messages_endpoint_answers_in_anthropics_shape(kinds_gw):
    client = anthropic.AsyncAnthropic(base_url=kinds_gw.url, api_key=MASTER_KEY, max_retries=0)
    for kind in KINDS:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(model=MODELS[kind], max_tokens=5, extra_body={"temperature": "hot"},
                                         messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert "temperature" in caught.value.body["error"]["message"]


async def test_embeddings_errors_name_the_field(kinds_gw, http):
    for kind in ("openai", "ollama"):
        response = await http.post(kinds_gw.v1 + "/embeddings",
                                   json={"model": MODELS[kind], "input": "a", "dimensions": "8"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"


async def test_a_valid_request_with_every_field_is_served_by_every_kind(kinds_gw, http):
    for kind in KINDS:
        body = dict(FULL_CHAT, model=MODELS[kind], tool_choice="auto")
        body["messages"] = [m for m in body["messages"]
                            if not isinstance(m["content"], list) or kind != "ollama"]  # ollama: no URLs
        response = await http.post(kinds_gw.v1 + "/chat/completions", json=body)
        assert response.status_code == 200, (kind, response.text)


# -- nothing a client sends counts against a deployment --

async def breaker_state(gw: Running, kind: str) -> dict:
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        snapshot = (await client.get(gw.url + "/admin/routing")).json()
    return next(d for d in snapshot["deployments"] if d["provider"] == kind)


@pytest.mark.parametrize("kind", KINDS)
async def test_many_bad_requests_leave_the_breaker_closed(kinds_gw, http, kind):
    def body(content="Hi", **extra):
        return {"model": MODELS[kind], "messages": [{"role": "user", "content": content}], **extra}

    bad = [
        {"model": MODELS[kind], "messages": [{"role": {}, "content": "x"}]},   # refused at ingress
        body(temperature="hot"),
        body('fake: {"status": 400}'),                                         # the provider's 400
        body('fake: {"status": 422}', stream=True),
    ]
    if kind != "ollama":  # a stream whose first event is an error naming a 4xx (vLLM reports bad
        # input this way); Ollama's error lines carry no type or status to tell
        bad.append(body('fake: {"error_after": 0, "error_event_status": 400}', stream=True))
    if kind == "ollama":  # the adapter itself refuses what it cannot translate
        bad.append(body() | {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
    if kind == "openai":  # the client's own tool schema, which the model's call misses every time
        bad.append(body('fake: {"tool_call": {"name": "f", "arguments": "{}"}}', stream=True,
                        tools=[{"type": "function", "function": {"name": "f", "parameters": {
                            "type": "object", "required": ["city"]}}}]))
    for _ in range(4):
        for b in bad:
            response = await http.post(kinds_gw.v1 + "/chat/completions", json=b)
            assert response.status_code < 500 or b.get("tools"), (b, response.status_code, response.text)
    state = await breaker_state(kinds_gw, kind)
    assert state["state"] == "closed" and state["consecutive_failures"] == 0, state
    assert state["requests"] > 10  # the provider did see the bad requests that got past ingress
    response = await http.post(kinds_gw.v1 + "/chat/completions", json=body())
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("event, status, action", [
    ({"type": "invalid_request_error", "message": "bad"}, 400, "fatal"),
    ({"object": "error", "type": "BadRequestError", "code": 400, "message": "too long"}, 400, "fatal"),  # vLLM
    ({"type": "whatever", "code": 422, "message": "no"}, 422, "fatal"),
    ({"type": "authentication_error", "message": "key"}, 401, "unusable"),
    ({"type": "server_error", "message": "boom"}, 502, "retry"),
    ("a bare string", 502, "retry"),
])
def test_a_stream_error_naming_a_4xx_is_the_clients_not_the_deployments(event, status, action):
    from proxy.formats.openai import stream_error
    from proxy.routing.policy import classify

    error = stream_error("p", event)
    assert error.status == status and classify(error).value == action


def test_a_tool_call_missing_the_clients_schema_is_asked_again_without_blame():
    from proxy.core.errors import ToolArgumentsInvalid
    from proxy.routing.policy import Action, classify

    assert classify(ToolArgumentsInvalid("arguments do not fit")) is Action.RESAMPLE
