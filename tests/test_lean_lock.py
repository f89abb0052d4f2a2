"""LeanLock keeps trio.Lock's rules (each test runs against both) and holds no parking lot while
nobody waits."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from proxy.server.lean_lock import LeanLock


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
