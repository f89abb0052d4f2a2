"""Hostile and careless clients against the real gateway on port 0 over raw sockets: slow request
heads and bodies are cut, open connections are bounded with a 503, and a connection HTTP says to
close is closed after the last byte (proxy/server/connections.py)."""

from __future__ import annotations

import logging

import h11
import orjson
import pytest
import trio

from proxy.server import connections
from .conftest import MASTER_KEY, chat_body

AUTH = f"authorization: Bearer {MASTER_KEY}\r\n".encode()


async def connect(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


def post(body: dict, *extra: bytes, length: bool = True) -> bytes:
    data = orjson.dumps(body)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + AUTH
    head += b"".join(extra)
    if length:
        head += b"content-length: %d\r\n" % len(data)
    return head + b"\r\n" + data


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (the caller bounds the time)."""
    received = b""
    while data := await stream.receive_some(65536):
        received += data
    return received


async def read_responses(stream: trio.SocketStream, count: int) -> list[tuple[int, bytes]]:
    """`count` complete responses (status, body) from a client-side h11 connection."""
    conn = h11.Connection(h11.CLIENT)
    responses, status, body = [], 0, b""
    while len(responses) < count:
        if conn.our_state is h11.IDLE:  # the request went out raw: tell the client state machine
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            responses.append((status, body))
            body = b""
            if len(responses) < count:
                conn.start_next_cycle()
    return responses


async def test_a_request_head_that_drips_gets_408_and_the_connection_closes(start_gateway):
    gw = await start_gateway(server={"header_timeout": 0.5})
    stream = await connect(gw.url)
    started = trio.current_time()
    with trio.fail_after(5):  # before the fix: held until the 75 s keep-alive timeout
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        for header in (b"host: x\r\n", b"x-a: 1\r\n"):
            await trio.sleep(0.1)
            await stream.send_all(header)
        received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert 0.5 <= trio.current_time() - started < 2.0


async def test_a_silent_new_connection_is_closed_at_the_header_timeout(start_gateway):
    gw = await start_gateway(server={"header_timeout": 0.3})
    stream = await connect(gw.url)
    with trio.fail_after(5):
        received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 408 ")


async def test_on_a_keep_alive_connection_the_head_clock_starts_with_the_next_request(start_gateway):
    gw = await start_gateway(server={"header_timeout": 0.5})
    stream = await connect(gw.url)
    with trio.fail_after(10):
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        [(status, _)] = await read_responses(stream, 1)
        assert status == 200
        await trio.sleep(0.8)  # idle longer than header_timeout: allowed (keep-alive idle)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        [(status, _)] = await read_responses(stream, 1)
        assert status == 200
        await stream.send_all(b"GET /healthz HTTP/1.1\r\n")  # then a head that never ends
        started = trio.current_time()
        received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert 0.5 <= trio.current_time() - started < 2.0


async def test_a_request_body_that_drips_is_cut(start_gateway, fake):
    gw = await start_gateway(server={"body_timeout": 0.5, "min_body_rate": 1000})
    request = post(chat_body("Hello"))
    head, body = request.split(b"\r\n\r\n", 1)
    stream = await connect(gw.url)
    started = trio.current_time()
    with trio.fail_after(5):  # before the fix: never cut
        await stream.send_all(head + b"\r\n\r\n")

        async def drip():
            for byte in body[:-1]:  # never the last byte
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            received = await read_until_closed(stream)
            nursery.cancel_scope.cancel()
    assert received == b""  # cut, no answer: the app saw a disconnect
    assert 0.5 <= trio.current_time() - started < 2.0
    assert not fake.records  # nothing went upstream


async def test_a_large_body_at_a_fair_rate_is_not_cut(start_gateway):
    # 40 KB at ~40 KB/s: 1 s, beyond body_timeout, but within it plus 1 s per min_body_rate bytes.
    gw = await start_gateway(server={"body_timeout": 0.5, "min_body_rate": 20000})
    request = post(chat_body("x" * 40000))
    stream = await connect(gw.url)
    with trio.fail_after(10):
        for i in range(0, len(request), 4000):
            await stream.send_all(request[i:i + 4000])
            await trio.sleep(0.1)
        [(status, body)] = await read_responses(stream, 1)
    assert status == 200, body


async def test_over_max_connections_a_connection_gets_503_and_later_ones_are_served(start_gateway, http):
    gw = await start_gateway(server={"max_connections": 3, "header_timeout": 30})
    held = [await connect(gw.url) for _ in range(3)]
    with trio.fail_after(10):
        while gw_open(gw) < 3:
            await trio.sleep(0.01)
        extra = await connect(gw.url)
        await extra.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        [(status, body)] = await read_responses(extra, 1)
        assert status == 503
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
        assert await read_until_closed(extra) == b""
        await held.pop().aclose()
        while gw_open(gw) > 2:
            await trio.sleep(0.01)
        assert (await http.get(gw.url + "/healthz")).status_code == 200
    for stream in held:
        await stream.aclose()


def gw_open(gw) -> int:
    """Open connections as the gateway's connection rules count them."""
    return _rules[-1].open


_rules: list[connections.ConnectionRules] = []


@pytest.fixture(autouse=True)
def record_rules(monkeypatch):
    """Keep the ConnectionRules serve() makes, to read its open-connection count."""
    from proxy.server import serve as serve_module

    real = serve_module.connection_rules

    def recording(server):
        rules = real(server)
        _rules.append(rules)
        return rules

    monkeypatch.setattr(serve_module, "connection_rules", recording)


async def test_connection_close_on_a_streamed_response_closes_after_the_last_byte(gw):
    stream = await connect(gw.url)
    with trio.fail_after(5):  # before the fix: open past 110 s
        await stream.send_all(post(chat_body("Hello", stream=True), b"connection: close\r\n"))
        received = await read_until_closed(stream)
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_content_length_with_transfer_encoding_is_answered_then_closed(gw):
    data = orjson.dumps(chat_body("Hello"))
    smuggled = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                + AUTH + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
                + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")  # pipelined behind it
    stream = await connect(gw.url)
    with trio.fail_after(5):
        await stream.send_all(smuggled)
        received = await read_until_closed(stream)
    assert received.startswith(b"HTTP/1.1 200 ") and b"connection: close" in received.lower()
    assert received.count(b"HTTP/1.1 ") == 1  # the pipelined request was not served


async def test_keep_alive_still_works_for_plain_requests(gw):
    stream = await connect(gw.url)
    with trio.fail_after(5):
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 2)
        responses = await read_responses(stream, 2)
    assert [status for status, _ in responses] == [200, 200]
    await stream.aclose()


