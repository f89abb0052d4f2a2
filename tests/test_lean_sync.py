"""LeanLock keeps trio.Lock's rules and LeanEvent hypercorn's EventWrapper's (each test runs
against both), and neither holds its trio parts while nobody waits."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from proxy.server.lean_sync import LeanEvent, LeanLock


@pytest.fixture(params=[trio.Lock, LeanLock], ids=["trio.Lock", "LeanLock"])
def make_lock(request):
    return request.param


async def test_acquire_release_and_the_misuse_errors(make_lock):
    lock = make_lock()
    assert not lock.locked()
    async with lock:
        assert lock.locked()
        with pytest.raises(RuntimeError):
            lock.acquire_nowait()  # re-acquire by the owner
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()  # not held
    lock.acquire_nowait()

    async def other() -> None:
        with pytest.raises(trio.WouldBlock):
            lock.acquire_nowait()
        with pytest.raises(RuntimeError):
            lock.release()  # held by another task

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
    lock.release()


async def test_waiters_get_the_lock_in_arrival_order(make_lock):
    lock = make_lock()
    order = []

    async def worker(name: str) -> None:
        async with lock:
            order.append(name)
            await trio.sleep(0.01)

    await lock.acquire()
    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(worker, name)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert order == ["a", "b", "c"]
    assert not lock.locked()
    if isinstance(lock, LeanLock):
        assert lock._lot is None  # lean again once nobody waits


async def test_a_freed_lock_is_not_taken_ahead_of_a_woken_waiter(make_lock):
    lock = make_lock()
    await lock.acquire()
    got = []

    async def waiter() -> None:
        async with lock:
            got.append("waiter")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        lock.release()  # handed to the waiter, not free
        with pytest.raises(trio.WouldBlock):
            lock.acquire_nowait()
    assert got == ["waiter"]


async def test_a_cancelled_waiter_leaves_the_line(make_lock):
    lock = make_lock()
    await lock.acquire()
    cancelled = []

    async def waiter() -> None:
        with trio.move_on_after(0.01) as scope:
            await lock.acquire()
        cancelled.append(scope.cancelled_caught)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
    assert cancelled == [True]
    lock.release()
    assert not lock.locked()
    if isinstance(lock, LeanLock):
        assert lock._lot is None
    await lock.acquire()  # free for anyone
    lock.release()


async def test_acquire_is_a_checkpoint_even_when_free(make_lock):
    lock = make_lock()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await lock.acquire()
    assert not lock.locked()
    with trio.testing.assert_checkpoints():
        await lock.acquire()
    lock.release()


async def test_an_owner_exiting_with_the_lock_breaks_the_wait(make_lock):
    lock = make_lock()
    holding = trio.Event()

    async def owner_that_dies() -> None:
        await lock.acquire()
        holding.set()
        await trio.sleep(0.01)  # exits holding it

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner_that_dies)
        await holding.wait()
        with pytest.raises(trio.BrokenResourceError, match="exited without releasing"):
            await lock.acquire()


async def test_an_owner_that_exited_before_anyone_waited_breaks_the_next_acquire(make_lock):
    lock = make_lock()

    async def owner_that_dies() -> None:
        await lock.acquire()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner_that_dies)
    with pytest.raises(trio.BrokenResourceError):
        await lock.acquire()


async def test_an_uncontended_lean_lock_holds_no_parking_lot():
    lock = LeanLock()
    for _ in range(3):
        async with lock:
            assert lock._lot is None
    assert lock._lot is None


# -- LeanEvent: hypercorn's trio EventWrapper, run against both --

@pytest.fixture(params=["EventWrapper", "LeanEvent"])
def make_event(request):
    from hypercorn.trio.worker_context import EventWrapper
    return EventWrapper if request.param == "EventWrapper" else LeanEvent


async def test_an_event_wakes_every_waiter_and_a_set_event_does_not_block(make_event, autojump_clock):
    event = make_event()
    woken = []

    async def waiter(name: str) -> None:
        await event.wait()
        woken.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "a")
        nursery.start_soon(waiter, "b")
        await trio.sleep(1.0)
        assert not event.is_set() and woken == []
        await event.set()
    assert sorted(woken) == [("a", 1.0), ("b", 1.0)] and event.is_set()
    with trio.testing.assert_checkpoints():
        await event.wait()  # set: returns at once, still a checkpoint


async def test_clear_starts_a_new_event(make_event, autojump_clock):
    event = make_event()
    await event.set()
    await event.clear()
    assert not event.is_set()
    with trio.move_on_after(1.0) as scope:
        await event.wait()
    assert scope.cancelled_caught  # cleared: waits again
    async with trio.open_nursery() as nursery:
        nursery.start_soon(event.wait)
        await trio.sleep(0.5)
        await event.set()
    assert trio.current_time() == 1.5


async def test_a_lean_event_nobody_waited_on_holds_no_trio_event():
    event = LeanEvent()
    await event.set()
    await event.clear()
    await event.set()
    await event.wait()
    assert event._event is None
