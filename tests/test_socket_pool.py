"""proxy.transport.pool against real trio TCP servers on port 0, written here with raw trio sockets."""

from __future__ import annotations

import functools
import gzip
import socket as stdlib_socket
import struct
import zlib
from typing import Awaitable, Callable

import httpx
import pytest
import trio
import trio.testing

from proxy.transport.pool import MAX_DECODED, SocketPoolTransport


class Peer:
    """The server's side of one accepted connection."""

    def __init__(self, sock: trio.socket.SocketType, index: int):
        self.sock, self.index, self.buf = sock, index, b""
        self.eof = trio.Event()  # set when the client's EOF (or reset) was seen

    async def _more(self) -> bool:
        try:
            data = await self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof.set()
        self.buf += data
        return bool(data)

    async def request(self) -> bytes | None:
        """One request's head and body (content-length or chunked), None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not await self._more():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            while b"0\r\n\r\n" not in self.buf:
                await self._more()
            body, _, self.buf = self.buf.partition(b"0\r\n\r\n")
            return head + b"\r\n\r\n" + body + b"0\r\n\r\n"
        length = 0
        for line in lower.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(self.buf) < length:
            await self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return head + b"\r\n\r\n" + body

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view):]

    async def until_eof(self) -> None:
        while await self._more():
            pass

    async def saw_eof(self) -> None:
        """The client's EOF; a bound (not a sleep) so a broken transport fails instead of hanging."""
        with trio.fail_after(10):
            await self.eof.wait()


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    def __init__(self, nursery: trio.Nursery, handler: Handler):
        self.nursery, self.handler, self.peers = nursery, handler, []

    async def start(self) -> "Server":
        self.listener = trio.socket.socket()
        await self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.nursery.start_soon(self._accept)
        return self

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _accept(self) -> None:
        while True:
            sock, _ = await self.listener.accept()
            peer = Peer(sock, len(self.peers))
            self.peers.append(peer)
            self.nursery.start_soon(self._run, peer)

    async def _run(self, peer: Peer) -> None:
        with peer.sock:
            await self.handler(peer)


async def serve(nursery: trio.Nursery, handler: Handler) -> Server:
    return await Server(nursery, handler).start()


def ok_forever(response: bytes) -> Handler:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(response)
    return handler


async def get(transport: SocketPoolTransport, url: str, method: str = "GET", **kwargs) -> httpx.Response:
    response = await transport.handle_async_request(httpx.Request(method, url, **kwargs))
    await response.aread()
    return response


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CHUNK_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


async def test_keep_alive_reuse_and_what_goes_on_the_wire(nursery):
    server = await serve(nursery, ok_forever(OK))
    transport = SocketPoolTransport()
    for _ in range(3):
        assert (await get(transport, server.url("/a/b?q=1 2"))).content == b"ok"
        assert transport.idle_count() == 1
    assert transport.connections_opened == 1 and len(server.peers) == 1
    await transport.aclose()
    assert transport.idle_count() == 0
    await server.peers[0].saw_eof()


async def test_request_line_and_headers(nursery):
    seen = []

    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            seen.append(request)
            await peer.send(OK)

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    await get(transport, server.url("/v1/x?a=1"), "POST", content=b"{}", headers={"x-key": "k"})
    await get(transport, server.url("/"), headers={"accept-encoding": "gzip"})
    first, second = (r.lower() for r in seen)
    assert first.startswith(b"post /v1/x?a=1 http/1.1\r\n") and first.endswith(b"\r\n\r\n{}")
    assert b"\r\nhost: 127.0.0.1:%d\r\n" % server.port in first and b"\r\nx-key: k\r\n" in first
    assert b"\r\naccept-encoding: identity\r\n" in first and b"\r\ncontent-length: 2\r\n" in first
    assert b"\r\naccept-encoding: gzip\r\n" in second and b"identity" not in second


async def test_streamed_request_body_goes_chunked(nursery):
    seen = []

    async def handler(peer: Peer) -> None:
        seen.append(await peer.request())
        await peer.send(OK)

    async def body():
        yield b"hello"
        yield b""
        yield b", world"

    server = await serve(nursery, handler)
    await get(SocketPoolTransport(), server.url(), "POST", content=body())
    assert seen[0].endswith(b"\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n")
    assert b"transfer-encoding: chunked" in seen[0].lower()


async def test_close_delimited_body_is_not_reused(nursery):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nuntil close")

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    for _ in range(2):
        assert (await get(transport, server.url())).content == b"until close"
        assert transport.idle_count() == 0
    assert transport.connections_opened == 2


async def test_connection_close_is_not_reused(nursery):
    async def handler(peer: Peer) -> None:  # keeps the socket open: the header alone decides
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await peer.until_eof()

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    await get(transport, server.url())
    await server.peers[0].saw_eof()  # we closed it
    await get(transport, server.url())
    assert transport.connections_opened == 2 and transport.idle_count() == 0


