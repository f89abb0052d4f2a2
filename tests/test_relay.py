"""The relay alone, with in-memory ASGI send/receive and the autojump clock: exact times.

Every test runs twice (its `watchdog` fixture): with a watchdog task per relay, and with the
hosted watchdog (the process's alarms, proxy/server/alarms.py, and the client's events from its
app queue), as the gateway runs them under serve.py. (pytest-trio sets up an async fixture only
for the tests that ask for it: hence the argument, not autouse.)"""

import math

import orjson
import pytest
import trio
import trio.testing

from proxy.core.errors import ShuttingDown, UpstreamError
from proxy.server.alarms import Alarms
from proxy.server.app_queue import AppQueue
from proxy.server.pump import KEEPALIVE, Relay, StreamState
from proxy.core.sse import DONE, encode_event


class FakeClient:
    """ASGI send/receive of one client. `gate` closed = the client is not reading (writes block).

    Writes block inside a shielded scope, exactly like hypercorn's socket writes.
    """

    def __init__(self):
        self.messages = []
        self.write_times = []
        self.gate = trio.Event()
        self.gate.set()
        self.blocked_since = None
        self._inbox = AppQueue(1)  # hypercorn's app queue under serve.py (proxy/server/app_queue.py)
        self._inbox.nursery = CONNECTION[0]  # as app_queue's spawn_app sets it
        self.receive = self._inbox.receive

    async def send(self, message):
        self.write_times.append(trio.current_time())
        with trio.CancelScope(shield=True):
            if not self.gate.is_set():
                self.blocked_since = trio.current_time()
            await self.gate.wait()
        self.messages.append(message)

    async def disconnect(self):
        await self._inbox.send({"type": "http.disconnect"})

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    @property
    def body_sends(self):
        return [m for m in self.messages if m["type"] == "http.response.body"]


ALARMS: list[Alarms | None] = [None]  # the hosted watchdog's alarms in this test, if any (watchdog)
CONNECTION: list[trio.Nursery | None] = [None]  # and the connection's nursery, for the stream's tasks


@pytest.fixture(params=["watchdog task", "hosted watchdog"])
async def watchdog(request, nursery):
    alarms = None
    if request.param == "hosted watchdog":
        alarms = Alarms()
        nursery.start_soon(alarms.run, trio.Event())
        await trio.testing.wait_all_tasks_blocked()
        assert alarms.running
    ALARMS[0] = alarms
    CONNECTION[0] = nursery if alarms is not None else None
    yield request.param
    ALARMS[0] = CONNECTION[0] = None


def stream_tasks(relay) -> list[str]:
    """The relay's tasks now: in its own nursery, or (hosted) in the connection's."""
    tasks = relay._nursery.child_tasks if CONNECTION[0] is None else CONNECTION[0].child_tasks
    names = [t.name.rsplit(".", 1)[-1] for t in tasks]
    return sorted(n for n in names if n in ("_watch", "_write_all", "_write_aside"))


def make_relay(client, **kw):
    options = dict(write_timeout=10.0, buffer=4, keepalive_interval=15.0, alarms=ALARMS[0])
    options.update(kw)
    return Relay(client.send, client.receive, **options)


def event(i: int) -> bytes:
    return encode_event(orjson.dumps({"i": i}))


async def test_events_relayed_in_order_then_done(watchdog, autojump_clock):
    client = FakeClient()

    async def produce(channel):
        for i in range(3):
            await channel.send(event(i))
            await trio.sleep(1)
        await channel.send(DONE)

    relay = make_relay(client)
    await relay.run(produce)
    start = client.messages[0]
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache"
    assert headers[b"x-accel-buffering"] == b"no"
    assert client.body == event(0) + event(1) + event(2) + DONE
    assert client.body_sends[-1]["more_body"] is False
    assert relay.failure is None and relay.state is StreamState.FINISHED


async def test_each_event_is_flushed_when_it_arrives(watchdog, autojump_clock):
    client = FakeClient()

    async def produce(channel):
        for i in range(3):
            await trio.sleep(2)
            await channel.send(event(i))

    await make_relay(client).run(produce)
    # headers + one body write per event at t=2,4,6, then the end-of-body write
    assert client.write_times[1:4] == [2.0, 4.0, 6.0]


