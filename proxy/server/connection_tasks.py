"""A stream's tasks as tasks of its connection's nursery, joined by the stream: a nursery's rules
without a nursery per stream.

Why: a relay (proxy/server/pump.py) starts a writer task with its first channel item, and a task
for a keep-alive written before it; under serve.py it has no other task. A nursery of its own
costs every stream, held or not, ~1.1 KB for its whole life (the nursery and its manager, a
children set, a cancel scope whose status keeps two sets). The connection already has a nursery:
hypercorn's per-connection TaskGroup, the one the request's task runs in (app_queue.py hands it
over). `ConnectionTasks` starts the stream's tasks there, each under a cancel scope of its own
(made when the task starts, so a held stream pays for none), and keeps the rules the stream's
nursery gave it:
- `async with ConnectionTasks(...)` around the reader; leaving waits until every task started
  in it has ended (a task started while it waits is waited for too);
- `cancel_scope.cancel()` (the object is its own `cancel_scope`) cancels every task and the
  reader's scope (`reader`: the body has no scope of its own here) and is seen by tasks started
  after it (`cancel_called`);
- the body failing (or being cancelled from outside) cancels the tasks before waiting; a wait
  cancelled from outside still waits, shielded, for the cancelled tasks to end, then re-raises;
- a task's error (an Exception, i.e. a bug) cancels the rest and is raised when the block is
  left, as the nursery would; a task's own cancellation ends it quietly; a cancellation from
  the connection's nursery (the server shutting down) travels on, as it would have.
A task cannot outlive the stream, and an error cannot escape into the connection's nursery.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger("proxy.server.connection_tasks")


class ConnectionTasks:
    __slots__ = ("_nursery", "_reader", "_scopes", "_joined", "_error", "cancel_called")

    def __init__(self, nursery: trio.Nursery, reader: trio.CancelScope):
        self._nursery = nursery
        self._reader = reader
        self._scopes: list[trio.CancelScope] = []  # one per running task
        self._joined: trio.Event | None = None  # made when the block is left while tasks run
        self._error: Exception | None = None
        self.cancel_called = False

    @property
    def cancel_scope(self) -> ConnectionTasks:
        """As a nursery's: `cancel_scope.cancel()`, `cancel_scope.cancel_called`."""
        return self

    @property
    def running(self) -> int:
        """Tasks started here that have not ended."""
        return len(self._scopes)

    def cancel(self) -> None:
        self.cancel_called = True
        self._reader.cancel()
        for scope in self._scopes:
            scope.cancel()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        scope = trio.CancelScope()
        if self.cancel_called:
            scope.cancel()
        self._scopes.append(scope)
        self._nursery.start_soon(self._task, scope, fn, args, name=fn)

    async def _task(self, scope: trio.CancelScope, fn: Callable[..., Awaitable[Any]], args: tuple) -> None:
        try:
            with scope:
                await fn(*args)
        except Exception as error:
            if self._error is None:
                self._error = error
            else:
                log.error("a stream task failed as well", exc_info=error)
            self.cancel()
        finally:
            self._scopes.remove(scope)
            if not self._scopes and self._joined is not None:
                self._joined.set()

    async def __aenter__(self) -> ConnectionTasks:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if self._scopes:
            if exc is not None:
                self.cancel()
            joined = self._joined = trio.Event()
            try:
                await joined.wait()
            except trio.Cancelled:
                self.cancel()
                with trio.CancelScope(shield=True):
                    await joined.wait()
                raise
        error, self._error = self._error, None
        if error is not None:
            if exc is None:
                raise error
            log.error("a stream task failed while the stream was ending", exc_info=error)
        return False
