"""One contract, every adapter: byte-exact transcripts in, the same canonical answer out.

Each provider kind gets a realistic transcript of one streamed answer (text with multi-byte
UTF-8, one tool call in fragments, a finish reason, usage with cached tokens) and its
non-streaming twin. Whatever the byte boundaries — whole, every single byte, every two-piece
split, odd-sized reads — the canonical chunks must add up to the same answer; a cut stream, an
error event or an oversized event must return what came before and set `failed`.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core.request import ChatRequest
from proxy.config import ProviderConfig
from proxy.core.errors import UpstreamError, UpstreamRateLimited, UpstreamStatusError
from proxy.formats import make_adapter
from proxy.routing.policy import Action, classify

TEXT = "Héllo wörld ✓ — 日本"


def _oa(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"  # CRLF: allowed by SSE, seen in the wild


OPENAI_EVENTS = ([
    _oa({"role": "assistant", "content": ""}),
    _oa({"content": TEXT[:7]}), _oa({"content": TEXT[7:]}),
    _oa({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "get", "arguments": ""}}]}),
    _oa({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
    _oa({"tool_calls": [{"index": 0, "function": {"arguments": ' 1}'}}]}),
    _oa({}, "tool_calls"),
    b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                              "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                                                       "total_tokens": 15,
                                                       "prompt_tokens_details": {"cached_tokens": 4}}}) + b"\n\n",
    b"data: [DONE]\n\n",
])
OPENAI_STREAM = b"".join(OPENAI_EVENTS)
OPENAI_COMPLETION = orjson.dumps({
    "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": TEXT,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"x": 1}'}}]}}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
              "prompt_tokens_details": {"cached_tokens": 4}}})


def _an(kind: str, data: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(dict(type=kind, **data)) + b"\n\n"


ANTHROPIC_EVENTS = ([
    _an("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                      "content": [], "stop_reason": None,
                                      "usage": {"input_tokens": 4, "output_tokens": 1,
                                                "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2}}}),
    _an("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    _an("ping", {}),
    _an("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": TEXT[:7]}}),
    _an("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": TEXT[7:]}}),
    _an("content_block_stop", {"index": 0}),
    _an("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "call_1", "name": "get",
                                                              "input": {}}}),
    _an("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"x":'}}),
    _an("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": " 1}"}}),
    _an("content_block_stop", {"index": 1}),
    _an("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 5}}),
    _an("message_stop", {}),
])
ANTHROPIC_STREAM = b"".join(ANTHROPIC_EVENTS)
ANTHROPIC_COMPLETION = orjson.dumps({
    "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "tool_use",
    "content": [{"type": "text", "text": TEXT}, {"type": "tool_use", "id": "call_1", "name": "get", "input": {"x": 1}}],
    "usage": {"input_tokens": 4, "output_tokens": 5, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2}})


def _ol(message: dict, **extra: Any) -> bytes:
    return orjson.dumps({"model": "m", "created_at": "2024-01-01T00:00:00Z",
                         "message": dict(role="assistant", **message), "done": False, **extra}) + b"\n"


OLLAMA_EVENTS = ([
    _ol({"content": TEXT[:7]}), _ol({"content": TEXT[7:]}),
    _ol({"content": "", "tool_calls": [{"function": {"name": "get", "arguments": {"x": 1}}}]}),
    _ol({"content": ""}, done_reason="stop", prompt_eval_count=10, eval_count=5).replace(b'"done":false', b'"done":true'),
])
OLLAMA_STREAM = b"".join(OLLAMA_EVENTS)
EVENTS = {"openai": OPENAI_EVENTS, "anthropic": ANTHROPIC_EVENTS, "ollama": OLLAMA_EVENTS}
OLLAMA_COMPLETION = orjson.dumps({
    "model": "m", "created_at": "2024-01-01T00:00:00Z", "done": True, "done_reason": "stop",
    "message": {"role": "assistant", "content": TEXT,
                "tool_calls": [{"function": {"name": "get", "arguments": {"x": 1}}}]},
    "prompt_eval_count": 10, "eval_count": 5})

CASES = {
    # kind: (stream, completion, expected usage, error event, base_url)
    "openai": (OPENAI_STREAM, OPENAI_COMPLETION,
               {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 4}},
               b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n', "https://api.example/v1"),
    "anthropic": (ANTHROPIC_STREAM, ANTHROPIC_COMPLETION,
                  {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                   "prompt_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2}},
                  b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"boom"}}\n\n',
                  "https://api.example"),
    "ollama": (OLLAMA_STREAM, OLLAMA_COMPLETION,
               {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
               b'{"error":"boom"}\n', "http://localhost:11434"),
}
KINDS = list(CASES)


def adapter(kind: str, **extra: Any):
    base_url = CASES["openai" if kind == "openai-compatible" else kind][4]
    return make_adapter(ProviderConfig(name="p", kind=kind, base_url=base_url, **extra), "sk-provider")


def request(**body: Any) -> ChatRequest:
    body = {"model": "client-model", "messages": [{"role": "user", "content": "Hi"}], **body}
    return ChatRequest(model=body["model"], stream=bool(body.get("stream")), include_usage=False, body=body)


def summary(chunks: list) -> dict[str, Any]:
    """What a client would assemble from canonical chunks."""
    out: dict[str, Any] = {"text": "", "calls": {}, "finish": None, "usage": None}
    for chunk in chunks:
        assert chunk.event is None
        chunk = orjson.loads(chunk.data)
        assert chunk["object"] == "chat.completion.chunk"
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            out["text"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                entry = out["calls"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                entry["id"] = call.get("id") or entry["id"]
                fn = call.get("function") or {}
                entry["name"] = fn.get("name") or entry["name"]
                entry["arguments"] += fn.get("arguments") or ""
            out["finish"] = choice.get("finish_reason") or out["finish"]
    for entry in out["calls"].values():  # compare arguments as JSON: providers space them differently
        entry["arguments"] = orjson.loads(entry["arguments"])
    return out


def expected(kind: str) -> dict[str, Any]:
    return {"text": TEXT, "calls": {0: {"id": "call_0" if kind == "ollama" else "call_1", "name": "get",
                                        "arguments": {"x": 1}}},
            "finish": "tool_calls", "usage": CASES[kind][2]}


def run(kind: str, pieces: list[bytes], max_event_bytes: int = 1 << 20) -> tuple[list, Any]:
    parser = adapter(kind).stream_parser(max_event_bytes, request(stream=True))
    chunks = []
    for piece in pieces:
        chunks += parser.feed(piece)
        if parser.failed is not None:
            return chunks, parser.failed
    chunks += parser.close()
    return chunks, parser.failed


def splits(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
async def test_stream_is_the_same_answer_at_any_read_size(kind, size):
    chunks, failed = run(kind, splits(CASES[kind][0], size))
    assert failed is None
    assert summary(chunks) == expected(kind)


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_is_the_same_answer_at_every_two_piece_split(kind):
    data = CASES[kind][0]
    want = expected(kind)
    for at in range(len(data) + 1):
        chunks, failed = run(kind, [data[:at], data[at:]])
        assert failed is None, at
        assert summary(chunks) == want, at


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_answer_is_the_same(kind):
    completion = adapter(kind).parse_completion(CASES[kind][1], request())
    assert completion["object"] == "chat.completion"
    choice = completion["choices"][0]
    message = choice["message"]
    assert message["content"] == TEXT
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in message["tool_calls"]] \
        == [("get", {"x": 1})]
    assert choice["finish_reason"] == "tool_calls"
    assert completion["usage"] == CASES[kind][2]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cut_stream_fails_after_relaying_what_came(kind):
    events = EVENTS[kind]
    # openai: a stream that ends after its finish_reason is accepted (some servers omit [DONE])
    last = len(events) - (3 if kind == "openai" else 1)
    for keep in range(1, last):  # cut between events: every event before is relayed
        cut = b"".join(events[:keep])
        chunks, failed = run(kind, splits(cut, 3))
        assert isinstance(failed, UpstreamError) and "before it was complete" in failed.message
        assert summary_text(chunks) == summary_text(run(kind, [cut])[0])
    first_text = {"openai": 2, "anthropic": 4, "ollama": 1}[kind]
    half = b"".join(events[:first_text]) + events[first_text][:20]  # cut inside an event: fails
    chunks, failed = run(kind, [half])
    assert isinstance(failed, UpstreamError)
    assert TEXT[:7] in summary_text(chunks)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1, 5, 1 << 20])
async def test_an_error_event_fails_after_relaying_what_came(kind, size):
    events, error_event = EVENTS[kind], CASES[kind][3]
    head = b"".join(events[:3])
    chunks, failed = run(kind, splits(head + error_event + b"".join(events[3:]), size))
    assert isinstance(failed, UpstreamError) and "boom" in failed.message
    assert summary_text(chunks) == summary_text(run(kind, [head])[0])
    assert classify(failed) is Action.RETRY


def summary_text(chunks: list) -> str:
    return "".join((c.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
                   for c in (orjson.loads(x.data) for x in chunks))


async def test_anthropic_overloaded_event_is_a_529_retryable_like_503():
    chunks, failed = run("anthropic", [b"".join(ANTHROPIC_EVENTS[:4]), CASES["anthropic"][3]])
    assert isinstance(failed, UpstreamStatusError)
    assert failed.upstream_status == 529 and failed.status == 502 and classify(failed) is Action.RETRY
    assert failed.anthropic_type == "overloaded_error"


@pytest.mark.parametrize("kind", KINDS)
async def test_an_oversized_event_fails_the_stream(kind):
    huge = {"openai": _oa({"content": "x" * 5000}), "anthropic": _an(
        "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "x" * 5000}}),
        "ollama": _ol({"content": "x" * 5000})}[kind]
    chunks, failed = run(kind, splits(huge, 1000), max_event_bytes=2048)
    assert isinstance(failed, UpstreamError) and "larger than 2048" in failed.message


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_events_fail_the_stream(kind):
    garbage = b'{"model": "m", "mess\n' if kind == "ollama" else b'data: {"id": "c1", "choi\n\n'
    chunks, failed = run(kind, [EVENTS[kind][0], garbage])
    assert isinstance(failed, UpstreamError) and "not JSON" in failed.message


@pytest.mark.parametrize("kind", KINDS)
async def test_provider_error_statuses(kind):
    a = adapter(kind)
    body = {"openai": b'{"error": {"message": "slow down", "type": "rate_limit_error"}}',
            "anthropic": b'{"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}',
            "ollama": b'{"error": "slow down"}'}[kind]
    limited = a.parse_error(429, {"retry-after": "7"}, body)
    assert isinstance(limited, UpstreamRateLimited) and limited.retry_after == "7"
    assert classify(limited) is Action.RETRY
    assert "slow down" in limited.message and limited.status == 429
    server = a.parse_error(503, {}, b"<html>oops</html>")
    assert server.status == 502 and server.upstream_status == 503 and classify(server) is Action.RETRY
    bad = a.parse_error(400, {}, body.replace(b"rate_limit_error", b"invalid_request_error"))
    assert bad.status == 400 and classify(bad) is not Action.RETRY and "slow down" in bad.message


async def test_anthropic_529_status_is_overloaded():
    error = adapter("anthropic").parse_error(529, {}, b'{"type":"error","error":{"type":"overloaded_error",'
                                                      b'"message":"Overloaded"}}')
    assert error.status == 502 and error.upstream_status == 529 and classify(error) is Action.RETRY
    assert error.to_anthropic_body()["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("kind, url, auth", [
    ("openai", "https://api.example/v1/chat/completions", ("authorization", "Bearer sk-provider")),
    ("anthropic", "https://api.example/v1/messages", ("x-api-key", "sk-provider")),
    ("ollama", "http://localhost:11434/api/chat", ("authorization", "Bearer sk-provider")),
])
async def test_wire_request_shape(kind, url, auth):
    wire = adapter(kind).chat_request(request(stream=True, max_tokens=9), "upstream-model")
    assert wire.method == "POST" and wire.url == url
    assert auth in wire.headers and ("content-type", "application/json") in wire.headers
    body = orjson.loads(wire.body)
    assert body["model"] == "upstream-model" and body["stream"] is True


async def test_azure_style_openai_compatible():
    a = adapter("openai-compatible", api_key_header="api-key", api_version="2024-10-21",
                headers=(("x-tenant", "t1"),))
    wire = a.chat_request(request(), "dep")
    assert wire.url == "https://api.example/v1/chat/completions?api-version=2024-10-21"
    assert ("api-key", "sk-provider") in wire.headers and ("x-tenant", "t1") in wire.headers
    assert not any(name == "authorization" for name, _ in wire.headers)
    assert a.embeddings_request({"input": "x"}, "dep").url.endswith("/embeddings?api-version=2024-10-21")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_provider_echoing_its_key_never_passes_it_on(kind):
    body = {"openai": b'{"error": {"message": "Incorrect API key provided: sk-provider"}}',
            "anthropic": b'{"type": "error", "error": {"type": "authentication_error", '
                         b'"message": "invalid x-api-key sk-provider"}}',
            "ollama": b'{"error": "bad key sk-provider"}'}[kind]
    error = adapter(kind).parse_error(401, {}, body)
    assert error.status == 401
    assert "sk-provider" not in error.message and "sk-provider" not in str(error.to_body())
    assert "sk-provider" not in str(error.to_anthropic_body()) and "***" in error.message


def shows(chunk: dict[str, Any]) -> bool:
    """What a client must see: content, a tool call, a refusal, a finish reason, or usage alone."""
    choices = chunk.get("choices")
    return not choices or any(c["delta"].get("content") or c["delta"].get("tool_calls")
                              or c["delta"].get("refusal") or c.get("finish_reason") for c in choices)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1, 7, 1 << 20])
async def test_chunks_say_what_they_carry(kind, size):
    """`visible` and `usage`, set by the adapter without the pipeline parsing anything, agree
    with the chunk's JSON: the role chunk is the one chunk nobody needs to see."""
    chunks, failed = run(kind, splits(CASES[kind][0], size))
    assert failed is None
    parsed = [orjson.loads(c.data) for c in chunks]
    assert [c.visible for c in chunks] == [shows(p) for p in parsed]
    assert [c.visible for c in chunks].count(False) == 1 and not chunks[0].visible
    assert [c.usage for c in chunks] == [p.get("usage") for p in parsed]
    assert chunks[-1].usage == CASES[kind][2]


