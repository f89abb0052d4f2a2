"""Scheduler rounds on a new stream's way to its first token, counted with trio's instrumentation.

Why rounds: trio runs every runnable task once per batch, so under load each batch a new
request's tasks wait through is a turn of every other stream's work (bench.md, 2h). A round the
gateway adds on the way to the first token shows up there as one old-stream gap more.

Rules of the count:
- One streamed chat request on a new client connection, through a real gateway on a real
  socket to the real fake provider, upstream connection already pooled (the steady state).
- The request's tasks: the listener task that accepts the connection (its accept is the
  first step counted), and every task spawned from one of them (hypercorn's connection task,
  the app task, the relay's).
- Batches are the run loop's (one per io wait). Counted: the batches in which one of the
  request's tasks ran, in two phases, each delimited by socket calls on the gateway's own
  sockets (tapped for the test):
    ingress: from the batch in which the listener accepted the connection to the batch that
             writes the upstream request;
    egress:  from the batch in which the provider's first token came back from the socket
             receive to the batch that writes it to the client.
  Between the two the provider is thinking (its time to first token), so rounds spent there are
  not on the new stream's path.
- Each bound has a negative control: a gateway that takes one round more in that phase.
"""

from __future__ import annotations

import re
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import orjson
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.worker_context import TrioSingleTask

from proxy.core.errors import ShuttingDown
from proxy.server import asgi, idle_timer, pump
from proxy.server.exchange import Policies
from proxy.transport import sockets
from tests.conftest import MASTER_KEY

# Measured on today's gateway. ingress: the accept; the connection task's request receive;
# its send of the body to the app's queue; the app's receive of it; the upstream write. egress:
# the reader's wake-up, which writes the head itself (one socket send), then the first body.
# Before the cuts they were 10 and 3: hypercorn's keep-alive timer took four rounds (idle_timer),
# read_body waited for the body's last, empty message, the reader handed the first bytes to the
# writer task.
INGRESS_ROUNDS = 5
EGRESS_ROUNDS = 2

TOKEN = re.compile(rb'"content":"[^"]')  # a content delta with text (the role chunk's is "")
PROMPT = 'fake: {"ttft": 0.2, "tokens": 3}'  # 200 ms of provider time between the phases


def _socket_class() -> type:
    """trio's socket class (its methods are what the gateway's sockets call), without a run."""
    with socket.socket() as plain:
        return type(trio.socket.from_stdlib_socket(plain))


SocketType = _socket_class()


@dataclass
class Marks:
    accepted: int | None = None
    read: int | None = None
    upstream_sent: int | None = None
    token_in: int | None = None
    token_out: int | None = None


@dataclass(eq=False)
class Rounds(trio.abc.Instrument):
    """Numbers the run loop's batches; notes the batches in which the request's tasks ran."""

    batch: int = 0
    tracked: set = field(default_factory=set)
    batches: set = field(default_factory=set)
    marks: Marks = field(default_factory=Marks)
    done: bool = False

    def after_io_wait(self, timeout):
        self.batch += 1

    def task_spawned(self, task):
        try:
            parent = trio.lowlevel.current_task()
        except RuntimeError:
            return
        if parent in self.tracked:
            self.tracked.add(task)

    def before_task_step(self, task):
        if task in self.tracked and not self.done:
            self.batches.add(self.batch)

    def phase(self, start: int | None, end: int | None) -> int:
        assert start is not None and end is not None, self.marks
        return sum(1 for b in self.batches if start <= b <= end)


