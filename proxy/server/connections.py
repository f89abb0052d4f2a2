"""Connection rules hypercorn 0.18 (trio worker) lacks: slow request heads and bodies are cut, open
connections are bounded, HTTP's "close after this response" is kept, and a drain still answers on
connections that are already open.

Rules (each a contained patch of one hypercorn method, active only for a server whose hypercorn
config carries a `ConnectionRules`, i.e. one started by `proxy/server/serve.py`; any other
hypercorn server in the process keeps stock behaviour):
- Request head deadline: a new connection must deliver its first request head within
  `header_timeout`; on a keep-alive connection the clock starts with the first byte of the next
  request (an idle keep-alive connection is hypercorn's `keep_alive_timeout`, 75 s). Too slow: 408
  and close. hypercorn's own `read_timeout` cannot do this: it would also cut SSE clients, which
  send nothing after their request.
- Request body deadline: a body may take `body_timeout` plus one second per `min_body_rate` bytes
  received so far; a slower one is cut (the app sees a disconnect). The longest a body can hold a
  connection is `body_timeout + max_body_bytes / min_body_rate` (10 + 640 s with the defaults).
  Both deadlines cost nothing once the request is complete: a streaming response's connection
  reads without a cancel scope (stock hypercorn opens a `fail_after(inf)` per read).
- At most `max_connections` open connections per process: one more is answered at once with a
  503 and closed (never left to fail in accept() with EMFILE). serve.py lowers the bound to what
  the open-file limit allows.
- `Connection: close` after the last byte: hypercorn closes such a connection from the task that
  sent the last body, and a relay cancels that task as soon as it is done (proxy/server/pump.py),
  which cancelled the close: the socket stayed open. The close is shielded now (bounded by
  CLOSE_GRACE; trio closes the socket even when that runs out).
- A request with both Content-Length and Transfer-Encoding is answered (framed by
  Transfer-Encoding, as h11 does) with `Connection: close`, and the connection is closed after it
  (RFC 9112 section 6.3: a request-smuggling defence).
- A connection whose client closed, or that was cut, is closed at once (stock hypercorn kept it
  until its keep-alive timer rang, 75 s later).
- Drain: stock hypercorn closes idle keep-alive connections the moment shutdown begins, so a
  request sent on one then got no answer. Here they stay open until the drain is over
  (`ConnectionRules.drained`); a request on one is answered (`/healthz` says 503 draining) with
  `Connection: close`.
`TCPServer.run` itself is hypercorn 0.18's, inline in the patch that counts the connection (one
coroutine frame per connection instead of two: ~0.3 KB of every held stream).
HTTP/2 connections get the connection bound and the drain rule only (hypercorn's h2 protocol has
its own flow control; per-stream head/body deadlines are not implemented for it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from math import inf

import h11
import orjson
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import tcp_server as _ts
from hypercorn.trio.task_group import TaskGroup
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr

from proxy.transport import sockets

log = logging.getLogger("proxy.server.connections")

RULES_ATTR = "gateway_connection_rules"  # the attribute of hypercorn's Config that carries the rules
CLOSE_GRACE = 1.0    # seconds a connection's close (EOF, TLS close_notify) may take
REFUSE_GRACE = 0.5   # seconds a refused connection is kept to read the request, so closing it
#                      does not reset the connection before the client read the 503 ...
REFUSE_LINGERING = 32  # ... for at most this many at a time (each holds a file descriptor)
LOG_INTERVAL = 10.0  # at most one summary line of cut / refused connections per this many seconds

_REFUSAL_BODY = orjson.dumps({"error": {
    "message": "the gateway has too many open connections; retry shortly",
    "type": "api_error", "param": None, "code": "too_many_connections"}})
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
           % (len(_REFUSAL_BODY), _REFUSAL_BODY))

_original_run = _ts.TCPServer.run
_original_read_data = _ts.TCPServer._read_data
_original_idle_timeout = _ts.TCPServer._idle_timeout
_original_close = _ts.TCPServer._close
_original_stream_send = H11Protocol.stream_send
_original_create_stream = H11Protocol._create_stream

_IDLE = h11.IDLE
_SEND_BODY = h11.SEND_BODY
_CLOSE = (b"connection", b"close")


@dataclass(eq=False)
class ConnectionRules:
    """One serving process's connection rules and counters (see the module docstring)."""

    header_timeout: float
    body_timeout: float
    min_body_rate: float
    max_connections: int
    open: int = 0  # connections now open
    lingering: int = 0  # refused connections being read before they are closed
    drained: trio.Event = field(default_factory=trio.Event)  # set: idle keep-alive connections close
    counts: dict[str, int] = field(default_factory=dict)  # since the last summary line
    _logged_at: float = -inf

    def note(self, what: str) -> None:
        """Count a cut or refused connection; log a summary at most every LOG_INTERVAL."""
        self.counts[what] = self.counts.get(what, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            summary = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
            self.counts = {}
            log.warning("connections cut or refused since the last such line: %s (%d open, max %d)",
                        summary, self.open, self.max_connections)


def rules_of(config: object) -> ConnectionRules | None:
    return getattr(config, RULES_ATTR, None)


class AcceptErrorFilter(logging.Filter):
    """trio retries a failed accept() (EMFILE, ENOBUFS, ...) every 0.1 s and logs each with a
    traceback: one line per `interval` here, with the number left out and no traceback."""

    def __init__(self, interval: float = LOG_INTERVAL, clock=time.monotonic):
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._last = -inf
        self._skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        if now - self._last < self._interval:
            self._skipped += 1
            return False
        record.exc_info = None
        record.exc_text = None
        if self._skipped:
            record.msg = f"{record.msg} ({self._skipped} more like it were not logged)"
        self._last = now
        self._skipped = 0
        return True


# -- TCPServer (one per connection) --

async def _run(self: _ts.TCPServer) -> None:
    rules = rules_of(self.config)
    if rules is None:
        return await _original_run(self)
    if rules.open >= rules.max_connections:
        rules.note("refused over max_connections")
        linger = rules.lingering < REFUSE_LINGERING
        rules.lingering += linger
        try:
            await _refuse(self.stream, linger)
        finally:
            rules.lingering -= linger
        return
    rules.open += 1
    try:
        # hypercorn 0.18's TCPServer.run, inline rather than awaited: its frame and this one
        # would both live as long as the connection (~0.3 KB of every held stream).
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return  # handshake failed
            alpn_protocol = stream.selected_alpn_protocol()
            sock = stream.transport_stream.socket
            ssl = True
        else:
            alpn_protocol, sock, ssl = "http/1.1", stream.socket, False
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = ProtocolWrapper(self.app, self.config, self.context, task_group,
                                                ConnectionState(self.state), ssl, client, server,
                                                self.protocol_send, alpn_protocol)
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()
    finally:
        rules.open -= 1


async def _refuse(stream, linger: bool) -> None:
    if type(stream) is trio.SocketStream:  # TLS: no handshake for a refused connection
        with trio.move_on_after(REFUSE_GRACE):
            try:
                await stream.socket.send(REFUSAL)  # ~300 bytes into an empty kernel buffer
                if linger:
                    await stream.send_eof()
                    while await stream.receive_some(4096):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
    await stream.aclose()  # closes even when cancelled


def _h11(self: _ts.TCPServer) -> H11Protocol | None:
    proto = getattr(self.protocol, "protocol", None)  # ProtocolWrapper -> H11Protocol / H2Protocol
    if type(proto) is H11Protocol and type(proto.connection) is h11.Connection:
        return proto
    return None  # HTTP/2, or a websocket


async def _read_data(self: _ts.TCPServer) -> None:
    rules = rules_of(self.config)
    if rules is None or self.config.read_timeout:
        return await _original_read_data(self)
    stream = self.stream
    size = _ts.MAX_RECV
    # Per-request clocks, keyed by the connection's request count so that a request which came
    # in one read (and was answered before the next read) does not leave a stale clock behind.
    head_began: float | None = trio.current_time()  # a new connection: its first head is due
    head_of = 0
    body_began = 0.0
    body_of = -1
    body_bytes = 0
    while True:
        deadline = inf
        proto = _h11(self)
        state = None
        if proto is not None:
            state = proto.connection.their_state
            served = proto.keep_alive_requests
            if state is _IDLE:
                if head_began is not None and head_of != served:
                    head_began = None
                if head_began is None and proto.connection.trailing_data[0]:
                    head_began, head_of = trio.current_time(), served  # a next request has begun
                if head_began is not None:
                    deadline = head_began + rules.header_timeout
            elif state is _SEND_BODY:
                if body_of != served:
                    body_began, body_of, body_bytes = trio.current_time(), served, 0
                deadline = body_began + rules.body_timeout + body_bytes / rules.min_body_rate
        try:
            # Plain TCP reads the socket in one frame (sockets.receive_some: what every held
            # stream waits in).
            if deadline == inf:
                data = await sockets.receive_some(stream, size)
            else:
                with trio.CancelScope(deadline=deadline) as scope:
                    data = await sockets.receive_some(stream, size)
                if scope.cancelled_caught:
                    await _too_slow(rules, proto, state)
                    break
                del scope  # not kept while a streaming response's read waits
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError, OSError):
            break  # OSError: a reset, from the socket itself (SocketStream made it BrokenResourceError)
        if state is _SEND_BODY:
            body_bytes += len(data)
        if data == b"":
            await self.protocol.handle(RawData(b""))
            break
        # Not kept while the next read waits: on a streaming response that wait is the whole
        # response, and the last read was the request (its head and body, ~0.4 KB a held stream).
        event, data = RawData(bytes(data)), None
        await self.protocol.handle(event)
        del event
    await self.protocol.handle(Closed())
    # Nothing more will be read. Stock hypercorn leaves the keep-alive timer running here, so a
    # connection whose client closed (or that was cut above) stayed open, fd and all, until it
    # rang (75 s).
    await self.idle_task.stop()


