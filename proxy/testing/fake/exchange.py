"""One request's response on a connection: the `Exchange`, the `RequestRecord` it feeds, and the
writers (JSON bodies, paced streams, faults) for a planned `Chat`.

Rules:
- Raw trio sockets + h11 (sans-IO), not an ASGI server: every byte on the wire is ours. While a
  response could wait (ttft, pacing, hangs, stalls) a watcher task reads the socket, so a client
  close is seen at once and cancels the response (the gateway tests prove they release upstream
  sockets by watching `RequestRecord.closed`). A half-close (SHUT_WR) counts as a close.
- It is the "floor" in benchmarks: per token of the OpenAI plain-text stream, a lookup of
  pre-framed bytes and one `send_all`; tokens already due (itl=0, or catching up after a slow
  reader) share one write. Pacing uses absolute deadlines (no drift).
- `respond` returns only once the whole response is written; a fault raises `Drop` (close now)
  or waits forever (stall), and the peer's close ends it.
- Wire-format shapes come from the format modules (`openai`, `anthropic`, `ollama`), here only
  picked by `Chat.wire`.
"""

from __future__ import annotations

import dataclasses
import http
from dataclasses import dataclass, field
from typing import Any, Sequence

import h11
import orjson
import trio

from proxy.testing.fake import anthropic, ollama, openai
from proxy.testing.fake.settings import Chat

RECV_BYTES = 65536
# Bytes of a pipelined next request the watcher buffers before it stops reading (TCP pushes back).
_MAX_READ_AHEAD = 1024 * 1024
# Tokens that are already due (itl=0, or catching up after a slow reader) share one write.
_BATCH_BYTES = 16 * 1024
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_FORMATS = {"openai": openai, "anthropic": anthropic, "ollama": ollama}
_EMBEDDINGS = {"openai": openai.embeddings_body, "ollama": ollama.embeddings_body}


@dataclass(eq=False)
class RequestRecord:
    """What happened to one chat/completions request; mutated while the response runs."""

    id: int
    path: str
    model: str | None
    stream: bool
    status: int
    authorization: str | None
    body: dict
    headers: dict = field(default_factory=dict)  # request headers, lower-case names
    bytes_sent: int = 0  # body payload bytes (no headers, no chunk framing) whose send_all returned
    tokens_sent: int = 0
    completed: bool = False
    peer_closed_early: bool = False
    started_at: float = 0.0
    ended_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "closed"}


class Drop(Exception):
    """Unwinds a response whose fault is to close the connection abruptly."""


class Exchange:
    """One request/response on a connection: the socket, h11 state and the record it feeds."""

    __slots__ = ("stream", "conn", "is_head", "record", "peer_gone", "dropped", "wire", "chat")

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, is_head: bool) -> None:
        self.stream, self.conn, self.is_head = stream, conn, is_head
        self.wire = "openai"
        self.record: RequestRecord | None = None
        self.chat: Chat | None = None  # the planned request being answered, once there is one
        self.peer_gone = False  # the client closed (EOF, reset or a failed write)
        self.dropped = False  # we closed abruptly on purpose (drop_after)

    async def write(self, data: bytes, body_bytes: int) -> None:
        await self.stream.send_all(data)
        if self.record is not None:
            self.record.bytes_sent += body_bytes


def error_body(wire: str, status: int, message: str | None = None, echo: str | None = None) -> dict[str, Any]:
    """An error body in `wire`'s shape (OpenAI's for the routes of no format)."""
    return _FORMATS[wire].error_body(status, message or f"fake provider error {status}", echo)


def response(conn: h11.Connection, status: int, headers: Sequence[tuple[bytes, bytes]],
             echo: str | None = None) -> bytes:
    reason = _REASONS.get(status, b"")
    if echo:  # echo_key: the key in the status line and in headers a client might show
        reason = echo.encode("latin-1")
        headers = [*headers, (b"x-echo-key", reason), (b"www-authenticate", b"Bearer " + reason)]
    return conn.send(h11.Response(status_code=status, headers=headers, reason=reason))