def test_accept_errors_are_logged_once_per_interval_without_traceback():
    now = [0.0]
    records = []
    logger = logging.getLogger("test.accept")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.addFilter(connections.AcceptErrorFilter(interval=10.0, clock=lambda: now[0]))
    try:
        for _ in range(100):  # trio retries every 0.1 s: 10 s of EMFILE
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("accept returned %s (%s); retrying in %s seconds", "EMFILE", "x", 0.1,
                             exc_info=True)
            now[0] += 0.1
        now[0] = 10.0  # the interval is over
        logger.error("accept returned %s (%s); retrying in %s seconds", "EMFILE", "x", 0.1)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    assert records[0].exc_info is None
    assert "99 more like it" in records[1].getMessage()


async def test_a_connection_whose_client_left_is_closed_at_once(start_gateway):
    gw = await start_gateway(server={"header_timeout": 60})
    clients = [await connect(gw.url) for _ in range(20)]
    with trio.fail_after(5):
        while gw_open(gw) < 20:
            await trio.sleep(0.01)
    for client in clients:
        await client.aclose()
    with trio.fail_after(5):  # before the fix: each held until its 75 s keep-alive timer rang
        while gw_open(gw) > 0:
            await trio.sleep(0.01)


async def test_tls_connections_are_counted_and_released_also_when_the_handshake_fails(start_gateway, tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    gw = await start_gateway(server={"certfile": str(certfile), "keyfile": str(keyfile)})
    host, port = gw.url.removeprefix("https://").rsplit(":", 1)
    garbage = await trio.open_tcp_stream(host, int(port))
    await garbage.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")  # plain HTTP to a TLS port
    with trio.fail_after(5):
        assert await read_until_closed(garbage) == b""  # the handshake fails: closed, no answer
    context = ssl.create_default_context()
    ca.configure_trust(context)
    good = trio.SSLStream(await trio.open_tcp_stream(host, int(port)), context, server_hostname="127.0.0.1",
                          https_compatible=True)
    await good.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    with trio.fail_after(5):
        answer = b""
        while data := await good.receive_some(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 200")
    with trio.fail_after(5):
        while gw_open(gw) > 0:
            await trio.sleep(0.01)
