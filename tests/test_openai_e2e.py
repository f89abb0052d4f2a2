"""End to end: the official `openai` SDK -> gateway (hypercorn, port 0) -> fake provider."""

import openai
import orjson
import pytest
import trio

from .conftest import MASTER_KEY, PROVIDER_KEY, chat_body, parse_sse


def sdk(gw, key=MASTER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=key, max_retries=0, timeout=30)


async def test_non_streaming_completion_through_the_sdk(gw, fake):
    def call():
        return sdk(gw).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hello there"}])

    completion = await trio.to_thread.run_sync(call)
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 8
    record = fake.records[-1]
    assert record.model == "gpt-4o" and record.stream is False
    # the provider got the provider's key, never the client's
    assert record.authorization == f"Bearer {PROVIDER_KEY}"


async def test_streaming_through_the_sdk_matches_the_non_streaming_text(gw, fake):
    def call():
        client = sdk(gw)
        whole = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
        chunks = list(client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": "Hi"}]))
        return whole, chunks

    whole, chunks = await trio.to_thread.run_sync(call)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the gateway asked the provider for usage, but the client did not: no usage chunk for it
    assert all(c.usage is None for c in chunks)
    assert fake.records[-1].body["stream_options"] == {"include_usage": True}
    assert fake.records[-1].authorization == f"Bearer {PROVIDER_KEY}"


async def test_include_usage_is_honoured(gw):
    def call():
        return list(sdk(gw).chat.completions.create(
            model="alias", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Hi"}]))

    chunks = await trio.to_thread.run_sync(call)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 8


async def test_alias_routes_to_the_deployment_model(gw, fake, http):
    response = await http.post(gw.v1 + "/chat/completions", json=chat_body(model="alias"))
    assert response.status_code == 200
    assert fake.records[-1].model == "fake-model"


async def test_stream_headers_and_wire_format(gw, http):
    async with http.stream("POST", gw.v1 + "/chat/completions", json=chat_body(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        body = await response.aread()
    events = parse_sse(body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_models_and_healthz(gw, http):
    models = (await http.get(gw.v1 + "/models")).json()
    assert [m["id"] for m in models["data"]] == ["gpt-4o", "alias"]
    health = await http.get(gw.url + "/healthz", headers={"authorization": ""})
    assert health.status_code == 200 and health.json()["status"] == "ok"


async def test_sdk_models_list(gw):
    names = await trio.to_thread.run_sync(lambda: [m.id for m in sdk(gw).models.list()])
    assert names == ["gpt-4o", "alias"]


async def test_keepalive_comment_while_first_token_is_slow(start_gateway, http):
    gw = await start_gateway(server={"keepalive_interval": 0.1})
    body = chat_body('fake: {"ttft": 0.5, "tokens": 2}', stream=True)
    async with http.stream("POST", gw.v1 + "/chat/completions", json=body) as response:
        raw = await response.aread()
    # the fake sends the role chunk at once, then waits ttft: the gap is filled with comments
    assert b": keepalive\n\n" in raw
    assert parse_sse(raw)[-1] == b"[DONE]"


async def test_mid_stream_failure_is_an_error_event_and_no_done(gw, http):
    body = chat_body('fake: {"drop_after": 3, "tokens": 10}', stream=True)
    async with http.stream("POST", gw.v1 + "/chat/completions", json=body) as response:
        assert response.status_code == 200
        raw = await response.aread()
    events = parse_sse(raw)
    assert b"[DONE]" not in events
    error = orjson.loads(events[-1])["error"]
    assert error["code"] == "upstream_error" and error["type"] == "api_error"
    contents = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert len(contents) == 3


async def test_mid_stream_failure_raises_in_the_sdk(gw):
    def call():
        stream = sdk(gw).chat.completions.create(
            model="gpt-4o", stream=True,
            messages=[{"role": "user", "content": 'fake: {"drop_after": 2}'}])
        return [c for c in stream]

    with pytest.raises(openai.APIError):
        await trio.to_thread.run_sync(call)


async def test_each_request_logs_one_line_with_its_outcome_and_no_secrets(gw, http, caplog):
    caplog.set_level("INFO", logger="proxy")
    response = await http.post(gw.v1 + "/chat/completions", json=chat_body(stream=True))
    assert parse_sse(response.content)[-1] == b"[DONE]"
    async with http.stream("POST", gw.v1 + "/chat/completions",
                           json=chat_body('fake: {"tokens": 1000, "itl": 0.01}', stream=True)) as r:
        async for _ in r.aiter_raw():
            break  # leave mid-stream
    with trio.fail_after(5):
        while len([r for r in caplog.records if r.name == "proxy.server.chat"]) < 2:
            await trio.sleep(0.01)
    first, second = [r.getMessage() for r in caplog.records if r.name == "proxy.server.chat"]
    assert "outcome=ok" in first and "deployment=fake/gpt-4o" in first
    assert "outcome=client_disconnected" in second
    streamed = int(second.split("streamed_chunks=")[1].split()[0])
    assert 0 < streamed < 1000  # the abandoned stream's partial record
    assert MASTER_KEY not in caplog.text and PROVIDER_KEY not in caplog.text
