"""The sans-IO SSE codec, fed whole, at every split point, and one byte at a time."""

import pytest

from proxy.core.sse import DONE, SSEDecoder, SSEError, SSEEvent, encode_comment, encode_event

STREAM = (
    b": comment first\n"
    b"data: {\"a\": 1}\n\n"
    b"event: error\ndata: line one\ndata: line two\n\n"
    b"id: 7\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent(b'{"a": 1}'),
    SSEEvent(b"line one\nline two", event="error"),
    SSEEvent(b"no-space", id="7"),
    SSEEvent(b"[DONE]", id="7"),  # id persists, as the spec says
]


def decode_in_parts(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    start = 0
    for cut in cuts + [len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    return events + decoder.close()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_split_point(newline):
    data = STREAM.replace(b"\n", newline)
    assert decode_in_parts(data, []) == EXPECTED
    for cut in range(len(data) + 1):
        assert decode_in_parts(data, [cut]) == EXPECTED, cut


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_one_byte_at_a_time(newline):
    data = STREAM.replace(b"\n", newline)
    assert decode_in_parts(data, list(range(1, len(data)))) == EXPECTED


def test_crlf_split_between_cr_and_lf_dispatches_once():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\n\r") == []
    assert decoder.feed(b"\n") == [SSEEvent(b"x")]
    assert decoder.close() == []


def test_last_event_without_blank_line_is_dispatched_on_close():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: first\n\ndata: last") == [SSEEvent(b"first")]
    assert decoder.close() == [SSEEvent(b"last")]


def test_comments_and_empty_events_dispatch_nothing():
    decoder = SSEDecoder()
    assert decoder.feed(b": keepalive\n\n: again\n\nevent: ping\n\n") == []


def test_oversized_event_is_refused_whether_in_one_line_or_many():
    with pytest.raises(SSEError):
        SSEDecoder(max_event_bytes=1024).feed(b"data: " + b"x" * 2000)
    decoder = SSEDecoder(max_event_bytes=1024)
    with pytest.raises(SSEError):
        for _ in range(100):
            decoder.feed(b"data: " + b"y" * 50 + b"\n")


def test_encode_round_trips_multiline_data():
    raw = b"one\ntwo\r\nthree"
    encoded = encode_event(raw, event="error")
    assert encoded == b"event: error\ndata: one\ndata: two\ndata: three\n\n"
    decoder = SSEDecoder()
    assert decoder.feed(encoded) == [SSEEvent(b"one\ntwo\nthree", event="error")]


def test_encode_simple_and_comment():
    assert encode_event(b'{"x":1}') == b'data: {"x":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    assert encode_comment("keep\nalive") == b": keep alive\n\n"
    assert SSEDecoder().feed(encode_comment("hi")) == []


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_encoder_batches_equal_one_event_each(include_usage):
    """The chat encoder's one-join path for many chunks writes what one encode_event per chunk
    writes, and falls back to it for a line break in a chunk's data or a usage chunk."""
    import orjson

    from proxy.core.events import Chunk
    from proxy.core.request import parse_chat_request
    from proxy.core.usage import Usage
    from proxy.formats.chat_api import ChatStreamEncoder

    request = parse_chat_request(orjson.dumps({"model": "m", "stream": True,
                                               "messages": [{"role": "user", "content": "hi"}],
                                               "stream_options": {"include_usage": include_usage}}))
    plain = [Chunk(b'{"choices":[{"delta":{"content":"%d"}}]}' % i, True) for i in range(5)]
    usage = Chunk(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}', True,
                  {"prompt_tokens": 3, "completion_tokens": 5})
    for chunks in (plain, plain[:1], plain[:2] + [Chunk(b'{"a":\n1}')] + plain[2:], plain[:2] + [Chunk(b'{"a":\r1}')],
                   plain + [usage]):
        counted = Usage()
        out = ChatStreamEncoder(request, counted).encode(chunks)
        expected = b"".join(encode_event(c.data) for c in chunks if c.usage is None or include_usage)
        assert out == expected
        assert counted.streamed_chunks == len(chunks)
        assert [e.data for e in decode_in_parts(out, [])] == \
            [c.data.replace(b"\r", b"\n") for c in chunks if c.usage is None or include_usage]
    assert counted.completion_tokens == 5  # the usage chunk was still read