@pytest.fixture
def tapped(monkeypatch):
    """Socket sends and receives marked on `tapped.rounds` (set by the test), by port."""

    class Tap:
        rounds: Rounds | None = None
        gateway_port = 0
        provider_port = 0

    tap = Tap()
    send, recv, accept, receive = SocketType.send, SocketType.recv, SocketType.accept, sockets.receive

    async def tapped_accept(self):
        connection = await accept(self)
        r = tap.rounds
        if r is not None and r.marks.accepted is None and self.getsockname()[1] == tap.gateway_port:
            r.marks.accepted = r.batch
            r.tracked.add(trio.lowlevel.current_task())  # the listener: the connection task is its child
            r.batches.add(r.batch)
        return connection

    async def tapped_send(self, data, *args):
        r = tap.rounds
        if r is not None and not r.done:
            head = bytes(data[:64])
            if head.startswith(b"POST ") and self.getpeername()[1] == tap.provider_port:
                if r.marks.read is not None and r.marks.upstream_sent is None:
                    r.marks.upstream_sent = r.batch
            elif self.getsockname()[1] == tap.gateway_port and TOKEN.search(bytes(data)):
                r.marks.token_out = r.batch
                r.done = True
        return await send(self, data, *args)

    def received(self, data):
        r = tap.rounds
        if r is not None and not r.done and data:
            if data.startswith(b"POST ") and self.getsockname()[1] == tap.gateway_port:
                r.marks.read = r.batch
            elif (r.marks.upstream_sent is not None and r.marks.token_in is None
                  and self.getpeername()[1] == tap.provider_port and TOKEN.search(data)):
                r.marks.token_in = r.batch
        return data

    async def tapped_recv(self, *args):
        return received(self, await recv(self, *args))

    async def tapped_receive(sock, max_bytes):  # the gateway's own receives (proxy/transport/sockets.py)
        return received(sock, await receive(sock, max_bytes))

    monkeypatch.setattr(SocketType, "send", tapped_send)
    monkeypatch.setattr(SocketType, "recv", tapped_recv)
    monkeypatch.setattr(sockets, "receive", tapped_receive)
    monkeypatch.setattr(SocketType, "accept", tapped_accept)
    return tap


async def stream_once(port: int) -> bytes:
    """One streamed chat request on a new connection; returns the response once it ended.

    Connected and sent with a blocking socket, in one step: when the gateway's loop next looks,
    the connection is established and the whole request is in its kernel buffer, as it is under
    load (where a round takes far longer than a loopback connect). The client's own steps never
    sit between the gateway's."""
    body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": PROMPT}]})
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + MASTER_KEY.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body))
    plain = socket.create_connection(("127.0.0.1", port))
    plain.sendall(head + body)
    plain.setblocking(False)
    got = b""
    with trio.socket.from_stdlib_socket(plain) as sock:
        while not got.endswith(b"0\r\n\r\n"):  # to the end: the upstream socket goes back to the pool
            data = await sock.recv(65536)
            assert data, got
            got += data
    return got


async def count(start_gateway, fake, tapped) -> tuple[int, int]:
    gw = await start_gateway(provider={"max_concurrency": 100000})
    tapped.gateway_port = int(gw.url.rsplit(":", 1)[1])
    tapped.provider_port = fake.port
    await stream_once(tapped.gateway_port)  # warm: a pooled upstream socket, imports done
    rounds = tapped.rounds = Rounds()
    trio.lowlevel.add_instrument(rounds)
    try:
        response = await stream_once(tapped.gateway_port)
    finally:
        trio.lowlevel.remove_instrument(rounds)
        tapped.rounds = None
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    return (rounds.phase(rounds.marks.accepted, rounds.marks.upstream_sent),
            rounds.phase(rounds.marks.token_in, rounds.marks.token_out))


async def test_a_new_stream_reaches_its_first_token_in_few_scheduler_rounds(start_gateway, fake, tapped):
    ingress, egress = await count(start_gateway, fake, tapped)
    assert ingress <= INGRESS_ROUNDS and egress <= EGRESS_ROUNDS, (ingress, egress)


# -- negative controls: each adds one round to one phase, which its bound must catch --


class CheckpointingPolicy:
    """A policy whose admit yields once (say, an await on a lock that is free)."""

    async def admit(self, x, request):
        await trio.lowlevel.checkpoint()

    def settle(self, x):
        pass


async def test_the_ingress_bound_catches_a_round_more(start_gateway, fake, tapped, monkeypatch):
    original = Policies.admit

    async def admit(self, x, request):
        await original(self, x, request)
        await CheckpointingPolicy().admit(x, request)

    monkeypatch.setattr(Policies, "admit", admit)
    ingress, egress = await count(start_gateway, fake, tapped)
    assert ingress > INGRESS_ROUNDS and egress <= EGRESS_ROUNDS, (ingress, egress)


async def test_the_egress_bound_catches_a_round_more(start_gateway, fake, tapped, monkeypatch):
    monkeypatch.setattr(pump.Relay, "_writer_idle", lambda self, channel: False)  # hand over to the writer
    ingress, egress = await count(start_gateway, fake, tapped)
    assert ingress <= INGRESS_ROUNDS and egress > EGRESS_ROUNDS, (ingress, egress)


