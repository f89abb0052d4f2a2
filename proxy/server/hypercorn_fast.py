"""A contained fast path for hypercorn's HTTP/1.1 response-body writes (trio worker).

Why: on hypercorn 0.18 every ASGI `http.response.body` send walks
    HTTPStream.app_send -> Body() -> H11Protocol.stream_send -> _send_h11_event -> h11.Data()
    -> h11.Connection.send (state machine + ChunkedWriter + join) -> RawData()
    -> TCPServer.protocol_send: `async with trio.Lock` (one extra scheduler round trip)
       + a new shielded trio.CancelScope + SocketStream.send_all (two contextlib context managers,
       memoryview, _try_sync) -> socket.send
which profiled at ~40 us of CPU per event over a raw trio `send_all` of the same bytes.

What this patch changes (two methods):

1. `HTTPStream.app_send`: a non-final `http.response.body` message (more_body=True) on an HTTP/1.1
   stream whose h11 connection is in SEND_BODY with chunked framing is framed here as
   `b"%x\\r\\n" + body + b"\\r\\n"` -- byte-identical to h11's ChunkedWriter -- and handed to
   the transport as the same RawData event. Skipping h11 is state-neutral: in h11 0.16 a Data
   event in SEND_BODY is a self-transition (no state, keep-alive or writer change), and
   ChunkedWriter keeps no state. Every other message (start, final body, empty body,
   Content-Length / HTTP/1.0 framing, HEAD/204/304, any state other than SEND_BODY including
   ERROR, websockets, h2) takes the stock path, so h11 still validates all of them.

2. `TCPServer.protocol_send` for RawData on a plain (non-TLS) trio.SocketStream:
   - the cancellation check the stock Lock.acquire made (`checkpoint_if_cancelled`) is kept;
   - the lock is taken with `acquire_nowait()`; if it is held (another writer, e.g. a 100-continue
     or error response from the reader task) the stock method runs instead;
   - the bytes go to the kernel with one public `trio.socket` send, which raises Cancelled only
     before any byte is sent and yields once, like trio's own send; when the kernel took less
     (the client is slow: kernel buffer full) the rest goes through the stock code:
     `with CancelScope(shield=True): await stream.send_all(rest)`.
   So: `await send()` still returns only once every byte is in the kernel (backpressure), a
   started write is still not cancellable (same as the stock shield), and a broken/closed socket
   still becomes `protocol.handle(Closed())` (-> http.disconnect to the app, later sends succeed
   silently), like the stock `except (BrokenResourceError, ClosedResourceError)`.

3. `TCPServer.__init__`: the connection's two locks (its send lock, its idle timer's) are
   `LeanLock`s (proxy/server/lean_sync.py): trio.Lock's semantics, no parking lot until a task
   has to wait (~0.4 KB of every held stream), no breaker bookkeeping per uncontended
   acquire/release (the send path above takes the send lock once per event).

4. `WorkerContext.event_class` (the trio worker's): `LeanEvent`, hypercorn's EventWrapper without
   a trio.Event until a task waits: H11Protocol's `can_read` per connection, an h2 stream
   buffer's two events per HTTP/2 stream (~0.35 KB each).

The read side (`TCPServer._read_data`, with its request head and body deadlines and no
`fail_after(inf)` per read) is `proxy/server/connections.py`.

apply() refuses any hypercorn other than 0.18.x and checks the trio/h11 internals it relies on
(h11's `Connection._writer` and `h11._writers.ChunkedWriter`: the one private piece, a type
check that the response is chunked; h11 is pinned below 0.17 in pyproject.toml), so an upgrade fails loudly at start instead of silently misbehaving.
"""

from __future__ import annotations

from importlib.metadata import version

import h11
import trio
from h11._writers import ChunkedWriter
from hypercorn.events import Closed, RawData
from hypercorn.protocol import http_stream as _hs
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import tcp_server as _ts
from hypercorn.trio import worker_context as _wc
from hypercorn.trio.worker_context import TrioSingleTask
from hypercorn.utils import suppress_body

from proxy.server import hypercorn_version
from proxy.server.lean_sync import LeanEvent, LeanLock

SUPPORTED = ("0.18.",)

