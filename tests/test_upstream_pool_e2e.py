"""The upstream keep-alive pool through the gateway: reuse, no reuse after cancellation, expiry."""

import httpx
import trio

from proxy.transport.pool import SocketPoolTransport

from .conftest import chat_body, parse_sse


async def test_sequential_streams_reuse_one_upstream_connection(gw, http):
    for _ in range(20):
        response = await http.post(gw.v1 + "/chat/completions", json=chat_body(stream=True))
        assert parse_sse(response.content)[-1] == b"[DONE]"
    assert gw.gateway.upstream.transport.connections_opened == 1
    assert gw.gateway.upstream.transport.idle_count() == 1


async def test_concurrent_streams_open_one_connection_each_then_reuse_them(gw, http):
    async def one():
        response = await http.post(gw.v1 + "/chat/completions",
                                   json=chat_body('fake: {"itl": 0.01}', stream=True))
        assert parse_sse(response.content)[-1] == b"[DONE]"

    for _ in range(3):
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(one)
    transport = gw.gateway.upstream.transport
    assert transport.connections_opened <= 30 + 1
    assert transport.idle_count() == transport.connections_opened


async def test_an_abandoned_stream_closes_its_connection_instead_of_reusing_it(gw, http, fake):
    body = chat_body('fake: {"tokens": 1000, "itl": 0.01}', stream=True)
    async with http.stream("POST", gw.v1 + "/chat/completions", json=body) as response:
        async for _ in response.aiter_raw():
            break  # leave mid-stream
    with trio.fail_after(5):
        await fake.records[-1].closed.wait()
    transport = gw.gateway.upstream.transport
    assert transport.idle_count() == 0
    response = await http.post(gw.v1 + "/chat/completions", json=chat_body(stream=True))
    assert parse_sse(response.content)[-1] == b"[DONE]"
    assert transport.connections_opened == 2


async def test_expired_idle_connections_are_not_reused(fake):
    transport = SocketPoolTransport(keepalive_expiry=0.0)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            response = await client.get(f"http://127.0.0.1:{fake.port}/healthz")
            assert response.status_code == 200
    assert transport.connections_opened == 3
