"""End to end: the official `anthropic` SDK -> gateway /v1/messages -> each provider kind (the fake)."""

from __future__ import annotations

import anthropic
import httpx
import orjson
import pytest
import trio

from .conftest import MASTER_KEY, PROVIDER_KEY, parse_sse
from .kinds import KINDS, MODELS, UPSTREAM_MODELS, start_kinds

TEXT5 = " The quick brown fox jumps"


@pytest.fixture
async def kgw(nursery, fake):
    return await start_kinds(nursery, fake.port)


def sdk(gw, key=MASTER_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=30)


def ask(content: str, **extra):
    return {"max_tokens": 5, "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_message_from_every_kind(kgw, fake, kind):
    message = await trio.to_thread.run_sync(lambda: sdk(kgw).messages.create(model=MODELS[kind], **ask("Hi there")))
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == TEXT5
    assert message.stop_reason == "max_tokens"  # fake's 8 tokens capped at max_tokens=5
    assert message.usage.output_tokens == 5 and message.usage.input_tokens == 2
    record = fake.records[-1]
    assert record.model == UPSTREAM_MODELS[kind]
    assert record.headers.get("x-api-key") != MASTER_KEY and record.authorization != f"Bearer {MASTER_KEY}"


@pytest.mark.parametrize("kind", KINDS)
async def test_streaming_message_from_every_kind(kgw, fake, kind):
    def call():
        with sdk(kgw).messages.stream(model=MODELS[kind], **ask("Hi there", max_tokens=100)) as stream:
            text = "".join(stream.text_stream)
            return text, stream.get_final_message()

    text, final = await trio.to_thread.run_sync(call)
    assert text == " The quick brown fox jumps over the lazy"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 8 and final.usage.input_tokens == 2
    assert fake.records[-1].stream is True


async def test_anthropic_wire_format_ends_with_message_stop(kgw, http):
    async with http.stream("POST", kgw.url + "/v1/messages",
                           json=dict(ask("Hi"), model="via-openai", stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = await response.aread()
    assert b"[DONE]" not in body
    names = [line.split(b": ", 1)[1] for line in body.split(b"\n") if line.startswith(b"event: ")]
    assert names[0] == b"message_start" and names[-2:] == [b"message_delta", b"message_stop"]
    assert names.count(b"content_block_start") == names.count(b"content_block_stop") == 1


async def test_anthropic_deployment_gets_the_request_untouched(kgw, fake, http):
    """Passthrough: cache_control, thinking blocks and metadata survive; only the model changes."""
    request = {
        "max_tokens": 50, "metadata": {"user_id": "u-1"}, "temperature": 0.5,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig-abc"},
                {"type": "text", "text": "A1"}]},
            {"role": "user", "content": [{"type": "text", "text": "Q2", "cache_control": {"type": "ephemeral"}}]},
        ],
    }
    response = await http.post(kgw.url + "/v1/messages", json=dict(request, model="via-anthropic"),
                               headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})
    assert response.status_code == 200
    record = fake.records[-1]
    assert record.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert record.path == "/v1/messages"
    assert record.body == dict(request, model="claude-fake")
    assert record.headers["x-api-key"] == PROVIDER_KEY
    assert record.headers["anthropic-version"] == "2023-06-01"


async def test_passthrough_stream_is_forwarded_event_for_event(kgw, fake, http):
    body = dict(ask('fake: {"tool_call": {"name": "f", "arguments": "{\\"x\\": 1}"}, "tokens": 2}'),
                model="via-anthropic", stream=True, tools=[{"name": "f", "input_schema": {"type": "object"}}])
    async with http.stream("POST", kgw.url + "/v1/messages", json=body) as response:
        relayed = await response.aread()
    # the fake's own events, as it wrote them (ids and all)
    assert b'"id":"toolu_fake_' in relayed and b'"type":"ping"' in relayed
    assert relayed.count(b"event: content_block_delta") == 2 + 3  # 2 words, 3 argument fragments


async def test_cached_tokens_reach_both_apis(kgw):
    prompt = 'fake: {"cached_tokens": 100, "cache_write_tokens": 20}'

    def call():
        import openai

        message = sdk(kgw).messages.create(model="via-anthropic", **ask(prompt))
        with sdk(kgw).messages.stream(model="via-openai", **ask(prompt)) as stream:
            streamed = stream.get_final_message()
        completion = openai.OpenAI(base_url=kgw.v1, api_key=MASTER_KEY, max_retries=0).chat.completions.create(
            model="via-anthropic", messages=[{"role": "user", "content": prompt}])
        return message, streamed, completion

    message, streamed, completion = await trio.to_thread.run_sync(call)
    assert message.usage.cache_read_input_tokens == 100
    assert message.usage.cache_creation_input_tokens == 20
    assert message.usage.input_tokens == 5  # the prompt's 5 words, uncached
    # an OpenAI provider reports reads only; prompt_tokens includes them
    assert streamed.usage.cache_read_input_tokens == 100 and streamed.usage.input_tokens == 5
    assert completion.usage.prompt_tokens == 125
    assert completion.usage.prompt_tokens_details.cached_tokens == 100
    assert completion.usage.prompt_tokens_details.model_dump()["cache_write_tokens"] == 20