async def test_queued_events_are_coalesced_into_one_write(watchdog):
    client = FakeClient()
    client.gate = trio.Event()  # not reading yet

    async def produce(channel):
        for i in range(9):
            await channel.send(event(i))

    async with trio.open_nursery() as nursery:
        relay = make_relay(client, buffer=16)
        nursery.start_soon(relay.run, produce)
        await trio.testing.wait_all_tasks_blocked()
        client.gate.set()
    assert client.body == b"".join(event(i) for i in range(9))
    assert len(client.body_sends) < 9


async def test_slow_client_bounds_what_the_producer_can_read(watchdog, autojump_clock):
    client = FakeClient()
    client.gate = trio.Event()
    produced = 0

    async def produce(channel):
        nonlocal produced
        for i in range(1000):
            await channel.send(event(i))
            produced += 1

    relay = make_relay(client, buffer=4, write_timeout=math.inf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run, produce)
        await trio.sleep(100)
        # one batch in the blocked write (<= buffer) + a full channel: nothing more was read
        assert produced <= 2 * 4 + 1
        client.gate.set()
    assert produced == 1000
    assert client.body == b"".join(event(i) for i in range(1000))


async def test_stalled_write_cancels_the_producer_at_the_deadline(watchdog, autojump_clock):
    client = FakeClient()
    cancelled_at = None

    async def produce(channel):
        nonlocal cancelled_at
        try:
            await channel.send(event(0))
            await trio.sleep(3)
            client.gate = trio.Event()  # the client stops reading at t=3
            for i in range(1, 100):
                await channel.send(event(i))
                await trio.sleep(0.1)
        except trio.Cancelled:
            cancelled_at = trio.current_time()
            raise

    relay = make_relay(client, write_timeout=10.0)

    async def release_after_upstream_is_gone():
        while cancelled_at is None:
            await trio.sleep(1)
        await trio.sleep(50)  # the kernel ends the shielded write much later (TCP_USER_TIMEOUT)
        client.gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_after_upstream_is_gone)
        await relay.run(produce)
    # the blocked write began at t=3.0 (first event after the stall); upstream released at +10 s
    assert client.blocked_since == pytest.approx(3.0)
    assert cancelled_at == pytest.approx(13.0)
    assert relay.state is StreamState.STALLED
    assert DONE not in client.body


async def test_client_disconnect_cancels_the_producer_at_once(watchdog, autojump_clock):
    client = FakeClient()
    cancelled_at = None

    async def produce(channel):
        nonlocal cancelled_at
        try:
            for i in range(100):
                await channel.send(event(i))
                await trio.sleep(1)
        except trio.Cancelled:
            cancelled_at = trio.current_time()
            raise

    async def leave():
        await trio.sleep(5.5)
        await client.disconnect()

    relay = make_relay(client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leave)
        await relay.run(produce)
    assert cancelled_at == 5.5
    assert relay.state is StreamState.DISCONNECTED and relay.failure is None


async def test_upstream_failure_mid_stream_is_an_error_event_without_done(watchdog):
    client = FakeClient()

    async def produce(channel):
        await channel.send(event(0))
        await channel.send(event(1))
        raise UpstreamError("provider p: connection failed (RemoteProtocolError)")

    relay = make_relay(client)
    await relay.run(produce)
    body = client.body
    assert body.startswith(event(0) + event(1))
    assert b"[DONE]" not in body
    error = orjson.loads(body[len(event(0) + event(1)):].removeprefix(b"data: ").strip())
    assert error["error"]["code"] == "upstream_error"
    assert "connection failed" in error["error"]["message"]
    assert client.body_sends[-1]["more_body"] is False
    assert isinstance(relay.failure, UpstreamError)


async def test_upstream_failure_before_any_byte_is_raised_for_a_proper_status(watchdog):
    client = FakeClient()

    async def produce(channel):
        raise UpstreamError("provider p: could not connect")

    with pytest.raises(UpstreamError):
        await make_relay(client).run(produce)
    assert client.messages == []


async def test_keepalive_comments_while_waiting_for_a_slow_first_token(watchdog, autojump_clock):
    client = FakeClient()

    async def produce(channel):
        await trio.sleep(40)
        await channel.send(event(0))
        await channel.send(DONE)

    await make_relay(client, keepalive_interval=15.0).run(produce)
    assert client.body == KEEPALIVE + KEEPALIVE + event(0) + DONE
    assert client.write_times[1:3] == [15.0, 30.0]