async def _too_slow(rules: ConnectionRules, proto: H11Protocol, state: object) -> None:
    if state is _IDLE:
        rules.note("slow request heads (408)")
        if proto.connection.our_state is _IDLE:
            await proto._send_error_response(408)  # hypercorn's own: content-length 0, close
    else:
        rules.note("slow request bodies")


async def _idle_timeout(self: _ts.TCPServer) -> None:
    rules = rules_of(self.config)
    if rules is None:
        return await _original_idle_timeout(self)
    with trio.move_on_after(self.config.keep_alive_timeout):
        await rules.drained.wait()  # stock: context.terminated, i.e. the drain's first moment
    with trio.CancelScope(shield=True):
        await self._initiate_server_close()


async def _close(self: _ts.TCPServer) -> None:
    if rules_of(self.config) is None:
        return await _original_close(self)
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
        await _original_close(self)


# -- H11Protocol (HTTP/1.1 framing of one connection) --

async def _create_stream(self: H11Protocol, request: h11.Request) -> None:
    if rules_of(self.config) is not None:
        names = {name for name, _ in request.headers}  # h11 gives them lower-cased
        self.gateway_close_after = b"content-length" in names and b"transfer-encoding" in names
    await _original_create_stream(self, request)


async def _stream_send(self: H11Protocol, event) -> None:
    if (type(event) is Response and event.status_code >= 200
            and (getattr(self, "gateway_close_after", False)
                 or (self.context.terminated.is_set() and rules_of(self.config) is not None))
            and _CLOSE not in event.headers):
        event = replace(event, headers=[*event.headers, _CLOSE])  # h11 then closes after it
    await _original_stream_send(self, event)


def apply() -> None:
    """Install the patches (idempotent). hypercorn_fast.apply() checks the hypercorn version."""
    _ts.TCPServer.run = _run
    _ts.TCPServer._read_data = _read_data
    _ts.TCPServer._idle_timeout = _idle_timeout
    _ts.TCPServer._close = _close
    H11Protocol._create_stream = _create_stream
    H11Protocol.stream_send = _stream_send


def revert() -> None:
    _ts.TCPServer.run = _original_run
    _ts.TCPServer._read_data = _original_read_data
    _ts.TCPServer._idle_timeout = _original_idle_timeout
    _ts.TCPServer._close = _original_close
    H11Protocol._create_stream = _original_create_stream
    H11Protocol.stream_send = _original_stream_send
