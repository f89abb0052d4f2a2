"""HTTP/2: h2c and TLS+ALPN work, and a client that never opens its window throttles the provider."""

import ssl

import h2.config
import h2.connection
import h2.events
import httpx
import orjson
import trio
import trustme
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, StreamBuffer
from hypercorn.trio.worker_context import EventWrapper

from proxy.server import h2_flow

from .conftest import MASTER_KEY, chat_body, parse_sse
from .test_backpressure import BIG, BOUND, first_record, settle


async def pushes_while_window_closed() -> int:
    """Push 16 KiB pieces while the sender finds a closed window (pop(0)); count pushes let through."""
    buffer = StreamBuffer(EventWrapper)
    pushed = 0

    async def writer():
        nonlocal pushed
        for _ in range(64):
            await buffer.push(b"x" * 16384)
            pushed += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        for _ in range(64):  # what hypercorn's send task does each time the stream is unblocked
            await trio.testing.wait_all_tasks_blocked()
            await buffer.pop(0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return pushed


async def test_stock_hypercorn_buffer_ignores_a_closed_window_and_the_fix_holds():
    h2_flow.revert()
    try:
        stock = await pushes_while_window_closed()
    finally:
        h2_flow.apply()
    patched = await pushes_while_window_closed()
    assert stock == 64  # everything "sent" into server memory: the flaw the patch exists for
    assert patched * 16384 <= BUFFER_HIGH_WATER + 16384


async def test_patched_buffer_still_drains_normally():
    h2_flow.apply()
    buffer = StreamBuffer(EventWrapper)
    received = bytearray()

    async def reader():
        while len(received) < 64 * 16384:
            await trio.testing.wait_all_tasks_blocked()
            received.extend(await buffer.pop(16384))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for _ in range(64):
            await buffer.push(b"y" * 16384)
    assert len(received) == 64 * 16384


async def test_h2c_prior_knowledge_streams(gw):
    async with httpx.AsyncClient(http1=False, http2=True,
                                 headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        response = await client.post(gw.v1 + "/chat/completions", json=chat_body(stream=True))
    assert response.http_version == "HTTP/2"
    assert response.headers["content-type"].startswith("text/event-stream")
    assert parse_sse(response.content)[-1] == b"[DONE]"


async def test_tls_with_alpn_h2(start_gateway, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    gw = await start_gateway(server={"certfile": str(certfile), "keyfile": str(keyfile)})
    assert gw.url.startswith("https://")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with httpx.AsyncClient(http2=True, verify=context,
                                 headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        response = await client.post(gw.v1 + "/chat/completions", json=chat_body(stream=True))
        health = await client.get(gw.url + "/healthz")
    assert response.http_version == "HTTP/2" and health.http_version == "HTTP/2"
    assert parse_sse(response.content)[-1] == b"[DONE]"


async def test_h2_client_that_never_opens_its_window_throttles_the_provider(start_gateway, fake):
    gw = await start_gateway(server={"write_timeout": 60.0})
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "http"),
                          (":authority", "gw"), ("content-type", "application/json"),
                          ("authorization", f"Bearer {MASTER_KEY}")])
    conn.send_data(1, orjson.dumps(chat_body(BIG, stream=True)), end_stream=True)
    await stream.send_all(conn.data_to_send())
    received = 0

    async def read_but_never_acknowledge():
        # Reads every frame (so TCP is not what pushes back) but sends no WINDOW_UPDATE.
        nonlocal received
        while data := await stream.receive_some(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received += event.flow_controlled_length
            if pending := conn.data_to_send():
                await stream.send_all(pending)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_but_never_acknowledge)
        with trio.fail_after(20):
            record = await first_record(fake)
            sent = await settle(lambda: record.bytes_sent, gw.gateway)
        assert 0 < sent < BOUND, sent
        assert received <= 65535  # the client's window: all the server may send
        assert not record.completed
        nursery.cancel_scope.cancel()
    await stream.aclose()
    with trio.fail_after(5):
        await record.closed.wait()