async def test_head_request_has_no_body_and_is_reused(nursery):
    server = await serve(nursery, ok_forever(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"))
    transport = SocketPoolTransport()
    for _ in range(2):
        response = await get(transport, server.url(), "HEAD")
        assert response.content == b"" and response.headers["content-length"] == "100"
    assert transport.connections_opened == 1


async def test_cancellation_mid_body_closes_the_socket(nursery, autojump_clock):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNK_HEAD + b"5\r\nfirst\r\n")
        await peer.until_eof()

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    response = await transport.handle_async_request(httpx.Request("GET", server.url()))
    stream = response.stream
    assert await stream.read() == b"first"
    start = trio.current_time()
    with trio.move_on_after(7) as scope:  # the caller's read timeout: its own scope
        await stream.read()
    assert scope.cancelled_caught and trio.current_time() == start + 7
    await server.peers[0].saw_eof()  # the provider sees EOF
    assert transport.idle_count() == 0
    with pytest.raises(httpx.ReadError):
        await stream.read()


async def test_aclose_before_the_end_closes_the_socket(nursery):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNK_HEAD + b"5\r\nfirst\r\n")
        await peer.until_eof()

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    response = await transport.handle_async_request(httpx.Request("GET", server.url()))
    assert await response.stream.read() == b"first"
    await response.aclose()
    await server.peers[0].saw_eof()
    assert transport.idle_count() == 0


async def test_abort_from_another_task(nursery):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNK_HEAD + b"5\r\nfirst\r\n")
        await peer.until_eof()

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    response = await transport.handle_async_request(httpx.Request("GET", server.url()))
    stream = response.extensions["response_stream"]
    assert stream is response.stream
    assert await stream.read() == b"first"
    errors = []

    async def reader() -> None:
        try:
            await stream.read()
        except httpx.ReadError as exc:
            errors.append(exc)

    with trio.fail_after(10):  # a bound, so a broken abort fails instead of hanging
        async with trio.open_nursery() as readers:
            readers.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            stream.abort()  # synchronous, from this task
    assert len(errors) == 1
    await server.peers[0].saw_eof()
    assert transport.idle_count() == 0


@pytest.mark.parametrize("idle, reused", [(4.0, True), (6.0, False)])
async def test_idle_expiry(nursery, autojump_clock, idle, reused):
    server = await serve(nursery, ok_forever(OK))
    transport = SocketPoolTransport(keepalive_expiry=5.0)
    await get(transport, server.url())
    await trio.sleep(idle)  # autojump: advances the clock only
    await get(transport, server.url())
    assert transport.connections_opened == (1 if reused else 2)
    if not reused:
        await server.peers[0].saw_eof()  # the expired one was closed


async def test_dead_idle_connection_is_not_used(nursery):
    closed = trio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        if peer.index == 0:
            peer.sock.close()  # keep-alive announced, then closed while idle
            closed.set()
        else:
            await peer.until_eof()

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    await get(transport, server.url())
    await closed.wait()

    async def body():  # a streamed body cannot be retried: only the liveness check saves it
        yield b"x"

    assert (await get(transport, server.url(), "POST", content=body())).content == b"ok"
    assert transport.connections_opened == 2


async def test_stale_connection_is_retried_once_for_a_bytes_body(nursery):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        if peer.index == 0:
            await peer.request()  # the second request arrives; the server closes instead of answering

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    await get(transport, server.url())
    assert (await get(transport, server.url(), "POST", content=b"x")).content == b"ok"
    assert transport.connections_opened == 2


def gzip_response(body: bytes, coding: bytes = b"gzip") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-encoding: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (coding, len(body), body))


@pytest.mark.parametrize("coding, compress", [
    (b"gzip", gzip.compress),
    (b"deflate", zlib.compress),
    (b"deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some servers send it
])
async def test_compressed_body_is_decoded(nursery, coding, compress):
    plain = b"data: " + b"token " * 5000 + b"\n\n"
    server = await serve(nursery, ok_forever(gzip_response(compress(plain), coding)))
    transport = SocketPoolTransport()
    for _ in range(2):
        response = await get(transport, server.url())
        assert response.content == plain
        assert "content-encoding" not in response.headers and "content-length" not in response.headers
    assert transport.connections_opened == 1  # read to the end: back in the pool


@functools.cache
def gzip_bomb() -> tuple[bytes, int]:
    """1 GiB of zeros as ~1 MB of gzip, built in ~0.2 s: after a full flush deflate forgets its
    window, so each further MiB of zeros compresses to the same bytes; then a final empty block
    and the gzip trailer (CRC-32, size)."""
    zeros, mib = bytes(1 << 20), 1024
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    final_empty_block = b"\x03\x00"
    trailer = struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)
    return first + again * (mib - 1) + final_empty_block + trailer, mib << 20