_original_app_send = _hs.HTTPStream.app_send
_original_protocol_send = _ts.TCPServer.protocol_send
_original_init = _ts.TCPServer.__init__
_original_event_class = _wc.WorkerContext.event_class

_RESPONSE = _hs.ASGIHTTPState.RESPONSE
_SEND_BODY = h11.SEND_BODY
_SocketStream = trio.SocketStream
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled

_applied = False


async def _app_send(self: _hs.HTTPStream, message) -> None:
    if (
        message is not None
        and self.state is _RESPONSE
        and message["type"] == "http.response.body"
        and message.get("more_body", False)
    ):
        proto = getattr(self.send, "__self__", None)
        if type(proto) is H11Protocol:
            conn = proto.connection
            if (
                type(conn) is h11.Connection
                and conn.our_state is _SEND_BODY
                and type(conn._writer) is ChunkedWriter
                and not suppress_body(self.scope["method"], int(self.response["status"]))
            ):
                body = message.get("body", b"")
                if type(body) is not bytes:
                    body = bytes(body)  # stock does bytes(...) too (TypeError for str alike)
                if body:  # stock sends nothing for an empty non-final body
                    await proto.send(RawData(data=b"%x\r\n%s\r\n" % (len(body), body)))
                return
    await _original_app_send(self, message)


@trio.lowlevel.enable_ki_protection
async def _protocol_send(self: _ts.TCPServer, event) -> None:
    stream = self.stream
    if type(event) is not RawData or type(stream) is not _SocketStream:
        return await _original_protocol_send(self, event)
    lock = self.send_lock
    await _checkpoint_if_cancelled()  # what the stock `async with send_lock` checked first
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        return await _original_protocol_send(self, event)  # contended: stock path, parks on lock
    try:
        data = event.data
        # One trio socket send: it raises Cancelled only before any byte went out, never after
        # (trio's _nonblocking_helper), so no shield is needed for it; a partial send (the
        # client is slow) finishes under the stock shield.
        sent = await stream.socket.send(data)
        if sent < len(data):
            with trio.CancelScope(shield=True):
                await stream.send_all(memoryview(data)[sent:])
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        await self.protocol.handle(Closed())  # as stock: the app then sees http.disconnect
    finally:
        lock.release()


def _init(self: _ts.TCPServer, *args, **kwargs) -> None:
    _original_init(self, *args, **kwargs)
    self.send_lock = LeanLock()
    self.idle_task._lock = LeanLock()


def _check_internals() -> None:
    if not hasattr(h11.Connection(h11.SERVER), "_writer"):
        raise RuntimeError("h11.Connection._writer missing")
    if _ts.MAX_RECV != 2**16:
        raise RuntimeError("hypercorn TCPServer changed")
    if type(getattr(TrioSingleTask(), "_lock", None)) is not trio.Lock:
        raise RuntimeError("hypercorn TrioSingleTask._lock missing")
    if _original_event_class is not _wc.EventWrapper:
        raise RuntimeError("hypercorn trio WorkerContext.event_class changed")


def apply(body: bool = True, write: bool = True, locks: bool = True) -> None:
    """body: fast chunk framing in HTTPStream.app_send; write: fast TCPServer.protocol_send;
    locks: lean locks and events per connection and stream. All on by default (the parts are
    for measurement)."""
    global _applied
    hypercorn_version.require(SUPPORTED, "hypercorn_fast", "protocol/http_stream.py app_send, "
                              "protocol/h11.py and trio/tcp_server.py protocol_send")
    if not version("h11").startswith(("0.14.", "0.15.", "0.16.")):
        raise RuntimeError(f"hypercorn_fast checked against h11 0.14-0.16, found {version('h11')}")
    _check_internals()
    if body:
        _hs.HTTPStream.app_send = _app_send
    if write:
        _ts.TCPServer.protocol_send = _protocol_send
    if locks:
        _ts.TCPServer.__init__ = _init
        _wc.WorkerContext.event_class = LeanEvent
    _applied = True


def revert() -> None:
    global _applied
    _hs.HTTPStream.app_send = _original_app_send
    _ts.TCPServer.protocol_send = _original_protocol_send
    _ts.TCPServer.__init__ = _original_init
    _wc.WorkerContext.event_class = _original_event_class
    _applied = False


def is_applied() -> bool:
    return _applied
