"""Anthropic <-> canonical translation, both sides, without sockets (sans-IO)."""

from __future__ import annotations

import orjson
import pytest

from proxy.formats.messages_api import StreamEncoder, error_event, parse_messages_request, to_message
from proxy.core.errors import InvalidRequest, UpstreamStatusError
from proxy.core.events import Chunk
from proxy.formats.anthropic import to_anthropic
from proxy.core.sse import SSEDecoder


def parse(**body):
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}], **body}
    return parse_messages_request(orjson.dumps(body))


def events(data: bytes) -> list[tuple[str, dict]]:
    decoder = SSEDecoder()
    return [(e.event, orjson.loads(e.data)) for e in decoder.feed(data) + decoder.close()]


# -- client request -> canonical --

async def test_request_translation_keeps_the_original_for_passthrough():
    request = parse(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                    stop_sequences=["END"], temperature=0.2, top_p=0.9, metadata={"user_id": "u"},
                    stream=True)
    assert request.anthropic_body["system"][0] == {"type": "text", "text": "A"}
    body = request.body
    assert body["messages"][0] == {"role": "system", "content": "A\n\nB"}
    assert body["stop"] == ["END"] and body["temperature"] == 0.2 and body["top_p"] == 0.9
    assert body["user"] == "u" and body["max_tokens"] == 10
    assert body["stream_options"] == {"include_usage": True} and request.stream


async def test_images_become_image_url_parts():
    request = parse(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
        {"type": "text", "text": "What is this?"}]}])
    assert request.body["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "text", "text": "What is this?"}]


async def test_thinking_blocks_are_dropped_for_canonical_and_errors_are_marked():
    request = parse(messages=[
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "...", "signature": "s"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                      "content": [{"type": "text", "text": "boom"}]}]}])
    assert request.body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}
    assert request.body["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "Error: boom"}


@pytest.mark.parametrize("choice, openai_choice, parallel", [
    ({"type": "auto"}, "auto", None), ({"type": "any"}, "required", None), ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "f", "disable_parallel_tool_use": True},
     {"type": "function", "function": {"name": "f"}}, False),
])
async def test_tool_choice_mapping(choice, openai_choice, parallel):
    body = parse(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice=choice).body
    assert body["tool_choice"] == openai_choice
    assert body.get("parallel_tool_calls") == parallel


@pytest.mark.parametrize("bad, param", [
    (b"[1]", "body"), (b"{", None),
    (orjson.dumps({"model": "", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}), "model"),
    (orjson.dumps({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}), "max_tokens"),
    (orjson.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": 5}]}),
     "messages[0].content"),
    (orjson.dumps({"model": "m", "max_tokens": 1, "system": [{"type": "image"}],
                   "messages": [{"role": "user", "content": "x"}]}), "system[0]"),
    (orjson.dumps({"model": "m", "max_tokens": 1, "stop_sequences": "END",
                   "messages": [{"role": "user", "content": "x"}]}), "stop_sequences"),
    (orjson.dumps({"model": "m", "max_tokens": 1, "tool_choice": {"type": "maybe"},
                   "messages": [{"role": "user", "content": "x"}]}), "tool_choice"),
    (orjson.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}), "messages[0].content[0]"),
])
async def test_bad_requests_name_the_field(bad, param):
    with pytest.raises(InvalidRequest) as info:
        parse_messages_request(bad)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.to_anthropic_body()["error"]["type"] == "invalid_request_error"


# -- canonical -> Anthropic provider request --

async def test_canonical_to_anthropic_request():
    body = {"model": "x", "max_completion_tokens": 33, "stop": "END", "user": "u", "temperature": 1,
            "messages": [{"role": "developer", "content": "Sys"},
                         {"role": "user", "content": "a"}, {"role": "user", "content": [
                             {"type": "text", "text": "b"},
                             {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QQ=="}}]}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
            "parallel_tool_calls": False}
    out = to_anthropic(body, "claude", 4096)
    assert out["model"] == "claude" and out["max_tokens"] == 33
    assert out["system"] == [{"type": "text", "text": "Sys"}]
    assert out["messages"] == [{"role": "user", "content": [  # consecutive user turns merge
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QQ=="}}]}]
    assert out["stop_sequences"] == ["END"] and out["metadata"] == {"user_id": "u"} and out["temperature"] == 1
    assert out["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert "stream" not in out and to_anthropic(dict(body, stream=True), "c", 1)["stream"] is True


# -- canonical answers -> Anthropic responses --

async def test_completion_to_message_with_usage_split():
    message = to_message({"id": "abc", "choices": [{"finish_reason": "length", "message": {
        "content": "Hi", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": '{"q": 1}'}}]}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30}}}, "client-model")
    assert message["model"] == "client-model" and message["stop_reason"] == "max_tokens"
    assert message["content"] == [{"type": "text", "text": "Hi"},
                                  {"type": "tool_use", "id": "c", "name": "f", "input": {"q": 1}}]
    assert message["usage"] == {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 60,
                                "cache_creation_input_tokens": 30}


def chunk(delta=None, finish=None, usage=None):
    c = {"id": "x", "object": "chat.completion.chunk", "choices": [] if delta is None else
         [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        c["usage"] = usage
    return Chunk(orjson.dumps(c), usage=usage or None)


async def test_stream_encoder_blocks_indices_and_order():
    encoder = StreamEncoder("m")
    out = encoder.encode([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"})])
    out += encoder.encode([Chunk(chunk({"tool_calls": [{"index": 0, "id": "a", "function": {
        "name": "f", "arguments": '{"x"'}}]}).data.replace(b",", b", "))])  # as another provider spaces it
    out += encoder.encode([chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]}),
                           chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
                           chunk({}, "tool_calls"), chunk(usage={"prompt_tokens": 3, "completion_tokens": 2})])
    out += encoder.finish()
    got = events(out)
    assert [e for e, _ in got] == [
        "message_start", "content_block_start", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    starts = [d for e, d in got if e == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [(0, "text"), (1, "tool_use"), (2, "tool_use")]
    assert starts[1]["content_block"]["id"] == "a" and starts[2]["content_block"]["name"] == "g"
    deltas = [d for e, d in got if e == "content_block_delta"]
    assert deltas[1] == {"type": "content_block_delta", "index": 1,
                         "delta": {"type": "input_json_delta", "partial_json": '{"x"'}}
    final = got[-2][1]
    assert final["delta"]["stop_reason"] == "tool_use"
    assert final["usage"]["input_tokens"] == 3 and final["usage"]["output_tokens"] == 2


async def test_stream_encoder_forwards_raw_events_verbatim():
    encoder = StreamEncoder("m")
    raw = Chunk(b'{"type":"message_start","message":{"id":"msg_1"}}',
                usage={"prompt_tokens": 5, "completion_tokens": 0}, event="message_start")
    assert encoder.encode([raw]) == b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1"}}\n\n'
    assert encoder.finish() == b""  # the provider's own message_stop ends it
    assert encoder.usage["prompt_tokens"] == 5


async def test_error_event_shape():
    error = UpstreamStatusError("provider p: Overloaded", status=529)
    (name, data), = events(error_event(error))
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "overloaded_error", "message": "provider p: Overloaded"}}
