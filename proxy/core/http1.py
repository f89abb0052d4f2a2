"""HTTP/1.1, client side, sans-IO: request bytes out; response bytes in -> head, body pieces, end.

No I/O and no trio/httpx here (h11-style): `proxy/transport/pool.py` and the load generator
(`loadtest/client.py`) do the sockets. One request at a time per connection (no pipelining).

Rules:
- Head: status line `HTTP/1.0|1.1 NNN reason` and header fields, at most `MAX_HEAD` bytes and
  `MAX_HEADERS` fields (trailers have the same bounds). Lines end in CRLF or a bare LF (RFC 9112
  §2.2); obs-fold continuation lines are joined with a space (§5.2). 1xx interim responses are
  skipped; 101 is an error (we never ask to switch protocols).
- Body: none for a HEAD request, 204 or 304. Else `Transfer-Encoding: chunked` (extensions
  ignored, trailers parsed into `trailers`), else `Content-Length`, else until the peer closes.
- Keep-alive only if: HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `Connection:
  keep-alive`; and the body is not close-delimited; and the response was read to its end.
- Strict, one exception class (`ProtocolError`): bad status line or header line, Content-Length
  together with Transfer-Encoding, a transfer coding other than `chunked`, a Content-Length that is
  not digits or disagrees with another one, a bad chunk-size line or chunk end, bytes after the
  end, and a close before the end (`close()`).

Memory: the decoder holds at most one unparsed head or trailer section (`MAX_HEAD`) or chunk-size
line (`MAX_CHUNK_LINE`); body bytes are handed out as they arrive (slices of the input, usually
the input itself), never accumulated.

Speed (the per-token path of the relay and of the load generator): a chunked SSE body, one
170-byte event (a 176-byte chunk) per `feed`, 200k feeds, best of 7 interleaved rounds, measured
2 cores / Python 3.11.7 / h11 0.16.0, two runs:
    h11 (receive_data, then next_event until NEED_DATA)       5.7-6.0 µs/chunk
    the previous loadtest/http1.py decoder (now this one)     0.95-0.96 µs/chunk
    this decoder                                              0.64-0.66 µs/chunk
Why it is cheap: a whole chunk in one feed takes one `find`, one `translate` (hex check), one
`int`, one slice compare and one slice; regexes run only on heads, trailers and extensions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # bytes of a head (or trailer section), blank line included
MAX_HEADERS = 100  # header fields in a head (or trailer section)
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions


class ProtocolError(Exception):
    """The peer broke HTTP/1.1 framing; the connection cannot be used any more."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: dict[bytes, bytes]  # lower-cased names; repeated fields joined with b", "
    keep_alive: bool  # as announced; the connection is reusable only once the body ended too
    reason: bytes = b""
    http_version: bytes = b"1.1"
    raw_headers: tuple[tuple[bytes, bytes], ...] = ()  # names as sent, in order, repeats kept


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_IS_TOKEN = re.compile(_TOKEN)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_HEX = b"0123456789abcdefABCDEF"

_HEAD, _SIZE, _DATA, _DATA_END, _TRAILERS, _LENGTH, _UNTIL_CLOSE, _DONE = range(8)


