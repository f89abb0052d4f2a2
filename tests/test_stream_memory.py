"""Memory a held stream keeps (headers not yet sent, the first token far away): what lives for
the stream's whole wait is what 10,000 held streams multiply (bench.md, 2b)."""

import tracemalloc

import trio

from proxy.server import pump

HELD = 200


class Client:
    """ASGI send/receive of a client that stays: receive() waits until the test ends."""

    def __init__(self):
        self.messages = []

    async def send(self, message):
        self.messages.append(message)

    async def receive(self):
        await trio.sleep_forever()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


def relay_for(client: Client) -> pump.Relay:
    return pump.Relay(client.send, client.receive, write_timeout=10.0, buffer=4, keepalive_interval=15.0)


async def test_a_held_stream_has_no_writer_task_until_something_goes_through_the_channel():
    client = Client()
    relay = relay_for(client)
    first_token = trio.Event()

    async def produce(outlet):
        await first_token.wait()
        await outlet.put(b"data: 0\n\n")  # the reader writes the first bytes itself
        await outlet.put(b"data: 1\n\n")  # through the channel: the writer starts here

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run, produce)
        await trio.testing.wait_all_tasks_blocked()
        assert relay._nursery is not None
        assert [task.name.rsplit(".", 1)[-1] for task in relay._nursery.child_tasks] == ["_watch"]
        first_token.set()
    assert client.body == b"data: 0\n\ndata: 1\n\n"
    assert client.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert relay.outcome == "ok" and relay.state is pump.StreamState.FINISHED


async def test_a_held_stream_keeps_under_ten_kib_in_the_relay():
    """A held stream's relay with the task that runs it: the task, the relay, its nursery, the
    watchdog and its alarm, the reader's abort scope: ~7.9 KiB. With the channel and the writer
    made up front it was ~12.9 KiB."""
    first_token = trio.Event()
    clients = [Client() for _ in range(HELD)]

    async def produce(outlet):
        await first_token.wait()
        await outlet.put(b"data: 0\n\n")

    async def one(client):
        await relay_for(client).run(produce)

    async with trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for client in clients:
                nursery.start_soon(one, client)
            await trio.testing.wait_all_tasks_blocked()
            per_stream = (tracemalloc.get_traced_memory()[0] - before) / HELD
        finally:
            tracemalloc.stop()
        first_token.set()
    assert per_stream < 10 * 1024, per_stream
    assert all(client.body == b"data: 0\n\n" for client in clients)
