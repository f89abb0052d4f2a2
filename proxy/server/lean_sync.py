"""`trio.Lock` and hypercorn's event, with their trio parts made only when a task has to wait.

Why: hypercorn keeps sync objects per connection and per HTTP/2 stream that are almost never
waited on but live as long as the connection or stream: the TCPServer's send lock and its idle
timer's lock (a trio.Lock is the lock, a ParkingLot and the lot's OrderedDict, ~240 bytes
each), H11Protocol's `can_read` and each h2 stream buffer's two events (hypercorn's EventWrapper
around a trio.Event, whose task set alone is 216 bytes: ~0.35 KB each). And each uncontended
trio.Lock acquire/release registers and unregisters the owner as the lot's breaker (a dict
insert and a removal, plus a coroutine-state check), which hypercorn_fast's send path pays once
per written event.

`LeanLock`: the same rules as trio.Lock (trio/_sync.py, _LockImpl): FIFO hand-over to waiters;
`acquire()` is a checkpoint either way; re-acquiring raises RuntimeError, as does releasing a
lock one does not hold; an owner that exits while others wait (or before someone starts
waiting) breaks the wait with BrokenResourceError. The owner is registered as the lot's breaker
only while a lot exists, i.e. while someone waits: that is the only time a breaker has anyone
to wake.

`LeanEvent`: hypercorn's trio `EventWrapper` (async `set`, `clear`, `wait`, and `is_set`), the
same semantics, `clear` included: it starts a new event, so a task still waiting on the old one
is not woken by a later `set` (hypercorn only clears an event nobody waits on).
"""

from __future__ import annotations

from types import TracebackType

import trio
from trio.lowlevel import (ParkingLot, add_parking_lot_breaker, cancel_shielded_checkpoint,
                           checkpoint_if_cancelled, current_task, enable_ki_protection,
                           remove_parking_lot_breaker)


class LeanLock:
    __slots__ = ("_owner", "_lot")

    def __init__(self) -> None:
        self._owner: trio.lowlevel.Task | None = None
        self._lot: ParkingLot | None = None  # only while a task waits (or waited and was woken)

    def locked(self) -> bool:
        return self._owner is not None

    @enable_ki_protection
    def acquire_nowait(self) -> None:
        task = current_task()
        if self._owner is task:
            raise RuntimeError("attempt to re-acquire an already held Lock")
        if self._owner is None and not self._lot:
            self._owner = task
        else:
            raise trio.WouldBlock

    @enable_ki_protection
    async def acquire(self) -> None:
        await checkpoint_if_cancelled()
        try:
            self.acquire_nowait()
        except trio.WouldBlock:
            pass
        else:
            await cancel_shielded_checkpoint()
            return
        lot = self._lot
        if lot is None:
            lot = self._lot = ParkingLot()
            try:
                add_parking_lot_breaker(self._owner, lot)
            except trio.BrokenResourceError:  # the owner exited holding the lock
                lot.break_lot(self._owner)
        try:
            await lot.park()  # the releasing owner hands the lock over (release)
        except trio.BrokenResourceError:
            raise trio.BrokenResourceError(
                f"Owner of this lock exited without releasing: {self._owner}") from None

    @enable_ki_protection
    def release(self) -> None:
        task = current_task()
        if task is not self._owner:
            raise RuntimeError("can't release a Lock you don't own")
        lot = self._lot
        if lot is None:
            self._owner = None
            return
        remove_parking_lot_breaker(task, lot)
        if lot:
            (self._owner,) = lot.unpark(count=1)
            add_parking_lot_breaker(self._owner, lot)
        else:  # its waiters left (cancelled): lean again
            self._owner = None
            self._lot = None

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class LeanEvent:
    __slots__ = ("_flag", "_event")

    def __init__(self) -> None:
        self._flag = False
        self._event: trio.Event | None = None  # only while a task waits (or waited)

    async def clear(self) -> None:
        self._flag = False
        self._event = None

    async def wait(self) -> None:
        if self._flag:
            await trio.lowlevel.checkpoint()  # as trio.Event.wait on a set event
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    async def set(self) -> None:
        self._flag = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._flag