def _echo(ex: Exchange) -> str | None:
    return ex.chat.echo if ex.chat is not None else None


async def send_json(ex: Exchange, status: int, obj: Any,
                    headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = orjson.dumps(obj)
    head = response(ex.conn, status, [(b"content-type", b"application/json"),
                                      (b"content-length", b"%d" % len(body)), *headers], _echo(ex))
    if ex.is_head:  # h11 rightly refuses a body on a HEAD response
        await ex.write(head + ex.conn.send(h11.EndOfMessage()), 0)
        return
    await ex.write(head + ex.conn.send(h11.Data(data=body)) + ex.conn.send(h11.EndOfMessage()),
                   len(body))


async def respond(ex: Exchange, chat: Chat | str) -> None:
    """Answer `chat` (or with a 400 of that message) while a second task reads the socket: EOF or
    reset cancels the response. Sets `ex.peer_gone` / `ex.dropped`; never raises for either."""
    if not isinstance(chat, str):
        ex.chat = chat
    if _immediate(chat):  # nothing to wait for: a watcher would only cost (~20% of a request)
        await _respond_once(ex, chat)
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_peer, ex, nursery.cancel_scope)
        try:
            await _respond_once(ex, chat)
        finally:
            nursery.cancel_scope.cancel()


def _immediate(chat: Chat | str) -> bool:
    """Whether the whole response is written at once, with no wait the peer could interrupt."""
    if isinstance(chat, str):
        return True
    s = chat.settings
    if s.hang_before_headers:
        return False
    return s.status != 200 or not (chat.stream or s.ttft or chat.fault)


async def _respond_once(ex: Exchange, chat: Chat | str) -> None:
    try:
        await _respond(ex, chat)
    except trio.BrokenResourceError:  # a failed write: the peer is gone
        ex.peer_gone = True
    except Drop:
        ex.dropped = True


async def _watch_peer(ex: Exchange, scope: trio.CancelScope) -> None:
    read = 0
    try:
        while data := await ex.stream.receive_some(RECV_BYTES):
            ex.conn.receive_data(data)  # a pipelined next request: h11 keeps it for later
            read += len(data)
            if read > _MAX_READ_AHEAD:
                await trio.sleep_forever()
    except trio.BrokenResourceError:
        pass
    ex.peer_gone = True
    scope.cancel()


async def _respond(ex: Exchange, chat: Chat | str) -> None:
    """Returns only once the whole response is written; faults raise or wait forever."""
    if isinstance(chat, str):
        await send_json(ex, 400, error_body(ex.wire, 400, chat))
    elif chat.settings.hang_before_headers:
        await trio.sleep_forever()  # the watcher ends this when the peer closes
    elif chat.settings.status != 200:
        s, headers = chat.settings, []
        if s.retry_after is not None:
            value = int(s.retry_after) if float(s.retry_after).is_integer() else s.retry_after
            headers.append((b"retry-after", str(value).encode()))
        elif chat.echo:
            headers.append((b"retry-after", chat.echo.encode("latin-1")))
        await send_json(ex, s.status, error_body(chat.wire, s.status, chat.error_message, chat.echo), headers)
    elif chat.embed_inputs:
        await send_json(ex, 200, _EMBEDDINGS[chat.wire](chat))
    elif chat.stream and (chat.wire != "openai" or chat.tool_calls or chat.settings.error_after is not None):
        await _stream_script(ex, chat)
    elif chat.stream:
        await _stream(ex, chat)
    else:
        await _complete(ex, chat)
    ex.record.completed = True


async def _fault(kind: str) -> None:
    if kind == "drop":
        raise Drop
    await trio.sleep_forever()  # stall: the watcher ends this when the peer closes