async def test_auto_prompt_cache_marks_system_and_tools(nursery, fake):
    gw = await start_kinds(nursery, fake.port, extra={"anthropic": {"auto_prompt_cache": True}})

    def call():
        import openai

        return openai.OpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0).chat.completions.create(
            model="via-anthropic", messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}],
            tools=[{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
                   {"type": "function", "function": {"name": "b", "parameters": {"type": "object"}}}])

    await trio.to_thread.run_sync(call)
    body = fake.records[-1].body
    assert body["system"] == [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    assert "cache_control" not in body["tools"][0]
    assert body["tools"][1]["cache_control"] == {"type": "ephemeral"}
    assert body["max_tokens"] == 4096  # required by Anthropic: the provider's default


# -- auth and errors: Anthropic-shaped, the SDK's own exception classes --

async def test_x_api_key_and_bearer_are_both_accepted(kgw, http):
    async with httpx.AsyncClient() as bare:
        ok = await bare.post(kgw.url + "/v1/messages", headers={"x-api-key": MASTER_KEY},
                             json=dict(ask("Hi"), model="via-openai"))
    assert ok.status_code == 200
    bearer = await http.post(kgw.url + "/v1/messages", json=dict(ask("Hi"), model="via-openai"))
    assert bearer.status_code == 200


async def test_wrong_key_is_an_anthropic_authentication_error(kgw):
    with pytest.raises(anthropic.AuthenticationError) as info:
        await trio.to_thread.run_sync(lambda: sdk(kgw, "sk-wrong").messages.create(model="via-openai", **ask("Hi")))
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    assert "sk-wrong" not in str(info.value.body) and MASTER_KEY not in str(info.value.body)


@pytest.mark.parametrize("body, param", [
    ({"model": "via-openai", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "via-openai", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "via-openai", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"model": "via-openai", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages[0].content[0].type"),
    ({"model": "via-openai", "max_tokens": 5, "stream": "yes", "messages": [{"role": "user", "content": "x"}]},
     "stream"),
    ({"model": "via-openai", "max_tokens": 5, "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]},
     "tools[0].input_schema"),
])
async def test_bad_requests_get_anthropic_400s(kgw, http, body, param):
    response = await http.post(kgw.url + "/v1/messages", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert param in error["error"]["message"] or param.split(".")[0] in error["error"]["message"]


async def test_unknown_model_is_not_found(kgw):
    with pytest.raises(anthropic.NotFoundError) as info:
        await trio.to_thread.run_sync(lambda: sdk(kgw).messages.create(model="nope", **ask("Hi")))
    assert info.value.body["error"]["type"] == "not_found_error"


async def test_provider_overloaded_529_is_reported_as_overloaded(kgw):
    with pytest.raises(anthropic.InternalServerError) as info:
        await trio.to_thread.run_sync(
            lambda: sdk(kgw).messages.create(model="via-anthropic", **ask('fake: {"status": 529}')))
    assert info.value.status_code == 502
    assert info.value.body["error"]["type"] == "overloaded_error"


async def test_provider_rate_limit_keeps_retry_after(kgw):
    with pytest.raises(anthropic.RateLimitError) as info:
        await trio.to_thread.run_sync(lambda: sdk(kgw).messages.create(
            model="via-ollama", **ask('fake: {"status": 429, "retry_after": 7}')))
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("kind", KINDS)
async def test_error_mid_stream_is_an_anthropic_error_event(kgw, http, kind):
    body = dict(ask('fake: {"error_after": 2}', max_tokens=50), model=MODELS[kind], stream=True)
    async with http.stream("POST", kgw.url + "/v1/messages", json=body) as response:
        assert response.status_code == 200
        raw = await response.aread()
    assert raw.count(b"text_delta") == 2  # what came before the error is relayed
    assert b"message_stop" not in raw  # never a fake clean end
    last = raw.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\n")
    error = orjson.loads(parse_sse(last + b"\n\n")[0])
    assert error["type"] == "error"
    assert error["error"]["type"] == ("overloaded_error" if kind == "anthropic" else "api_error")


async def test_error_mid_stream_raises_in_the_sdk(kgw):
    def call():
        with sdk(kgw).messages.stream(model="via-anthropic", **ask('fake: {"error_after": 1}', max_tokens=50)) as s:
            return "".join(s.text_stream)

    with pytest.raises(anthropic.APIStatusError) as info:
        await trio.to_thread.run_sync(call)
    assert "overloaded" in str(info.value).lower()


async def test_logs_carry_cached_usage_and_never_keys(kgw, http, caplog):
    caplog.set_level("INFO")
    prompt = 'fake: {"cached_tokens": 100, "cache_write_tokens": 20}'
    for model in ("via-anthropic", "via-openai"):
        for stream in (False, True):
            r = await http.post(kgw.url + "/v1/messages", json=dict(ask(prompt), model=model, stream=stream))
            assert r.status_code == 200
    await http.post(kgw.url + "/v1/messages", json=dict(ask("Hi"), model="via-openai"),
                    headers={"authorization": "", "x-api-key": "sk-client-wrong"})
    await http.post(kgw.url + "/v1/messages", json=dict(ask('fake: {"status": 401}'), model="via-anthropic"))
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.server.messages"]
    assert len(lines) == 4  # errors before a response are logged by proxy.server.app
    assert all("cached_tokens=100" in line for line in lines)
    assert all("outcome=ok" in line for line in lines)
    errors = [r.getMessage() for r in caplog.records if r.name == "proxy.server.app"]
    assert [e.split(" -> ")[1][:3] for e in errors] == ["401", "401"]
    assert "cache_write_tokens=20" in lines[0]  # Anthropic reports writes; OpenAI providers do not
    assert all(secret not in caplog.text for secret in (MASTER_KEY, PROVIDER_KEY, "sk-client-wrong"))


async def test_missing_key_names_both_ways_to_send_it(kgw):
    async with httpx.AsyncClient() as bare:
        response = await bare.post(kgw.url + "/v1/messages", json=dict(ask("Hi"), model="via-openai"))
    assert response.status_code == 401
    assert response.json() == {"type": "error", "error": {
        "type": "authentication_error",
        "message": "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."},
        "request_id": response.headers["x-request-id"]}  # as Anthropic's own error bodies carry it
