"""hypercorn's keep-alive timer (trio worker) without its scheduler round trips.

Why: every connection's keep-alive timer is a `TrioSingleTask`: `restart()` when the connection
opens (and after each response), `stop()` when a request begins. Stock, `restart()` takes a
`trio.Lock` (one scheduler round) and starts the timer task with `nursery.start()` (two more:
the new task's first step, then the caller's wake-up), and `stop()` takes the lock again (one
more). A new connection's first request thus waits four rounds before the app sees it; under
load a round is a turn of every other stream (bench.md, 2h), so those rounds are most of what a
new stream's first token waits for beyond the provider.

What this changes (two methods of `hypercorn.trio.worker_context.TrioSingleTask`):
- the lock is taken with `acquire_nowait()`; if it is held (a stock restart is parked in it) the
  stock method runs instead, so calls still never overlap;
- the timer task is started with `start_soon()` inside a cancel scope made here, not by the task
  (stock: the task makes it and hands it back through `task_status.started`). Cancelling that
  scope before the task ran is the same as cancelling it after: the task's `with scope:` exits
  at its first checkpoint. So `stop()` and a second `restart()` behave as stock.
Neither method checkpoints any more; their callers (hypercorn's connection task) reach a socket
receive or send right after, which is a checkpoint.

apply() refuses any hypercorn other than 0.18.x (the internals above are 0.18's).
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio
from hypercorn.trio import worker_context as _wc

from proxy.server import hypercorn_version

SUPPORTED = ("0.18.",)

_original_restart = _wc.TrioSingleTask.restart
_original_stop = _wc.TrioSingleTask.stop


async def _run_in(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await action()


async def _restart(self: _wc.TrioSingleTask, task_group, action: Callable[[], Awaitable[None]]) -> None:
    try:
        self._lock.acquire_nowait()
    except trio.WouldBlock:
        return await _original_restart(self, task_group, action)
    try:
        if self._handle is not None:
            self._handle.cancel()
        scope = trio.CancelScope()
        task_group._nursery.start_soon(_run_in, scope, action)
        self._handle = scope
    finally:
        self._lock.release()


async def _stop(self: _wc.TrioSingleTask) -> None:
    try:
        self._lock.acquire_nowait()
    except trio.WouldBlock:
        return await _original_stop(self)
    try:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
    finally:
        self._lock.release()


def apply() -> None:
    hypercorn_version.require(SUPPORTED, "idle_timer", "trio/worker_context.py TrioSingleTask")
    _wc.TrioSingleTask.restart = _restart
    _wc.TrioSingleTask.stop = _stop


def revert() -> None:
    _wc.TrioSingleTask.restart = _original_restart
    _wc.TrioSingleTask.stop = _original_stop
