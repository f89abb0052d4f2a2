"""hypercorn's per-request app queue (proxy/server/app_queue.py): a memory channel's semantics as
hypercorn uses them, in a fraction of its memory."""

import tracemalloc

import pytest
import trio
import trio.testing

from proxy.server.app_queue import AppQueue


async def test_items_come_out_in_order_and_a_waiting_receiver_gets_the_next_one():
    queue = AppQueue(10)
    for i in range(3):
        await queue.send(i)
    assert [await queue.receive() for _ in range(3)] == [0, 1, 2]
    got = []

    async def receive():
        got.append(await queue.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        await queue.send("a")
        await queue.send("b")
    assert got == ["a", "b"]  # receivers served in arrival order, each item once


async def test_a_full_queue_holds_the_sender_until_an_item_is_taken():
    queue = AppQueue(2)
    await queue.send(1)
    await queue.send(2)
    sent = trio.Event()

    async def send_third():
        await queue.send(3)
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_third)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()  # bounded: a slow app throttles the request body's reader
        assert await queue.receive() == 1
        await sent.wait()
    assert [await queue.receive(), await queue.receive()] == [2, 3]


async def test_a_cancelled_receive_takes_nothing_and_a_cancelled_send_puts_nothing():
    queue = AppQueue(1)
    with trio.move_on_after(1) as scope:
        await queue.receive()
    assert scope.cancelled_caught
    await queue.send("kept")  # the cancelled receiver is gone: the item waits in the queue
    with trio.move_on_after(1) as scope:
        await queue.send("dropped")  # full
    assert scope.cancelled_caught
    assert await queue.receive() == "kept"
    with trio.move_on_after(1) as scope:
        await queue.receive()
    assert scope.cancelled_caught  # "dropped" never went in


async def test_both_ends_are_checkpoints():
    queue = AppQueue(4)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await queue.send("never")  # cancelled before doing anything
    await queue.send(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await queue.receive()
    assert await queue.receive() == 1  # the item was not taken by the cancelled receive
    with trio.testing.assert_checkpoints():
        await queue.send(2)
    with trio.testing.assert_checkpoints():
        await queue.receive()


def test_a_queue_needs_room_for_one_item():
    with pytest.raises(ValueError, match="at least one"):
        AppQueue(0)


def test_an_idle_queue_is_a_small_fraction_of_a_memory_channel():
    def allocated(make) -> float:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = [make() for _ in range(200)]
            per_item = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
        finally:
            tracemalloc.stop()
        return per_item

    channel = allocated(lambda: trio.open_memory_channel(10))
    queue = allocated(lambda: AppQueue(10))
    assert queue * 5 < channel, (queue, channel)


async def test_a_watched_queue_hands_every_item_to_its_watcher_at_once():
    queue = AppQueue(2)
    await queue.send("queued before")
    seen = []
    queue.watch(seen.append)
    assert seen == ["queued before"]  # what was queued goes first
    await queue.send("a")
    await queue.send("b")
    await queue.send("c")  # never full while watched: nothing is queued
    assert seen == ["queued before", "a", "b", "c"]
    queue.watch(None)
    await queue.send("queued after")
    assert await queue.receive() == "queued after"
    assert seen == ["queued before", "a", "b", "c"]


async def test_watching_releases_a_sender_waiting_on_a_full_queue():
    queue = AppQueue(1)
    await queue.send(1)
    seen = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.send, 2)
        await trio.testing.wait_all_tasks_blocked()
        queue.watch(seen.append)
    assert seen == [1, 2]
