"""Server-Sent Events, sans-IO: bytes in -> events out, events in -> bytes out.

No I/O and no trio/httpx import here (h11-style), so every byte split can be tested directly.

Decoding follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; a blank line
dispatches the event; `:` starts a comment; `data` lines join with LF; one leading space after the
colon is dropped. Two deliberate choices:
- A CR at the very end of the buffer is held back until the next byte tells whether it is half of
  a CRLF, so an event split between CR and LF is not dispatched twice.
- `close()` dispatches a last event that lacks its trailing blank line (some servers omit it);
  a truncated JSON payload then fails loudly in the caller's parser instead of vanishing.

Memory: the decoder holds at most `max_event_bytes` of one unfinished event; more is an
`SSEError`, which bounds what one hostile or broken upstream can make us buffer.
"""

from __future__ import annotations

from dataclasses import dataclass


class SSEError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: bytes
    event: str | None = None
    id: str | None = None


class SSEDecoder:
    def __init__(self, max_event_bytes: int = 1024 * 1024):
        self._max = max_event_bytes
        self._buf = bytearray()
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        end = len(self._buf)
        if end and self._buf[-1] == 0x0D:  # maybe the first half of CRLF: decide on the next byte
            end -= 1
        text = bytes(self._buf[:end])
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        rest = lines.pop()  # the unfinished last line
        self._buf = bytearray(rest) + self._buf[end:]
        events = self._lines(lines)
        if len(self._buf) + self._data_size > self._max:
            raise SSEError(f"SSE event larger than {self._max} bytes")
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a final line and a final event without its blank line."""
        tail = bytes(self._buf).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._buf = bytearray()
        lines = tail.split(b"\n") if tail else []
        lines.append(b"")
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[SSEEvent]:
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent(b"\n".join(self._data), self._event, self._id))
                self._data = []
                self._data_size = 0
                self._event = None
                continue
            if line[0] == 0x3A:  # ":" comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
                self._data_size += len(value) + 1
                if self._data_size > self._max:
                    raise SSEError(f"SSE event larger than {self._max} bytes")
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"id" and b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
            # "retry" and unknown fields are ignored, as the spec says
        return events


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """One event; multi-line data becomes several data lines so no LF can end it early."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return head + b"data: " + data + b"\n\n"


def encode_comment(text: str = "") -> bytes:
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


DONE = encode_event(b"[DONE]")