async def test_the_body_read_waits_for_the_last_message_without_a_content_length():
    """read_body's shortcut needs a Content-Length: a chunked body is read to its last message."""
    messages = [{"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.request", "body": b"cd", "more_body": True},
                {"type": "http.request", "body": b"", "more_body": False}]
    queue = list(messages)

    async def receive():
        return queue.pop(0)

    assert await asgi.read_body({}, receive, 100) == b"abcd"
    assert queue == []
    queue[:] = messages
    assert await asgi.read_body({b"content-length": b"4"}, receive, 100) == b"abcd"
    assert len(queue) == 1  # the empty last message is left for whoever reads next


# -- the first write from the reader (pump.Outlet.put): same bytes, same order, same ends --


class GatedClient:
    """ASGI send/receive; `gate` closed = the client is not reading. Records who wrote."""

    def __init__(self):
        self.messages, self.writers = [], []
        self.sending = False
        self.gate = trio.Event()
        self.gate.set()
        self._inbox_send, self._inbox = trio.open_memory_channel(1)

    async def send(self, message):
        assert not self.sending, "two writes at once"  # ASGI sends are one at a time
        self.sending = True
        self.writers.append(trio.lowlevel.current_task())
        with trio.CancelScope(shield=True):  # as hypercorn's socket writes
            await self.gate.wait()
        self.messages.append(message)
        self.sending = False

    async def receive(self):
        return await self._inbox.receive()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


def relay_for(client, **options) -> pump.Relay:
    return pump.Relay(client.send, client.receive, **{"write_timeout": 10.0, "buffer": 4,
                                                      "keepalive_interval": 15.0, **options})


async def test_the_first_bytes_are_written_by_the_reader_and_the_rest_by_the_writer(autojump_clock):
    client = GatedClient()
    reader = trio.lowlevel.current_task()

    async def produce(outlet):
        for i in range(3):
            await trio.sleep(1)
            await outlet.put(b"data: %d\n\n" % i)

    relay = relay_for(client)
    await relay.run(produce)
    assert client.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert client.writers[:2] == [reader, reader]  # the head and the first event
    assert reader not in client.writers[2:]
    assert relay.outcome == "ok" and relay.state is pump.StreamState.FINISHED


async def test_a_keepalive_handed_to_the_writer_but_not_yet_written_goes_first(autojump_clock):
    client = GatedClient()

    async def produce(outlet):
        await trio.sleep(1)  # the writer is parked in its receive()
        outlet.send_nowait(pump.KEEPALIVE)  # as the watchdog queues one: straight to the writer
        await outlet.put(b"data: 0\n\n")  # same step: the writer has not run yet

    await relay_for(client).run(produce)
    assert client.body == pump.KEEPALIVE + b"data: 0\n\n"
    assert [m["type"] for m in client.messages].count("http.response.start") == 1


async def test_a_keepalive_being_written_goes_first(autojump_clock):
    client = GatedClient()

    async def produce(outlet):
        await trio.sleep(15.5)  # the keep-alive went out at 15 and is still being written
        await outlet.put(b"data: 0\n\n")

    async def stop_reading():
        await trio.sleep(14)
        client.gate = trio.Event()
        await trio.sleep(10)
        client.gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_reading)
        await relay_for(client, keepalive_interval=15.0, write_timeout=30.0).run(produce)
    assert client.body == pump.KEEPALIVE + b"data: 0\n\n"
    assert [m["type"] for m in client.messages].count("http.response.start") == 1


async def test_an_abort_during_the_first_write_lets_it_finish_then_ends_with_the_error(autojump_clock):
    client = GatedClient()
    client.gate = trio.Event()  # the first write blocks
    relay = relay_for(client)

    async def produce(outlet):
        await outlet.put(b"data: 0\n\n")
        await trio.sleep_forever()

    async def abort_then_read():
        await trio.sleep(1)
        relay.abort(ShuttingDown("the gateway is shutting down"))
        await trio.sleep(1)
        client.gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(abort_then_read)
        await relay.run(produce)
    assert client.messages[0]["type"] == "http.response.start"
    assert client.body.startswith(b"data: 0\n\n")
    assert b"server_shutting_down" in client.body and b"[DONE]" not in client.body
    assert relay.outcome == "error:server_shutting_down"


class KernelTimeoutClient(GatedClient):
    """A client that takes nothing: the socket write is shielded (as hypercorn's) and ends only
    when the kernel gives up on it (TCP_USER_TIMEOUT), one second after the write timeout here."""

    async def send(self, message):
        if message["type"] == "http.response.body":
            with trio.CancelScope(shield=True):
                await trio.sleep(10.0 + 1.0)
            return  # the failed write: hypercorn closes the connection, the app's send returns
        await super().send(message)


