"""proxy.core.http1, sans-IO: every message fed whole, one byte at a time and at every two-piece split."""

from __future__ import annotations

import pytest

from proxy.core.http1 import (MAX_HEAD, MAX_HEADERS, ProtocolError, ResponseDecoder, encode_chunk,
                              encode_head, encode_request)


def feeds(raw: bytes) -> list[list[bytes]]:
    """Every way we cut a message: whole, byte by byte, and each two-piece split."""
    ways = [[raw], [raw[i:i + 1] for i in range(len(raw))]]
    ways += [[raw[:cut], raw[cut:]] for cut in range(1, len(raw))]
    return ways


def decode(pieces: list[bytes], method: bytes = b"GET", eof: bool = False) -> tuple[ResponseDecoder, bytes]:
    d = ResponseDecoder(method)
    body = bytearray()
    for piece in pieces:
        for part in d.feed(piece):
            assert part  # never an empty piece
            body += part
    if eof:
        d.close()
    return d, bytes(body)


def decode_every_way(raw: bytes, method: bytes = b"GET", eof: bool = False) -> tuple[ResponseDecoder, bytes]:
    results = [decode(pieces, method, eof) for pieces in feeds(raw)]
    first_d, first_body = results[0]
    for d, body in results[1:]:
        assert (d.head, d.done, d.trailers, body) == (first_d.head, first_d.done, first_d.trailers, first_body)
    return first_d, first_body


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n7;name=value;x\r\n, world\r\n0\r\n\r\n")


def test_chunked_crlf():
    d, body = decode_every_way(CHUNKED)
    assert (d.head.status, d.head.reason, body, d.done, d.keep_alive) == (200, b"OK", b"hello, world", True, True)
    assert d.head.headers[b"content-type"] == b"text/event-stream"
    assert d.head.raw_headers[0] == (b"Content-Type", b"text/event-stream")  # names as sent


def test_chunked_bare_lf_and_uppercase_hex():
    raw = b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\nA\n0123456789\nb ; ext=\"q\"\n0123456789a\n0\n\n"
    d, body = decode_every_way(raw)
    assert (body, d.done, d.keep_alive) == (b"01234567890123456789a", True, True)


def test_trailers():
    raw = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0;last\r\n"
           b"X-Checksum: 1\r\nX-Other:  two words \r\n\r\n")
    d, body = decode_every_way(raw)
    assert (body, d.done, d.trailers) == (b"abc", True, [(b"X-Checksum", b"1"), (b"X-Other", b"two words")])


def test_content_length_and_interim_responses():
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
           b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope")
    d, body = decode_every_way(raw)
    assert (d.head.status, d.head.headers, body, d.done, d.keep_alive) == (
        401, {b"content-length": b"4"}, b"nope", True, True)


