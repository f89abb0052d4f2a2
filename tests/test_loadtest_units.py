"""loadtest's sans-IO parts: HTTP/1.1 response decoding, event classification, arrivals, percentiles."""

from __future__ import annotations

import json
import math
import random

import pytest

from loadtest import apis, prompts
from loadtest.prompts import Prompt
from loadtest.apis import Kind
from loadtest.http1 import ProtocolError, ResponseDecoder, encode_request
from loadtest.runner import arrival_times
from loadtest.settings import SettingsError, Shape, Target
from loadtest.stats import percentile

CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n")


def decode_all(raw: bytes, step: int | None = None) -> tuple[ResponseDecoder, bytes]:
    d = ResponseDecoder()
    out = bytearray()
    pieces = [raw] if step is None else [raw[i:i + step] for i in range(0, len(raw), step)]
    for piece in pieces:
        for part in d.feed(piece):
            out += part
    return d, bytes(out)


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_chunked_body_at_every_split(step):
    d, body = decode_all(CHUNKED, step)
    assert (d.head.status, d.done, body) == (200, True, b"hello, world")
    assert d.head.keep_alive and d.head.headers[b"content-type"] == b"text/event-stream"


def test_every_split_point_of_chunked_body():
    for cut in range(len(CHUNKED)):
        d = ResponseDecoder()
        body = b"".join(d.feed(CHUNKED[:cut]) + d.feed(CHUNKED[cut:]))
        assert body == b"hello, world" and d.done, cut


def test_content_length_and_interim_response():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope"
    for step in (None, 1):
        d, body = decode_all(raw, step)
        assert (d.head.status, body, d.done) == (401, b"nope", True)


def test_body_until_close_and_connection_close():
    d, body = decode_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc")
    assert not d.done and not d.head.keep_alive and body == b"abc"
    d.close()
    assert d.done


def test_premature_close_and_garbage_are_errors():
    d = ResponseDecoder()
    d.feed(CHUNKED[:-20])
    with pytest.raises(ProtocolError):
        d.close()
    with pytest.raises(ProtocolError):
        ResponseDecoder().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ProtocolError):
        ResponseDecoder().feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(ProtocolError):
        ResponseDecoder().feed(b"HTTP/1.1 200 OK\r\n" + b"x" * 70_000)


def test_encode_request():
    raw = encode_request(b"POST", b"h:1", b"/v1/chat/completions", [(b"a", b"b")], b"{}")
    assert raw == b"POST /v1/chat/completions HTTP/1.1\r\nhost: h:1\r\na: b\r\ncontent-length: 2\r\n\r\n{}"


OPENAI_ROLE = b'{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
OPENAI_TOKEN = b'{"id":"x","choices":[{"index":0,"delta":{"content":" The"},"finish_reason":null}]}'


@pytest.mark.parametrize("data, kind", [
    (OPENAI_ROLE, Kind.OTHER),
    (b'{"choices":[{"delta":{"role":"assistant","content": null}}]}', Kind.OTHER),
    (b'{"choices":[{"delta":{"content": ""}}]}', Kind.OTHER),
    (OPENAI_TOKEN, Kind.TOKEN),
    (b'{"choices":[{"delta":{"content": "\\n"}}]}', Kind.TOKEN),
    (b'{"choices":[{"delta":{"reasoning_content":"hm"}}]}', Kind.OTHER),
    (b'{"choices":[],"usage":{"completion_tokens":5}}', Kind.OTHER),
    (b'{"choices":[{"delta":{},"finish_reason":"stop"}]}', Kind.OTHER),
    (b"[DONE]", Kind.DONE),
    (b'{"error":{"message":"boom","type":"server_error"}}', Kind.ERROR),
])
def test_openai_classification(data, kind):
    assert apis.classify(apis.OPENAI, data) is kind


@pytest.mark.parametrize("data, kind", [
    (b'{"type":"message_start","message":{"content":[]}}', Kind.OTHER),
    (b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}', Kind.OTHER),
    (b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}', Kind.TOKEN),
    (b'{"type":"ping"}', Kind.OTHER),
    (b'{"type":"message_stop"}', Kind.DONE),
    (b'{"type":"error","error":{"type":"overloaded_error","message":"x"}}', Kind.ERROR),
])
def test_anthropic_classification(data, kind):
    assert apis.classify(apis.ANTHROPIC, data) is kind


def test_completion_tokens_and_bodies():
    assert apis.completion_tokens(apis.OPENAI, b'{"usage":{"completion_tokens":7}}') == 7
    assert apis.completion_tokens(apis.ANTHROPIC, b'{"usage":{"output_tokens":3}}') == 3
    assert apis.completion_tokens(apis.OPENAI, b"not json") == 0
    one = Prompt(({"role": "system", "content": "s"}, {"role": "user", "content": "p"}), None, 0)
    anthropic = json.loads(prompts.body(apis.ANTHROPIC, "m", one, True, True))
    assert anthropic["max_tokens"] == 1024 and anthropic["system"] == "s"
    assert anthropic["messages"] == [{"role": "user", "content": "p"}] and "stream_options" not in anthropic
    openai = json.loads(prompts.body(apis.OPENAI, "m", one, True, True))
    assert "max_tokens" not in openai and openai["stream_options"] == {"include_usage": True}
    assert "stream_options" not in json.loads(prompts.body(apis.OPENAI, "m", one, True, False))
    assert len(prompts.synthetic_prompt(100).split()) == 100


def test_constant_arrivals_with_ramp():
    shape = Shape(rate=100, requests=1, ramp_up=2.0)
    times = [t for _, t in zip(range(400), arrival_times(shape, random.Random(1)))]
    assert times[0] == 0 and times == sorted(times)
    ramp = [t for t in times if t < 2.0]
    assert len(ramp) == pytest.approx(100, abs=1)  # half the full rate on average over the ramp
    gaps = [b - a for a, b in zip(times, times[1:]) if a >= 2.0]
    assert all(g == pytest.approx(0.01) for g in gaps)


def test_poisson_arrivals_have_the_asked_rate():
    shape = Shape(rate=50, requests=1, poisson=True)
    times = [t for _, t in zip(range(5000), arrival_times(shape, random.Random(7)))]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.02, rel=0.05)
    assert max(gaps) > 3 * 0.02  # exponential, not constant


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 90) == 90.0
    assert math.isnan(percentile([], 50))


def test_bad_settings_fail_with_name_and_value():
    with pytest.raises(SettingsError, match="concurrency/rate"):
        Shape(concurrency=1, rate=1.0, requests=1)
    with pytest.raises(SettingsError, match="requests/duration"):
        Shape(concurrency=1)
    with pytest.raises(SettingsError, match="url"):
        Target(urls=("https://example.com/v1",))
    assert Target(urls=("http://127.0.0.1:8080/v1",)).endpoints[0].base_path == b"/v1"