@pytest.mark.parametrize("delta, finish, visible", [
    ({"role": "assistant", "content": ""}, None, False),
    ({"role": "assistant", "content": "", "refusal": None}, None, False),
    ({"content": None}, None, False),
    ({}, None, False),
    ({"content": "x"}, None, True),
    ({"content": "\""}, None, True),
    ({"refusal": "no"}, None, True),
    ({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}, None, True),
    ({}, "stop", True),
])
@pytest.mark.parametrize("separators", ["compact", "spaced"])
async def test_openai_visibility_is_read_off_the_bytes(delta, finish, visible, separators):
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None}
    if separators == "spaced":  # some compatible servers write JSON as Python's json.dumps does
        import json
        data = json.dumps(chunk).encode()
    else:
        data = orjson.dumps(chunk)
    parser = adapter("openai").stream_parser(1 << 20)
    (got,) = parser.feed(b"data: " + data + b"\n\n")
    assert got.data == data and got.visible is visible
    # a spaced "usage": null is not ruled out by bytes: a usage object without counts
    assert got.usage == ({} if separators == "spaced" else None)


async def test_anthropic_passthrough_forwards_the_events_as_they_came():
    anthropic_request = ChatRequest(model="m", stream=True, include_usage=True,
                                    body={"model": "m", "messages": [], "stream": True},
                                    anthropic_body={"model": "m", "messages": [], "stream": True})
    parser = adapter("anthropic").stream_parser(1 << 20, anthropic_request)
    chunks = []
    for piece in splits(ANTHROPIC_STREAM, 5):
        chunks += parser.feed(piece)
    chunks += parser.close()
    assert parser.failed is None
    assert [b"event: %s\ndata: %s\n\n" % (c.event.encode(), c.data) for c in chunks] == ANTHROPIC_EVENTS
    assert all(c.visible for c in chunks)
    with_usage = [(c.event, c.usage) for c in chunks if c.usage is not None]
    assert [event for event, _ in with_usage] == ["message_start", "message_delta"]
    assert with_usage[-1][1] == CASES["anthropic"][2]
