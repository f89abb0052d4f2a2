"""Slow, stalled and vanishing clients over real sockets: what the provider sees.

The fake provider counts the bytes its socket accepted; a client that stops reading must stop
the provider within a bounded number of bytes, a stalled one must be dropped and its upstream
released, and a disconnect must close the upstream connection.
"""

import socket

import orjson
import trio

from proxy.server.connection_tasks import ConnectionTasks
from .conftest import MASTER_KEY, chat_body

BIG = 'fake: {"tokens": 100000, "token_bytes": 1000}'  # ~100 MB if nothing pushes back
BOUND = 8 * 1024 * 1024  # socket buffers + channel + httpx buffers, with a wide margin


def raw_request(body: dict, path: str = "/v1/chat/completions") -> bytes:
    data = orjson.dumps(body)
    return (f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {MASTER_KEY}\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data


async def open_client(url: str, rcvbuf: int | None = 4096) -> trio.SocketStream:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, int(port)))
    return trio.SocketStream(sock)


async def settle(read, gateway, interval: float = 0.2, rounds: int = 3):
    """Poll until a counter stops moving *because* the gateway's one client write stayed blocked
    all along (the throttled state), bounded by the caller's timeout. A counter that merely stalls
    (a starved CPU) while writes still complete, or with no write pending, does not count."""
    last, same, write = -1, 0, None
    while same < rounds:
        await trio.sleep(interval)
        value, began = read(), pending_write(gateway)
        if value == last and began is not None and began == write:
            same += 1
        else:
            same, last, write = 0, value, began
    return last


def pending_write(gateway) -> float | None:
    """When the open stream's current write to the client began (None: no write pending)."""
    relays = list(gateway.streams)
    return relays[0]._write_began if len(relays) == 1 else None


async def first_record(fake):
    while not fake.records:
        await trio.sleep(0.01)
    return fake.records[-1]


async def test_a_client_that_stops_reading_throttles_the_provider(start_gateway, fake):
    gw = await start_gateway(server={"write_timeout": 60.0})
    client = await open_client(gw.url)
    await client.send_all(raw_request(chat_body(BIG, stream=True)))
    with trio.fail_after(20):
        record = await first_record(fake)
        sent = await settle(lambda: record.bytes_sent, gw.gateway)
    assert 0 < sent < BOUND, sent
    assert not record.completed
    # reading resumes the flow: the provider moves again once the client drains some bytes
    with trio.fail_after(10):
        while record.bytes_sent <= sent:
            await client.receive_some(1 << 20)
    await client.aclose()
    with trio.fail_after(5):
        await record.closed.wait()
    assert record.peer_closed_early


async def test_a_stalled_client_is_dropped_and_the_upstream_released(start_gateway, fake):
    gw = await start_gateway(server={"write_timeout": 0.5})
    client = await open_client(gw.url)
    await client.send_all(raw_request(chat_body(BIG, stream=True)))
    with trio.fail_after(15):
        record = await first_record(fake)
        await record.closed.wait()  # the gateway let go of the provider while the client holds on
    assert record.peer_closed_early and not record.completed
    assert record.bytes_sent < BOUND
    with trio.fail_after(15):  # TCP_USER_TIMEOUT reclaims the client connection and the writer
        while len(gw.gateway.streams):
            await trio.sleep(0.05)
    await client.aclose()


async def test_client_disconnect_closes_the_upstream(start_gateway, fake):
    gw = await start_gateway()
    client = await open_client(gw.url, rcvbuf=None)
    await client.send_all(raw_request(chat_body('fake: {"tokens": 1000, "itl": 0.05}', stream=True)))
    received = b""
    with trio.fail_after(10):
        while b'"content":"' not in received.replace(b'"content":""', b""):
            received += await client.receive_some(65536)
    await client.aclose()
    with trio.fail_after(5):
        record = fake.records[-1]
        await record.closed.wait()
    assert record.peer_closed_early and not record.completed
    assert record.tokens_sent < 1000


async def test_client_disconnect_while_a_stream_waits_for_its_first_token(start_gateway, fake):
    """A held stream has no watchdog task (the hosted watchdog, proxy/server/alarms.py) and no
    nursery (proxy/server/connection_tasks.py): the client leaving reaches it from the app queue
    and releases the provider all the same."""
    gw = await start_gateway()
    client = await open_client(gw.url, rcvbuf=None)
    await client.send_all(raw_request(chat_body('fake: {"ttft": 60}', stream=True)))
    with trio.fail_after(5):
        record = await first_record(fake)
        while not len(gw.gateway.streams):
            await trio.sleep(0.01)
    relay = next(iter(gw.gateway.streams))
    # No watchdog, no writer, no nursery of its own: its tasks would run in the connection's.
    assert type(relay._nursery) is ConnectionTasks and relay._nursery.running == 0
    await client.aclose()
    with trio.fail_after(5):
        await record.closed.wait()
        while len(gw.gateway.streams):
            await trio.sleep(0.01)
    assert record.peer_closed_early and not record.completed
    assert relay.outcome == "client_disconnected"


async def test_client_disconnect_cancels_a_non_streaming_upstream_call(start_gateway, fake):
    gw = await start_gateway()
    client = await open_client(gw.url, rcvbuf=None)
    await client.send_all(raw_request(chat_body('fake: {"ttft": 60}')))
    with trio.fail_after(5):
        record = await first_record(fake)
    await client.aclose()
    with trio.fail_after(5):
        await record.closed.wait()
    assert record.peer_closed_early and not record.completed