def encode_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head; `headers` must include `host` and the body framing. Rejects CR/LF/NUL
    (header injection) and names that are not tokens."""
    if not _IS_TOKEN.fullmatch(method) or not target or any(c in target for c in b" \r\n\0"):
        raise ProtocolError(f"bad request line {method[:20]!r} {target[:60]!r}")
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    for name, value in headers:
        if not _IS_TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise ProtocolError(f"bad request header {name[:40]!r}")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def encode_request(method: bytes, host: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> bytes:
    """A whole request with a `content-length` body (`host` first, then `headers`)."""
    return encode_head(method, target, [(b"host", host), *headers,
                                        (b"content-length", b"%d" % len(body))]) + body


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a `transfer-encoding: chunked` request body; b"" ends the body."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"


class ResponseDecoder:
    """`feed(bytes)` -> list of body pieces. `head` is set once the (final) head is parsed, `done`
    once the body ended; `close()` tells it the peer closed. `keep_alive`: reusable now."""

    __slots__ = ("head", "done", "trailers", "_state", "_buf", "_scan", "_left", "_no_body")

    def __init__(self, method: bytes = b"GET") -> None:
        self.head: Head | None = None
        self.done = False
        self.trailers: list[tuple[bytes, bytes]] = []
        self._state = _HEAD
        self._buf = bytearray()  # an incomplete head, trailer section or chunk-size line
        self._scan = 0  # where the search for the blank line resumes in `_buf`
        self._left = 0  # bytes left in the current chunk or Content-Length body
        self._no_body = method == b"HEAD"

    @property
    def keep_alive(self) -> bool:
        return self.done and self.head is not None and self.head.keep_alive

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self._buf:
            if self._state == _HEAD or self._state == _TRAILERS:
                data = self._section(data)
                if data is None:
                    return out
            else:
                data = bytes(self._buf) + data
                self._buf.clear()
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _SIZE:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._keep_line(data, pos)
                    break
                line = data[pos:nl - 1] if nl > pos and data[nl - 1] == 13 else data[pos:nl]
                pos = nl + 1
                if not line or line.translate(None, _HEX) or len(line) > 16:
                    line = self._chunk_extension(line)
                size = int(line, 16)
                if not size:
                    self._state = _TRAILERS
                    data = self._section(data[pos - 1:])  # from the LF: an empty section is "\n\r\n"
                    if data is None:
                        break
                    pos, end = 0, len(data)
                elif end - pos >= size + 2 and data[pos + size:pos + size + 2] == b"\r\n":
                    out.append(data[pos:pos + size])  # the common case: a whole chunk
                    pos += size + 2
                else:
                    self._left, self._state = size, _DATA
            elif state == _DATA or state == _LENGTH:
                take = min(self._left, end - pos)
                out.append(data[pos:pos + take] if pos or take < end else data)
                pos += take
                self._left -= take
                if not self._left:
                    if state == _DATA:
                        self._state = _DATA_END
                    else:
                        self._state, self.done = _DONE, True
            elif state == _DATA_END:
                if data[pos] == 13:  # CR; LF alone is tolerated
                    if pos + 1 == end:
                        self._buf += b"\r"
                        break
                    pos += 1
                if data[pos] != 10:
                    raise ProtocolError("chunk data longer than its size")
                pos += 1
                self._state = _SIZE
            elif state == _HEAD:
                data = self._section(data[pos:])
                if data is None:
                    break
                pos, end = 0, len(data)
            elif state == _UNTIL_CLOSE:
                out.append(data[pos:] if pos else data)
                break
            else:
                raise ProtocolError("bytes after the end of the response")
        return out

    def close(self) -> None:
        """The peer closed: fine only where the body is delimited by the close."""
        if self._state == _UNTIL_CLOSE:
            self._state, self.done = _DONE, True
        elif not self.done:
            raise ProtocolError("connection closed before the response ended")

    def _keep_line(self, data: bytes, pos: int) -> None:
        if len(data) - pos > MAX_CHUNK_LINE:
            raise ProtocolError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
        self._buf += data[pos:]

    @staticmethod
    def _chunk_extension(line: bytes) -> bytes:
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise ProtocolError(f"bad chunk-size line {line[:40]!r}")
        return match[1]

    def _section(self, data: bytes) -> bytes | None:
        """Collect a head / trailer section up to its blank line; parse it; the bytes after it.
        None: incomplete (kept). The search resumes where it stopped: no quadratic rescans."""
        buf = self._buf
        buf += data
        match = _BLANK_LINE.search(buf, self._scan)
        if match is None:
            if len(buf) > MAX_HEAD:
                raise ProtocolError(f"response head larger than {MAX_HEAD} bytes")
            self._scan = max(0, len(buf) - 2)
            return None
        if match.end() > MAX_HEAD:
            raise ProtocolError(f"response head larger than {MAX_HEAD} bytes")
        block, rest = bytes(buf[:match.start()]), bytes(buf[match.end():])
        buf.clear()
        self._scan = 0
        if self._state == _TRAILERS:
            self.trailers = _fields(block.split(b"\n")[1:])  # [0]: the rest of the "0" line
            self._state, self.done = _DONE, True
        else:
            self._parse_head(block)
        return rest

    def _parse_head(self, block: bytes) -> None:
        lines = block.split(b"\n")
        status_line = lines[0][:-1] if lines[0].endswith(b"\r") else lines[0]
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            raise ProtocolError(f"bad status line {status_line[:60]!r}")
        status = int(match[2])
        raw = _fields(lines[1:])
        if status < 200:
            if status == 101 or status < 100:
                raise ProtocolError(f"unexpected status {status}")
            return  # interim response: the final head follows; stay in _HEAD
        headers: dict[bytes, bytes] = {}
        for name, value in raw:
            name = name.lower()
            headers[name] = headers[name] + b", " + value if name in headers else value
        version = b"1." + match[1]
        tokens = _tokens(headers.get(b"connection", b""))
        keep = b"close" not in tokens if version == b"1.1" else b"keep-alive" in tokens
        coding, length = headers.get(b"transfer-encoding"), headers.get(b"content-length")
        if coding is not None and length is not None:
            raise ProtocolError("both content-length and transfer-encoding")
        if coding is not None and _tokens(coding) != [b"chunked"]:
            raise ProtocolError(f"unsupported transfer-encoding {coding[:40]!r}")
        if length is not None:
            values = {v.strip() for v in length.split(b",")}
            if len(values) != 1:
                raise ProtocolError(f"conflicting content-length {length[:40]!r}")
            length = values.pop()
            if not length.isdigit() or len(length) > 18:
                raise ProtocolError(f"bad content-length {length[:40]!r}")
        if self._no_body or status in (204, 304):
            self._state, self.done = _DONE, True
        elif coding is not None:
            self._state = _SIZE
        elif length is not None:
            self._left = int(length)
            self._state = _LENGTH if self._left else _DONE
            self.done = not self._left
        else:
            self._state, keep = _UNTIL_CLOSE, False
        self.head = Head(status, headers, keep, match[3] or b"", version, tuple(raw))


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    joined: list[bytes] = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t") and joined:  # obs-fold: part of the previous field's value
            joined[-1] += b" " + line.strip(b" \t")
        else:
            joined.append(line)
    if len(joined) > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} header fields")
    fields = []
    for line in joined:
        match = _FIELD.fullmatch(line)
        if match is None:
            raise ProtocolError(f"bad header line {line[:60]!r}")
        fields.append((match[1], match[2]))
    return fields


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]