async def test_a_first_write_the_client_never_takes_ends_as_stalled(autojump_clock):
    """The reader's first write stalls like the writer's would: the watchdog calls it stalled at
    write_timeout, and the reader (the upstream socket) is free once the kernel ends the write."""
    client = KernelTimeoutClient()
    relay = relay_for(client)
    released = []

    async def produce(outlet):
        try:
            await trio.testing.wait_all_tasks_blocked()  # the provider's first read: the writer is parked by then
            await outlet.put(b"data: 0\n\n")
            await trio.sleep_forever()
        finally:
            released.append(trio.current_time())

    start = trio.current_time()
    await relay.run(produce)
    assert relay.outcome == "client_stalled" and client.writers[0] is trio.lowlevel.current_task()
    assert released == [pytest.approx(start + 11.0)]  # write_timeout 10 s, the kernel 1 s after


# -- hypercorn's keep-alive timer without round trips (proxy/server/idle_timer.py) --


@pytest.fixture(params=["stock", "patched"])
def timer_mode(request):
    if request.param == "patched":
        idle_timer.apply()
    else:
        idle_timer.revert()
    yield request.param
    idle_timer.revert()


async def test_the_timer_takes_no_scheduler_round_and_still_stops_and_restarts(nursery):
    idle_timer.apply()
    try:
        timer = TrioSingleTask()
        group = SimpleNamespace(_nursery=nursery)
        rang = []

        async def ring():
            await trio.sleep(10)
            rang.append(trio.current_time())

        with trio.testing.assert_no_checkpoints():
            await timer.restart(group, ring)
            await timer.stop()  # before the timer task even ran: it must still not ring
            await timer.restart(group, ring)
            await timer.restart(group, ring)  # the first of the two is cancelled
        await trio.testing.wait_all_tasks_blocked()
        assert len([t for t in nursery.child_tasks]) == 1
        with trio.testing.assert_no_checkpoints():
            await timer.stop()
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks and rang == []
    finally:
        idle_timer.revert()


async def test_a_busy_timer_lock_falls_back_to_the_stock_wait(nursery):
    idle_timer.apply()
    try:
        timer = TrioSingleTask()
        group = SimpleNamespace(_nursery=nursery)
        await timer._lock.acquire()  # a stock restart parked inside
        done = trio.Event()

        async def restart():
            await timer.restart(group, trio.sleep_forever)
            done.set()

        nursery.start_soon(restart)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        timer._lock.release()
        await done.wait()
        assert timer._handle is not None
        await timer.stop()
    finally:
        idle_timer.revert()


@asynccontextmanager
async def hypercorn_on(app, keep_alive_timeout: float):
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    config.keep_alive_timeout = keep_alive_timeout
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, app, config)
        yield int(binds[0].rsplit(":", 1)[1])
        nursery.cancel_scope.cancel()


async def slow_app(scope, receive, send):
    """Lifespan answered; GET /slow streams for 1.2 s, anything else answers at once."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/slow":
        for _ in range(4):
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await trio.sleep(0.3)
    await send({"type": "http.response.body", "body": b"done\n", "more_body": False})


async def get(stream: trio.SocketStream, path: str) -> bytes:
    await stream.send_all(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path.encode())
    got = b""
    while not got.endswith(b"done\n\r\n0\r\n\r\n"):
        data = await stream.receive_some(65536)
        assert data, got
        got += data
    return got


async def eof_after(stream: trio.SocketStream) -> float:
    started = trio.current_time()
    with trio.fail_after(5):
        while await stream.receive_some(65536):
            pass
    return trio.current_time() - started


async def test_keep_alive_timer_closes_idle_connections_and_spares_busy_ones(timer_mode):
    async with hypercorn_on(slow_app, keep_alive_timeout=0.4) as port:
        # opened, nothing sent: closed by the timer started with the connection
        async with await trio.open_tcp_stream("127.0.0.1", port) as silent:
            assert 0.3 <= await eof_after(silent) < 2.0
        # a response longer than the timeout is not cut (the request stopped the timer), and the
        # timer starts again after it
        async with await trio.open_tcp_stream("127.0.0.1", port) as busy:
            assert b"tick\n" in await get(busy, "/slow")
            assert b"done\n" in await get(busy, "/fast")  # still open: keep-alive
            assert 0.3 <= await eof_after(busy) < 2.0
