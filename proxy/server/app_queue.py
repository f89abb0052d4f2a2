"""hypercorn's per-request app queue (trio worker) as a small bounded queue, not a memory channel.

Why: for every request hypercorn 0.18 opens a `trio.open_memory_channel(max_app_queue_size)` to
hand the app its ASGI receive events (request body, `http.disconnect`). A channel's state is a
deque (one 64-slot block from the start), two OrderedDicts of waiting tasks and a set of tasks
per end: ~1.8 KB that every open stream keeps for its whole life, for a queue that holds at most
a few messages. `AppQueue` is the same queue in ~0.13 KB (both measured in tests/test_app_queue.py).

Semantics kept (those of the channel as hypercorn uses it: `send` for `app_put`, `receive` for
the app's `receive`; no closing, no clones, no statistics):
- FIFO, at most `size` items; `send` waits while full (so a slow app still throttles reading
  the request body), `receive` waits while empty; several receivers are served in arrival order;
- both are checkpoints, like a channel's: cancelled before doing anything if the scope already
  is; a wait is cancellable and a cancelled wait leaves the queue as it was (an item is never
  lost nor taken by a cancelled receiver: trio never calls an abort after a reschedule).

apply() replaces `hypercorn.trio.task_group.TaskGroup.spawn_app` (HTTP/1.1, h2 and websocket
streams alike) and refuses any hypercorn other than 0.18.x. `queue_of(receive)`: the queue behind
an app's `receive`, if it is one of these; its `nursery`, the connection's.
"""

from __future__ import annotations

from typing import Any, Callable

import outcome
import trio
from hypercorn.trio import task_group as _tg
from trio.lowlevel import (Abort, ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled,
                           current_task, reschedule, wait_task_rescheduled)

from proxy.server import hypercorn_version

SUPPORTED = ("0.18.",)

_original_spawn_app = _tg.TaskGroup.spawn_app


class AppQueue:
    __slots__ = ("_items", "_size", "_receivers", "_senders", "_watcher", "nursery")

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"an app queue holds at least one item, not {size}")
        self._items: list[Any] = []
        self._size = size
        self._receivers: list[trio.lowlevel.Task] | None = None  # made by the first wait
        self._senders: ParkingLot | None = None  # made when a sender first finds the queue full
        self._watcher: Callable[[Any], None] | None = None
        # The connection's nursery (hypercorn's TaskGroup: the app's task runs in it), where a
        # relay served from this queue starts its tasks (pump.ConnectionTasks).
        self.nursery: trio.Nursery | None = None

    def watch(self, watcher: Callable[[Any], None] | None) -> None:
        """Hand every item to `watcher(item)` as it comes, in the sender's task, instead of
        queueing it (first the items already queued); None: queue again. A relay's watchdog
        without a task of its own (pump.Relay, proxy/server/alarms.py): the client leaving
        (`http.disconnect`) reaches the stream at once, without a task waiting in `receive()`."""
        self._watcher = watcher
        if watcher is not None and self._items:
            items, self._items = self._items, []
            if self._senders:
                self._senders.unpark_all()
            for item in items:
                watcher(item)

    async def send(self, item: Any) -> None:
        await checkpoint_if_cancelled()
        while self._watcher is None and len(self._items) >= self._size:
            if self._senders is None:
                self._senders = ParkingLot()
            await self._senders.park()
        if self._watcher is not None:
            self._watcher(item)
        elif self._receivers:  # a receiver waits: the queue is empty, hand the item over
            reschedule(self._receivers.pop(0), outcome.Value(item))
        else:
            self._items.append(item)
        await cancel_shielded_checkpoint()

    async def receive(self) -> Any:
        await checkpoint_if_cancelled()
        if self._items:
            item = self._items.pop(0)
            if self._senders:
                self._senders.unpark()
            await cancel_shielded_checkpoint()
            return item
        task = current_task()
        if self._receivers is None:
            self._receivers = []
        self._receivers.append(task)

        def abort(_: Any) -> Abort:
            self._receivers.remove(task)
            return Abort.SUCCEEDED

        return await wait_task_rescheduled(abort)


def queue_of(receive: Any) -> AppQueue | None:
    """The AppQueue whose `receive` this is (the app's ASGI receive under serve.py), else None."""
    queue = getattr(receive, "__self__", None)
    return queue if type(queue) is AppQueue else None


async def _spawn_app(self: _tg.TaskGroup, app, config, scope, send):
    queue = AppQueue(config.max_app_queue_size)
    queue.nursery = self._nursery
    self._nursery.start_soon(_tg._handle, app, config, scope, queue.receive, send,
                             trio.to_thread.run_sync, trio.from_thread.run)
    return queue.send


def apply() -> None:
    hypercorn_version.require(SUPPORTED, "app_queue", "trio/task_group.py TaskGroup.spawn_app")
    _tg.TaskGroup.spawn_app = _spawn_app


def revert() -> None:
    _tg.TaskGroup.spawn_app = _original_spawn_app
