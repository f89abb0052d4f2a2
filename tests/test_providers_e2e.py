"""The official openai SDK -> /v1/chat/completions -> anthropic and ollama deployments (the fake)."""

from __future__ import annotations

import openai
import orjson
import pytest
import trio

from .conftest import MASTER_KEY, PROVIDER_KEY, parse_sse
from .kinds import MODELS, start_kinds


@pytest.fixture
async def kgw(nursery, fake):
    return await start_kinds(nursery, fake.port)


def sdk(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0, timeout=30)


@pytest.mark.parametrize("kind", ["anthropic", "ollama"])
async def test_stream_and_whole_answer_agree(kgw, fake, kind):
    def call():
        client = sdk(kgw)
        whole = client.chat.completions.create(model=MODELS[kind], messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6)
        chunks = list(client.chat.completions.create(
            model=MODELS[kind], stream=True, stream_options={"include_usage": True}, max_tokens=6,
            messages=[{"role": "user", "content": "Hi"}]))
        return whole, chunks

    whole, chunks = await trio.to_thread.run_sync(call)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == " The quick brown fox jumps over"
    assert whole.choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6 == whole.usage.completion_tokens
    body = fake.records[-1].body
    if kind == "anthropic":
        assert body["max_tokens"] == 6 and fake.records[-1].headers["x-api-key"] == PROVIDER_KEY
    else:
        assert body["options"] == {"num_predict": 6} and fake.records[-1].authorization is None


@pytest.mark.parametrize("kind", ["anthropic", "ollama"])
async def test_mid_stream_error_is_an_openai_error_event(kgw, http, kind):
    body = {"model": MODELS[kind], "stream": True, "messages": [{"role": "user", "content": 'fake: {"error_after": 3}'}]}
    async with http.stream("POST", kgw.v1 + "/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = parse_sse(await response.aread())
    assert b"[DONE]" not in events
    contents = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert "".join(c or "" for c in contents) == " The quick brown"
    assert orjson.loads(events[-1])["error"]["code"] in ("overloaded", "upstream_error")


@pytest.mark.parametrize("kind, status, error_class", [
    ("anthropic", 400, openai.BadRequestError), ("ollama", 404, openai.NotFoundError),
    ("anthropic", 529, openai.InternalServerError),
])
async def test_provider_statuses_map_to_openai_errors(kgw, kind, status, error_class):
    with pytest.raises(error_class) as info:
        await trio.to_thread.run_sync(lambda: sdk(kgw).chat.completions.create(
            model=MODELS[kind], messages=[{"role": "user", "content": f'fake: {{"status": {status}}}'}]))
    assert info.value.status_code == (502 if status >= 500 else status)
    assert PROVIDER_KEY not in str(info.value.body)


async def test_images_reach_an_anthropic_deployment_as_blocks(kgw, fake):
    await trio.to_thread.run_sync(lambda: sdk(kgw).chat.completions.create(
        model="via-anthropic", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]))
    assert fake.records[-1].body["messages"][0]["content"][1] == {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


async def test_ollama_refuses_image_urls_clearly(kgw, http):
    body = {"model": "via-ollama", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}
    response = await http.post(kgw.v1 + "/chat/completions", json=body)
    assert response.status_code == 400 and "base64 data: URLs" in response.json()["error"]["message"]