async def _complete(ex: Exchange, chat: Chat) -> None:
    s, record = chat.settings, ex.record
    if s.ttft:
        await trio.sleep(s.ttft)
    body = orjson.dumps(_FORMATS[chat.wire].completion_body(chat, record.id))
    head = response(ex.conn, 200, [(b"content-type", b"application/json"),
                                   (b"content-length", b"%d" % len(body))], chat.echo)
    if chat.fault:  # a JSON body is all-or-nothing: the fault takes the body's place
        await ex.write(head, 0)
        await _fault(chat.fault[1])
    await ex.write(head + ex.conn.send(h11.Data(data=body)) + ex.conn.send(h11.EndOfMessage()),
                   len(body))
    record.tokens_sent = chat.tokens


async def _stream(ex: Exchange, chat: Chat) -> None:
    """The OpenAI plain-text stream: the benchmark floor, so it is built for speed."""
    s, record, conn = chat.settings, ex.record, ex.conn
    prefix = openai.stream_prefix(chat, record.id)
    role = openai.role_event(prefix)
    # Role chunk goes with the headers, before ttft, as OpenAI does.
    head = response(conn, 200, _SSE_HEADERS, chat.echo)
    role_frame = conn.send(h11.Data(data=role))
    await ex.write(head + role_frame, len(role))

    # h11 chose the framing (chunked for HTTP/1.1, raw for HTTP/1.0) and its writer for it is
    # stateless, so token events are framed here the same way, once per distinct token: the
    # loop below only sends bytes. (Ten h11 sends per request cost more than the request.)
    chunked = role_frame != role
    payloads = openai.token_events(chat, prefix)
    frames = [b"%x\r\n%s\r\n" % (len(p), p) if chunked else p for p in payloads]
    sizes = [len(p) for p in payloads]
    kinds = len(frames)

    stop = chat.fault[0] if chat.fault else chat.tokens
    first = trio.current_time() + s.ttft
    sent = 0
    while sent < stop:
        due = first + sent * s.itl  # deadlines, not sleeps: no drift over long streams
        if due > trio.current_time():
            await trio.sleep_until(due)
        if s.itl:
            ready = min(stop, max(sent + 1, int((trio.current_time() - first) / s.itl) + 1))
        else:
            ready = stop
        batch, payload, end = [], 0, sent
        while end < ready and payload < _BATCH_BYTES:
            batch.append(frames[end % kinds])
            payload += sizes[end % kinds]
            end += 1
        await ex.write(batch[0] if len(batch) == 1 else b"".join(batch), payload)
        sent = record.tokens_sent = end

    if chat.fault:
        await _fault(chat.fault[1])
    tail = openai.stream_tail(chat, prefix)
    await ex.write(conn.send(h11.Data(data=tail)) + conn.send(h11.EndOfMessage()), len(tail))


async def _stream_script(ex: Exchange, chat: Chat) -> None:
    """Anthropic and Ollama streams, and OpenAI ones with tool calls or an error event.

    Simpler than `_stream` (one write per event): these paths serve tests, not benchmarks.
    """
    s, record, conn, wire = chat.settings, ex.record, ex.conn, _FORMATS[chat.wire]
    events = wire.stream_script(chat, record.id)
    await ex.write(response(conn, 200, [(b"content-type", wire.STREAM_CONTENT_TYPE),
                                        (b"cache-control", b"no-cache")], chat.echo), 0)
    first = trio.current_time() + s.ttft
    sent = 0
    for payload, is_token in events:
        if is_token:
            if chat.fault and sent >= chat.fault[0]:
                await _fault(chat.fault[1])
            if s.error_after is not None and sent >= s.error_after:
                payload = wire.error_event(s.error_event_status, chat.echo)
                await ex.write(conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()),
                               len(payload))
                return
            due = first + sent * s.itl
            if due > trio.current_time():
                await trio.sleep_until(due)
            sent = record.tokens_sent = sent + 1
        await ex.write(conn.send(h11.Data(data=payload)), len(payload))
    await ex.write(conn.send(h11.EndOfMessage()), 0)