async def test_gzip_bomb_is_read_in_bounded_pieces(nursery):
    compressed, size = gzip_bomb()
    assert len(compressed) < 2 << 20
    server = await serve(nursery, ok_forever(gzip_response(compressed)))
    transport = SocketPoolTransport()
    response = await transport.handle_async_request(httpx.Request("GET", server.url()))
    total = biggest = 0
    while piece := await response.stream.read():
        total += len(piece)
        biggest = max(biggest, len(piece))
    assert total == size and biggest <= MAX_DECODED
    assert transport.idle_count() == 1


@pytest.mark.parametrize("coding", [b"br", b"zstd", b"gzip, br", b"compress"])
async def test_unsupported_encoding_is_a_decoding_error(nursery, coding):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNK_HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: %s\r\n\r\n" % coding)
                        + b"4\r\nabcd\r\n")
        await peer.until_eof()

    server = await serve(nursery, handler)
    response = await SocketPoolTransport().handle_async_request(httpx.Request("GET", server.url()))
    with pytest.raises(httpx.DecodingError):
        await response.aread()
    await server.peers[0].saw_eof()


async def test_bad_gzip_is_a_decoding_error(nursery):
    server = await serve(nursery, ok_forever(gzip_response(b"not gzip at all")))
    with pytest.raises(httpx.DecodingError):
        await get(SocketPoolTransport(), server.url())


async def test_connection_refused_is_a_connect_error():
    probe = stdlib_socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(httpx.ConnectError):
        await get(SocketPoolTransport(), f"http://127.0.0.1:{port}/")


async def test_malformed_response_is_a_remote_protocol_error(nursery):
    server = await serve(nursery, ok_forever(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"))
    with pytest.raises(httpx.RemoteProtocolError):
        await get(SocketPoolTransport(), server.url())
    await server.peers[0].saw_eof()


async def test_close_before_the_end_is_a_remote_protocol_error(nursery):
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")

    server = await serve(nursery, handler)
    with pytest.raises(httpx.RemoteProtocolError):
        await get(SocketPoolTransport(), server.url())


async def test_timeout_extension_is_not_mutated(nursery):
    server = await serve(nursery, ok_forever(OK))
    timeout = {"connect": 5.0, "read": 1.0, "write": 5.0, "pool": None}
    await get(SocketPoolTransport(), server.url(), extensions={"timeout": timeout})
    assert timeout == {"connect": 5.0, "read": 1.0, "write": 5.0, "pool": None}


async def test_async_client_end_to_end(nursery):
    async def handler(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            body = request.partition(b"\r\n\r\n")[2]
            events = b"".join(b"%x\r\ndata: %d\n\n\r\n" % (len(b"data: %d\n\n" % i), i) for i in range(3))
            if b"stream" in body:
                await peer.send(CHUNK_HEAD + events + b"0\r\n\r\n")
            else:
                await peer.send(gzip_response(gzip.compress(body)))

    server = await serve(nursery, handler)
    transport = SocketPoolTransport()
    async with httpx.AsyncClient(transport=transport, base_url=server.url()) as client:
        response = await client.post("/echo", json={"hello": "world"})
        assert response.status_code == 200 and response.json() == {"hello": "world"}
        async with client.stream("POST", "/v1/chat", json={"stream": True}) as streamed:
            lines = [line async for line in streamed.aiter_lines() if line]
        assert lines == ["data: 0", "data: 1", "data: 2"]
    assert transport.connections_opened == 1


async def test_tls_upstream_keep_alive_and_a_streamed_body(nursery):
    """The TLS path of the pool's reads (an SSLStream: its own receive_some, not the one-frame
    socket receive)."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    events = b"".join(b"%x\r\ndata: %d\n\n\r\n" % (len(b"data: %d\n\n" % i), i) for i in range(3))

    async def handler(stream: trio.SSLStream) -> None:
        buf = b""
        for _ in range(2):
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            _, _, buf = buf.partition(b"\r\n\r\n")
            await stream.send_all(CHUNK_HEAD + events + b"0\r\n\r\n")

    listeners = await nursery.start(functools.partial(trio.serve_ssl_over_tcp, handler, 0, server_context,
                                                      host="127.0.0.1"))
    port = listeners[0].transport_listener.socket.getsockname()[1]
    transport = SocketPoolTransport(ssl_context=client_context)
    async with httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{port}") as client:
        for _ in range(2):
            async with client.stream("GET", "/v1/chat") as streamed:
                lines = [line async for line in streamed.aiter_lines() if line]
            assert lines == ["data: 0", "data: 1", "data: 2"]
    assert transport.connections_opened == 1