def test_no_body_for_head_204_304():
    d, body = decode_every_way(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n", method=b"HEAD")
    assert (body, d.done, d.keep_alive) == (b"", True, True)
    for status in (b"204 No Content", b"304 Not Modified"):
        d, body = decode_every_way(b"HTTP/1.1 " + status + b"\r\ncontent-length: 7\r\n\r\n")
        assert (body, d.done, d.keep_alive) == (b"", True, True)


def test_zero_content_length_and_no_reason():
    d, body = decode_every_way(b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n")
    assert (d.head.status, d.head.reason, body, d.done) == (200, b"", b"", True)


def test_body_until_close_is_not_reusable():
    d, body = decode_every_way(b"HTTP/1.1 200 OK\r\n\r\nabc\r\n0\r\n", eof=True)
    assert (body, d.done, d.keep_alive, d.head.keep_alive) == (b"abc\r\n0\r\n", True, False, False)


@pytest.mark.parametrize("raw, keep", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 1\r\n\r\nx", False),
    (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\ncontent-length: 1\r\n\r\nx", False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nx", False),
    (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nx", True),
    (b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nx", True),
])
def test_keep_alive_decision(raw, keep):
    d, body = decode_every_way(raw)
    assert (body, d.done, d.keep_alive) == (b"x", True, keep)


def test_keep_alive_only_once_the_body_ended():
    d = ResponseDecoder()
    d.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab")
    assert d.head.keep_alive and not d.keep_alive
    d.feed(b"c")
    assert d.keep_alive


def test_obs_fold_and_repeated_fields():
    raw = b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nx-b: 1\r\nX-B: 2\r\ncontent-length: 0\r\n\r\n"
    d, _ = decode_every_way(raw)
    assert d.head.headers[b"x-a"] == b"one two" and d.head.headers[b"x-b"] == b"1, 2"
    assert d.head.raw_headers[1:3] == ((b"x-b", b"1"), (b"X-B", b"2"))


def test_duplicate_equal_content_length_is_fine():
    for raw in (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok"):
        d, body = decode_every_way(raw)
        assert (body, d.done) == (b"ok", True)


BAD = {
    "not http": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "http/2 status line": b"HTTP/2.0 200 OK\r\n\r\n",
    "short status code": b"HTTP/1.1 20 OK\r\n\r\n",
    "letters in status": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "101 unasked": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nname : v\r\ncontent-length: 0\r\n\r\n",
    "control char in value": b"HTTP/1.1 200 OK\r\nx: a\x00b\r\ncontent-length: 0\r\n\r\n",
    "fold without field": b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
    "cl and te": b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
    "te not chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
    "negative length": b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
    "signed length": b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\nx",
    "non-digit length": b"HTTP/1.1 200 OK\r\ncontent-length: 1e3\r\n\r\n",
    "empty length": b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
    "conflicting lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
    "conflicting list": b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nabc",
    "bad chunk size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    "hex prefix chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x5\r\nhello\r\n",
    "signed chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-5\r\nhello\r\n",
    "underscore chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1_0\r\n",
    "empty chunk size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\r\n",
    "huge chunk size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"f" * 17 + b"\r\n",
    "chunk longer than size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    "bad trailer": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nnot a field\r\n\r\n",
    "bytes after the end": b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nxy",
    "bytes after 204": b"HTTP/1.1 204 No Content\r\n\r\nx",
}


@pytest.mark.parametrize("name", BAD)
def test_malformed_input_is_an_error_however_it_is_cut(name):
    for pieces in feeds(BAD[name]):
        with pytest.raises(ProtocolError):
            decode(pieces)


def test_close_before_the_end_is_an_error():
    for raw in (CHUNKED[:-3], b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc", b"HTTP/1.1 200 OK\r\n", b""):
        d = ResponseDecoder()
        d.feed(raw)
        with pytest.raises(ProtocolError):
            d.close()


def test_head_size_bound():
    line = b"x-pad: " + b"a" * 1000 + b"\r\n"
    big = b"HTTP/1.1 200 OK\r\n" + line * (MAX_HEAD // len(line) + 1)
    with pytest.raises(ProtocolError):
        ResponseDecoder().feed(big)  # no blank line yet, already too big
    with pytest.raises(ProtocolError):
        ResponseDecoder().feed(big + b"\r\n")
    d = ResponseDecoder()
    with pytest.raises(ProtocolError):  # byte by byte: the bound holds without the whole head
        for i in range(len(big)):
            d.feed(big[i:i + 1])
    assert len(d._buf) <= MAX_HEAD + 1


def test_header_count_bound():
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(MAX_HEADERS))
    d, _ = decode([head + b"\r\n"])
    assert len(d.head.raw_headers) == MAX_HEADERS
    with pytest.raises(ProtocolError):
        decode([head + b"x-one-more: 1\r\n\r\n"])


def test_chunk_line_bound():
    raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;" + b"e" * 5000
    with pytest.raises(ProtocolError):
        decode([raw])


def test_body_pieces_are_the_input_when_possible():
    d = ResponseDecoder()
    d.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    data = b"0123456789"
    assert d.feed(data)[0] is data  # no copy on the Content-Length path


def test_encode_request_and_head():
    raw = encode_request(b"POST", b"h:1", b"/v1/chat/completions", [(b"a", b"b")], b"{}")
    assert raw == b"POST /v1/chat/completions HTTP/1.1\r\nhost: h:1\r\na: b\r\ncontent-length: 2\r\n\r\n{}"
    assert encode_head(b"GET", b"/?q=1", [(b"Host", b"x")]) == b"GET /?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert encode_chunk(b"abc") + encode_chunk(b"") == b"3\r\nabc\r\n0\r\n\r\n"


@pytest.mark.parametrize("method, target, headers", [
    (b"GET", b"/", [(b"x", b"a\r\nInjected: 1")]),
    (b"GET", b"/", [(b"bad name", b"v")]),
    (b"GET", b"/a b", []),
    (b"G\r\nET", b"/", []),
    (b"GET", b"", []),
])
def test_encode_rejects_injection(method, target, headers):
    with pytest.raises(ProtocolError):
        encode_head(method, target, headers)


def test_encoded_request_chunks_decode_back():
    body = encode_chunk(b"hello") + encode_chunk(b", world") + encode_chunk(b"")
    d, out = decode_every_way(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body)
    assert (out, d.done) == (b"hello, world", True)
