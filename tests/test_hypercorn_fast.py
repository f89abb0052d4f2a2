"""Semantics the gateway relies on, checked on a real hypercorn (trio worker, port 0), each test run
both stock and with hypercorn_fast applied (parity), unless it is about the patch itself."""

from __future__ import annotations

import socket
import struct
from contextlib import asynccontextmanager
from importlib import metadata

import h11
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from proxy.server import app_queue, h2_flow, hypercorn_fast, hypercorn_version, idle_timer

CHUNK = b"data: " + b"y" * 140 + b"\n\n"


@pytest.fixture(params=["stock", "patched"])
def mode(request):
    if request.param == "patched":
        hypercorn_fast.apply()
    else:
        hypercorn_fast.revert()
    yield request.param
    hypercorn_fast.revert()


def with_lifespan(app):
    async def wrapped(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await app(scope, receive, send)
    return wrapped


@asynccontextmanager
async def running(app):
    app = with_lifespan(app)
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.keep_alive_timeout = 30
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, cfg)
        port = int(binds[0].rsplit(":", 1)[1])
        yield port
        nursery.cancel_scope.cancel()


async def connect(port, rcvbuf=None):
    sock = trio.socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def read_response(stream, buf=b""):
    """Read one response with h11 as the client; returns (response, body, trailing_bytes, eof)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    if buf:
        conn.receive_data(buf)
    raw = bytearray()
    resp, body = None, bytearray()
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            raw += data
            conn.receive_data(data)
            continue
        if isinstance(ev, h11.Response):
            resp = ev
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            return resp, bytes(body), raw


async def read_until(stream, marker, buf=b""):
    buf = bytearray(buf)
    while marker not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError(f"EOF before {marker!r}; got {bytes(buf)[:300]!r}")
        buf += data
    return bytes(buf)


async def read_to_eof(stream):
    out = bytearray()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return bytes(out)
        out += data


def headers_and_body(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.lower(), body


async def sse_app(scope, receive, send):
    if scope["type"] != "http":
        return
    n = int(scope["query_string"] or b"3")
    if scope["path"] == "/cl":  # Content-Length framed, body in several sends
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(n * len(CHUNK)).encode())]})
        for _ in range(n):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if scope["path"] == "/204":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(n):
        body = b"data: %d\n\n" % i
        if i % 3 == 1:
            body = bytearray(body)  # bytes-like bodies are accepted too
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": True})  # empty: no chunk
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_chunked_framing_byte_exact_and_keep_alive(mode):
    async with running(sse_app) as port:
        stream = await connect(port)
        async with stream:
            for n in (3, 5):  # two requests on one keep-alive connection
                await stream.send_all(b"GET /sse?x HTTP/1.1\r\nhost: x\r\n\r\n".replace(b"?x", b"?%d" % n)
                                      .replace(b"/sse?", b"/sse?"))
                raw = await read_until(stream, b"\r\n0\r\n\r\n")
                head, body = headers_and_body(raw)
                assert head.startswith(b"http/1.1 200")
                assert b"transfer-encoding: chunked" in head
                assert b"connection: close" not in head
                expected = b"".join(b"%x\r\n%s\r\n" % (len(b"data: %d\n\n" % i), b"data: %d\n\n" % i)
                                    for i in range(n)) + b"0\r\n\r\n"
                assert body == expected


async def test_fast_path_really_skips_h11_for_chunks(mode, monkeypatch):
    calls = []
    orig = h11.Connection.send

    def spy(self, event):
        calls.append(type(event).__name__)
        return orig(self, event)

    monkeypatch.setattr(h11.Connection, "send", spy)
    async with running(sse_app) as port:
        stream = await connect(port)
        async with stream:
            await stream.send_all(b"GET /sse?4 HTTP/1.1\r\nhost: x\r\n\r\n")
            await read_until(stream, b"\r\n0\r\n\r\n")
    datas = calls.count("Data")
    assert calls.count("Response") == 1 and calls.count("EndOfMessage") == 1
    assert datas == (0 if mode == "patched" else 4)


async def test_connection_close_honoured(mode):
    async with running(sse_app) as port:
        stream = await connect(port)
        async with stream:
            await stream.send_all(b"GET /sse?2 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            raw = await read_to_eof(stream)  # the server must close after the response
        head, body = headers_and_body(raw)
        assert b"connection: close" in head
        assert body.endswith(b"\r\n0\r\n\r\n")
        # HTTP/1.0 client: no chunked framing, body delimited by close
        stream = await connect(port)
        async with stream:
            await stream.send_all(b"GET /sse?2 HTTP/1.0\r\n\r\n")
            raw = await read_to_eof(stream)
        head, body = headers_and_body(raw)
        assert b"transfer-encoding" not in head
        assert body == b"data: 0\n\ndata: 1\n\n"


async def test_head_204_and_content_length_unaffected(mode):
    async with running(sse_app) as port:
        stream = await connect(port)
        async with stream:
            await stream.send_all(b"HEAD /sse?3 HTTP/1.1\r\nhost: x\r\n\r\n")
            raw = await read_until(stream, b"\r\n\r\n")
            assert raw.endswith(b"\r\n\r\n")  # headers only
            # next request on the same connection: any stray body bytes would corrupt this one
            await stream.send_all(b"GET /204 HTTP/1.1\r\nhost: x\r\n\r\n")
            raw = await read_until(stream, b"\r\n\r\n")
            assert raw.lower().startswith(b"http/1.1 204") and raw.endswith(b"\r\n\r\n")
            await stream.send_all(b"GET /cl?4 HTTP/1.1\r\nhost: x\r\n\r\n")
            resp, body, raw = await read_response(stream)
            assert resp.status_code == 200
            assert body == CHUNK * 4
            assert b"transfer-encoding" not in raw.lower()
            assert raw.endswith(CHUNK * 4)  # nothing after the body: no chunk framing


async def test_h11_protocol_errors_still_detected(mode):
    errors = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/overflow":  # more than Content-Length: h11 must refuse
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
            try:
                await send({"type": "http.response.body", "body": b"12345", "more_body": True})
            except h11.LocalProtocolError as exc:
                errors.append(exc)
                raise
        else:  # body after the final body: hypercorn's ASGI state machine must refuse
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            try:
                await send({"type": "http.response.body", "body": b"late", "more_body": True})
            except Exception as exc:
                errors.append(exc)

    async with running(app) as port:
        for path in (b"/overflow", b"/late"):
            stream = await connect(port)
            async with stream:
                await stream.send_all(b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % path)
                with trio.fail_after(5):
                    await read_to_eof(stream)
    assert isinstance(errors[0], h11.LocalProtocolError)
    assert type(errors[1]).__name__ == "UnexpectedMessageError"


async def test_backpressure_bounds_bytes_in_flight(mode):
    """A client that stops reading must block the app's send() after a bounded amount, and every
    byte must arrive intact once it reads again (this also exercises the partial-send fallback)."""
    progress = {"sent": 0, "returned": 0}
    done = trio.Event()
    total_target = 64 * 1024 * 1024
    piece = bytes(range(256)) * 32  # 8 KiB, patterned

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while progress["returned"] < total_target:
            progress["sent"] += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            progress["returned"] += len(piece)
            if stop_at.is_set():
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        done.set()

    stop_at = trio.Event()
    async with running(app) as port:
        stream = await connect(port, rcvbuf=16384)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            # wait for the writer to stall: same count over consecutive polls
            last, stable = -1, 0
            with trio.fail_after(20):
                while stable < 5:
                    await trio.sleep(0.05)
                    stable = stable + 1 if progress["returned"] == last else 0
                    last = progress["returned"]
            stalled_at = progress["returned"]
            assert progress["sent"] == stalled_at + len(piece), "send() should be blocked right now"
            assert stalled_at < 8 * 1024 * 1024, f"{stalled_at} bytes accepted without a reader"
            stop_at.set()
            # now read everything; the data must be a clean chunk stream of the pattern
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
            body = bytearray()
            with trio.fail_after(20):
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                await done.wait()
    assert len(body) == progress["returned"]
    assert body == piece * (len(body) // len(piece))


async def test_shielded_write_not_cut_by_timeout(mode):
    """A move_on_after around a blocked send does not interrupt the write (stock shield kept):
    the whole body still arrives; the send returns only after the client read."""
    big = b"z" * (4 * 1024 * 1024)
    result = {}
    done = trio.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with trio.move_on_after(0.2) as cs:
            await send({"type": "http.response.body", "body": big, "more_body": True})
        result["returned_at"] = trio.current_time()
        result["cancel_called"] = cs.cancel_called
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        done.set()

    async with running(app) as port:
        stream = await connect(port, rcvbuf=16384)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await trio.sleep(0.6)
            reading_at = trio.current_time()
            resp, body, _ = await read_response(stream)
            await done.wait()
    assert body == big
    assert result["cancel_called"]
    assert result["returned_at"] >= reading_at


async def test_send_in_cancelled_scope_raises_before_writing(mode):
    outcome = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        with trio.CancelScope() as cs:
            cs.cancel()
            try:
                await send({"type": "http.response.body", "body": b"NEVER", "more_body": True})
            except trio.Cancelled:
                outcome["cancelled"] = True
                raise
        await send({"type": "http.response.body", "body": b"after", "more_body": False})

    async with running(app) as port:
        stream = await connect(port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            resp, body, _ = await read_response(stream)
    assert outcome == {"cancelled": True}
    assert body == b"firstafter"


async def test_disconnect_arrives_as_http_disconnect(mode):
    got = trio.Event()
    log = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        msg = await receive()
        while msg["type"] == "http.request" :
            msg = await receive()
        log["msg"] = msg["type"]
        # ASGI 2.1: sends after a disconnect succeed silently (both the fast and the stock path)
        for _ in range(50):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        log["sends_ok"] = True
        got.set()

    async with running(app) as port:
        for how in ("close", "reset"):
            got = trio.Event()
            log.clear()
            stream = await connect(port)
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await read_until(stream, b"data: 0")
            if how == "reset":
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            with trio.fail_after(5):
                await got.wait()
            assert log == {"msg": "http.disconnect", "sends_ok": True}


async def test_write_while_lock_held_waits_then_succeeds(mode):
    """Contended send lock (another writer in progress): the patch falls back to the stock path."""
    order = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        tcp_server = send.__self__.send.__self__.send.__self__  # HTTPStream -> H11Protocol -> TCPServer
        await send({"type": "http.response.start", "status": 200, "headers": []})
        lock_taken = trio.Event()

        async def holder():
            async with tcp_server.send_lock:
                lock_taken.set()
                await trio.sleep(0.2)
                order.append("released")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await lock_taken.wait()
            await send({"type": "http.response.body", "body": b"abc", "more_body": True})
            order.append("sent")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with running(app) as port:
        stream = await connect(port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            resp, body, _ = await read_response(stream)
    assert body == b"abc"
    assert order == ["released", "sent"]


def test_apply_refuses_other_hypercorn(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(hypercorn_version, "version",
                        lambda name: "0.19.0" if name == "hypercorn" else real(name))
    with pytest.raises(RuntimeError, match="0.19.0"):
        hypercorn_fast.apply()
    assert not hypercorn_fast.is_applied()
    for patch in (h2_flow, idle_timer, app_queue):  # every hypercorn patch shares the gate
        with pytest.raises(RuntimeError, match=r"found 0\.19\.0: re-check"):
            patch.apply()


def test_apply_and_revert_restore_originals():
    from hypercorn.protocol.http_stream import HTTPStream
    from hypercorn.trio.tcp_server import TCPServer
    from proxy.server.lean_sync import LeanEvent, LeanLock
    originals = (HTTPStream.app_send, TCPServer.protocol_send, TCPServer._read_data, TCPServer.__init__)
    hypercorn_fast.apply()
    assert HTTPStream.app_send is not originals[0] and TCPServer.protocol_send is not originals[1]
    server = TCPServer(None, None, None, None, None)  # __init__ only keeps its arguments
    assert type(server.send_lock) is LeanLock and type(server.idle_task._lock) is LeanLock
    hypercorn_fast.revert()
    assert (HTTPStream.app_send, TCPServer.protocol_send, TCPServer._read_data, TCPServer.__init__) == originals
    server = TCPServer(None, None, None, None, None)
    assert type(server.send_lock) is trio.Lock and type(server.idle_task._lock) is trio.Lock
    from hypercorn.trio.worker_context import EventWrapper, WorkerContext
    assert WorkerContext.event_class is EventWrapper
    hypercorn_fast.apply()
    assert type(WorkerContext(None).terminated) is LeanEvent  # and every H11Protocol's can_read
    hypercorn_fast.revert()


@pytest.mark.parametrize("how", ["peer_reset", "local_closed", "eof_sent"])
async def test_write_to_dead_socket_reports_closed(mode, how):
    """protocol_send on a broken/closed socket must not raise; it reports Closed to the protocol
    (which turns into http.disconnect for the app), exactly as the stock except-clause does."""
    from hypercorn.events import Closed, RawData
    from hypercorn.trio.tcp_server import TCPServer

    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    server = TCPServer(None, Config(), None, None, stream)
    seen = []

    class FakeProtocol:
        async def handle(self, event):
            seen.append(type(event))

    server.protocol = FakeProtocol()
    if how == "peer_reset":
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()
    elif how == "local_closed":
        await stream.aclose()
    else:
        await stream.send_eof()
    for _ in range(3):  # the first write to a just-reset peer may still succeed
        await server.protocol_send(RawData(data=b"x" * 1000))
    assert seen and set(seen) == {Closed}
    assert not server.send_lock.locked()
    if how != "peer_reset":
        b.close()
    await stream.aclose()