async def test_a_keepalive_before_the_first_token_starts_no_writer_task(watchdog, autojump_clock):
    """The watchdog writes the comments itself while nothing went through the channel: a stream
    held for minutes keeps no writer task and no channel (pump._write_aside)."""
    client = FakeClient()
    relay = make_relay(client, keepalive_interval=15.0)
    first = trio.Event()

    async def produce(outlet):
        await first.wait()
        await outlet.put(event(0))
        await outlet.put(DONE)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run, produce)
        await trio.sleep(31)
        assert client.body == KEEPALIVE + KEEPALIVE
        assert stream_tasks(relay) == (["_watch"] if ALARMS[0] is None else [])  # the hosted watchdog has none
        first.set()
    assert client.body == KEEPALIVE + KEEPALIVE + event(0) + DONE
    assert relay.state is StreamState.FINISHED and relay.failure is None


async def test_a_first_token_at_the_keepalive_instant_never_writes_beside_it(watchdog, autojump_clock):
    """The keep-alive alarm and the first token in the same instant, either running first: the two
    writes never overlap (one ASGI send at a time), and the comment, if written, goes first."""
    for _ in range(10):  # trio runs a batch in either order: both orders get their turn
        client = FakeClient()
        sending = [0, 0]  # in flight now, most at once
        original = client.send

        async def send(message):
            sending[0] += 1
            sending[1] = max(sending)
            try:
                await original(message)
            finally:
                sending[0] -= 1

        client.send = send
        relay = make_relay(client, keepalive_interval=15.0, write_timeout=60.0)

        async def produce(outlet):
            await trio.sleep(15)  # the keep-alive is due at this very instant
            await outlet.put(event(0))
            await outlet.put(DONE)

        async def slow_client():
            await trio.sleep(14.5)
            client.gate = trio.Event()  # writes take a while: an overlap would show
            await trio.sleep(1)
            client.gate.set()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_client)
            await relay.run(produce)
        assert sending[1] == 1, "two writes at once"
        assert client.body in (event(0) + DONE, KEEPALIVE + event(0) + DONE), client.body
        assert relay.state is StreamState.FINISHED
        assert trio.current_time() - start < 20


async def test_an_abort_during_a_keepalive_write_follows_it(watchdog, autojump_clock):
    """The order of a keep-alive and the first token: tests/test_new_stream_costs.py."""
    client = FakeClient()
    relay = make_relay(client, keepalive_interval=15.0, write_timeout=60.0)

    async def produce(outlet):
        await trio.sleep_forever()

    async def scenario():
        await trio.sleep(14)
        client.gate = trio.Event()  # the keep-alive at 15 s blocks
        await trio.sleep(2)
        relay.abort(ShuttingDown("the gateway is shutting down"))
        await trio.sleep(2)
        client.gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(scenario)
        await relay.run(produce)
    assert client.body.startswith(KEEPALIVE)
    assert b"server_shutting_down" in client.body and b"[DONE]" not in client.body


async def test_abort_ends_the_stream_with_the_given_error(watchdog, autojump_clock):
    client = FakeClient()
    relay = make_relay(client)

    async def produce(channel):
        await channel.send(event(0))
        await trio.sleep_forever()

    async def shut_down():
        await trio.sleep(2)
        relay.abort(ShuttingDown("the gateway is shutting down"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(shut_down)
        await relay.run(produce)
    assert client.body.startswith(event(0))
    assert b"server_shutting_down" in client.body
    assert b"[DONE]" not in client.body


async def test_the_disconnect_that_follows_a_finished_response_is_not_a_client_leaving(watchdog):
    client = FakeClient()
    original_send = client.send

    async def send_then_close(message):  # hypercorn reports the end of a response as a disconnect
        await original_send(message)
        if message.get("more_body") is False:
            await client.disconnect()

    client.send = send_then_close

    async def produce(channel):
        await channel.send(event(0))
        await channel.send(DONE)

    relay = make_relay(client)
    await relay.run(produce)
    assert relay.state is StreamState.FINISHED and relay.failure is None
    assert client.body == event(0) + DONE
