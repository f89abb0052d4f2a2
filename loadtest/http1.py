"""HTTP/1.1 for the load generator, sans-IO: request bytes out, response bytes in -> head + body.

Why not h11 (which the gateway and fake provider use): the load generator must never be the
bottleneck, and h11 costs a pure-Python state-machine step per body chunk. Measured on this machine
(2 cores, Python 3.11, h11 0.16), decoding a chunked SSE body one ~170-byte event per receive:
    h11 receive_data + next_event loop   ~0.08 M chunks/s
    this decoder                          ~0.36 M chunks/s (4.5x)
while the gateway relays up to ~80k events/s: with h11 the client would be the bottleneck.
(`proxy.sse.SSEDecoder` runs ~0.25 M events/s on top; the socket receive costs about as much.)
It only has to read what a well-behaved server sends us, so it is small on purpose:
- Response head: status line + headers, at most `MAX_HEAD` bytes (a ProtocolError beyond).
- Body: Content-Length, chunked (extensions and trailers skipped), or until close.
- 1xx responses are skipped. No pipelining: one request at a time per connection.

Memory: the decoder holds at most one unparsed chunk-size line or head (`MAX_HEAD`) plus the
bytes of the current receive; body bytes are handed out as they arrive, never accumulated.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 64 * 1024


class ProtocolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: dict[bytes, bytes]  # lower-cased names; a repeated header keeps the last value
    keep_alive: bool


def encode_request(method: bytes, host: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, target), b"host: " + host]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseDecoder:
    """feed(bytes) -> list of body pieces; `head` is set once the head is parsed, `done` at the end."""

    __slots__ = ("head", "done", "_state", "_buf", "_left")

    def __init__(self) -> None:
        self.head: Head | None = None
        self.done = False
        self._state = _HEAD
        self._buf = b""
        self._left = 0  # bytes left in the current chunk or Content-Length body

    def feed(self, data: bytes) -> list[bytes]:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _CHUNK_DATA or state == _LENGTH:
                take = min(self._left, end - pos)
                out.append(data[pos:pos + take] if pos or take < end else data)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _CHUNK_END if state == _CHUNK_DATA else _DONE
                    if self._state == _DONE:
                        self.done = True
            elif state == _CHUNK_SIZE or state == _CHUNK_END or state == _TRAILERS:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._keep(data[pos:])
                    break
                line = data[pos:nl].rstrip(b"\r")
                pos = nl + 1
                if state == _CHUNK_END:
                    if line:
                        raise ProtocolError("chunk data longer than its size")
                    self._state = _CHUNK_SIZE
                elif state == _TRAILERS:
                    if not line:
                        self._state = _DONE
                        self.done = True
                else:
                    try:
                        size = int(line.split(b";", 1)[0], 16)
                    except ValueError:
                        raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
                    self._left = size
                    self._state = _CHUNK_DATA if size else _TRAILERS
            elif state == _HEAD:
                pos = self._parse_head(data, pos)
                if pos < 0:
                    break
            elif state == _UNTIL_CLOSE:
                out.append(data[pos:] if pos else data)
                break
            else:
                raise ProtocolError("bytes after the end of the response")
        return out

    def close(self) -> None:
        """The peer closed: fine only where the body is delimited by the close."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self.done = True
        elif not self.done:
            raise ProtocolError("connection closed before the response ended")

    def _keep(self, rest: bytes) -> None:
        if len(rest) > MAX_HEAD:
            raise ProtocolError(f"response head or chunk line larger than {MAX_HEAD} bytes")
        self._buf = rest

    def _parse_head(self, data: bytes, pos: int) -> int:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            self._keep(data[pos:])
            return -1
        lines = data[pos:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0][:60]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise ProtocolError(f"bad status line {lines[0][:60]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        pos = end + 4
        if 100 <= status < 200:  # interim response: the real head follows
            return pos
        connection = headers.get(b"connection", b"").lower()
        keep = parts[0] == b"HTTP/1.1" and b"close" not in connection
        encoding = headers.get(b"transfer-encoding", b"").lower()
        length = headers.get(b"content-length")
        if status in (204, 304):
            self._state, self.done = _DONE, True
        elif b"chunked" in encoding:
            self._state = _CHUNK_SIZE
        elif length is not None:
            try:
                self._left = int(length)
            except ValueError:
                raise ProtocolError(f"bad content-length {length[:40]!r}") from None
            self._state = _LENGTH if self._left else _DONE
            self.done = self._left == 0
        else:
            self._state, keep = _UNTIL_CLOSE, False
        self.head = Head(status, headers, keep)
        return pos
