"""The fake provider's Anthropic and Ollama wire formats, tool calls, usage, and its run-time control."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from proxy.testing.fake import FakeControl, FakeProvider, FakeSettings


@pytest.fixture
async def provider(nursery):
    fp = FakeProvider(FakeSettings(tokens=3))
    await nursery.start(fp.serve)
    return fp


@pytest.fixture
async def client(provider):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{provider.port}", timeout=5) as c:
        yield c


ANTHROPIC = {"model": "claude", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
OLLAMA = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
OPENAI = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


async def test_anthropic_message_with_cached_usage(client):
    body = dict(ANTHROPIC, system='fake: {"cached_tokens": 7, "cache_write_tokens": 2}')
    r = await client.post("/v1/messages", json=body)
    message = r.json()
    assert message["type"] == "message" and message["content"] == [{"type": "text", "text": " The quick brown"}]
    assert message["usage"] == {"input_tokens": 6, "output_tokens": 3, "cache_read_input_tokens": 7,
                                "cache_creation_input_tokens": 2}


async def test_anthropic_stream_events(client):
    async with client.stream("POST", "/v1/messages", json=dict(ANTHROPIC, stream=True)) as r:
        text = (await r.aread()).decode()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "ping", "content_block_start"] + ["content_block_delta"] * 3 + \
        ["content_block_stop", "message_delta", "message_stop"]


async def test_ollama_streams_ndjson_by_default_with_tool_calls(client):
    content = 'fake: {"tool_call": {"name": "f", "arguments": "{\\"a\\": 1}"}, "tokens": 1}'
    body = dict(OLLAMA, messages=[{"role": "user", "content": content}])
    async with client.stream("POST", "/api/chat", json=body) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in r.aiter_lines() if line]
    assert lines[0]["message"]["content"] == " The"
    assert lines[1]["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 1


async def test_ollama_non_streaming(client):
    r = await client.post("/api/chat", json=dict(OLLAMA, stream=False, options={"num_predict": 2}))
    reply = r.json()
    assert reply["message"]["content"] == " The quick" and reply["done_reason"] == "length"


@pytest.mark.parametrize("path, body, shape", [
    ("/v1/messages", ANTHROPIC, lambda j: j["error"]["type"] == "overloaded_error" and j["type"] == "error"),
    ("/api/chat", OLLAMA, lambda j: isinstance(j["error"], str)),
    ("/v1/chat/completions", OPENAI, lambda j: j["error"]["type"] == "server_error"),
])
async def test_error_statuses_in_each_format(client, path, body, shape):
    body = dict(body, messages=[{"role": "user", "content": 'fake: {"status": 529}'}])
    r = await client.post(path, json=body)
    assert r.status_code == 529 and shape(r.json())


async def test_openai_stream_with_error_after(client):
    body = dict(OPENAI, stream=True, messages=[{"role": "user", "content": 'fake: {"error_after": 1}'}])
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        text = (await r.aread()).decode()
    assert text.count('"content":" The"') == 1 and '"error"' in text and "[DONE]" not in text


# -- run-time control --

async def test_control_revoke_key_over_http_and_reset(client, provider):
    r = await client.post("/_fake/control", json={"revoke_key": True})
    assert r.json() == {"revoke_key": True, "fail_percent": 0, "fail_status": 503, "hang": False}
    r = await client.post("/v1/chat/completions", json=OPENAI)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await client.post("/v1/messages", json=ANTHROPIC)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    await client.post("/_fake/control", json={"reset": True})
    assert provider.control == FakeControl()
    assert (await client.post("/v1/chat/completions", json=OPENAI)).status_code == 200


async def test_control_fail_percent_is_a_deterministic_share(client, provider):
    provider.control = FakeControl(fail_percent=30, fail_status=503)
    statuses = [(await client.post("/api/chat", json=dict(OLLAMA, stream=False))).status_code for _ in range(10)]
    assert statuses.count(503) == 3 and statuses.count(200) == 7
    statuses = [(await client.post("/v1/chat/completions", json=OPENAI)).status_code for _ in range(10)]
    assert statuses.count(503) == 3  # the same share in every 10


async def test_control_hang(client, provider, autojump_clock):
    await client.post("/_fake/control", json={"hang": True})
    with trio.move_on_after(60) as waited:
        await client.post("/v1/chat/completions", json=OPENAI, timeout=None)
    assert waited.cancelled_caught
    record = provider.records[-1]
    with trio.fail_after(5):
        await record.closed.wait()  # the fake noticed the client leave
    assert record.peer_closed_early


@pytest.mark.parametrize("body", [{"fail_percent": 101}, {"hang": "yes"}, {"bogus": 1}, [1]])
async def test_bad_control_is_a_400(client, provider, body):
    r = await client.post("/_fake/control", json=body)
    assert r.status_code == 400 and "bad control" in r.json()["error"]["message"]
    assert provider.control == FakeControl()
