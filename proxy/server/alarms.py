"""One timer task for the watchdog alarms of every open stream, instead of a watchdog task each.

Why: a stream's watchdog (proxy/server/pump.py) waits for two things: the client leaving, and its
alarm (a write pending past `write_timeout`, a keep-alive comment due). As a task per stream that
is ~2.6 KiB of every held stream (the task, its coroutine frames, its alarm's cancel scope, its
wait in the app queue) for one wake-up every ~10 s. The client leaving now comes by callback from
the request's app queue (`AppQueue.watch`), and the alarms of all streams live here: one heap, one
task, one cancel scope whose deadline is the earliest alarm.

Rules:
- `set(relay, due)`: `relay.alarm(now)` is called once `due` has passed (never before it), in
  this task; it must not block or raise, and returns when to call it next, or None.
- A relay has at most one live entry: it is set when it starts, then only from its own alarm.
  `cancel(ticket)` drops the entry's reference to its relay when the relay ends (the entry itself
  goes when due, or sooner: the heap is rebuilt when dead entries outnumber live ones), so the heap
  is bounded by about twice the open streams and holds no ended stream.
- Alarms ring no earlier than due and, on a busy loop, a scheduler round or so late: the same as
  a deadline of a watchdog's own cancel scope.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import Protocol

import trio

log = logging.getLogger("proxy.server.alarms")


class Alarmed(Protocol):
    def alarm(self, now: float) -> float | None: ...


class Alarms:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[Alarmed | None]]] = []
        self._order = itertools.count()  # ties: first set, first rung (never compares relays)
        self._dead = 0  # entries whose relay ended
        self._scope: trio.CancelScope | None = None
        self.running = False  # `run` is serving: a relay may rely on it (else it keeps its own watchdog)

    def __len__(self) -> int:
        return len(self._heap) - self._dead

    def set(self, relay: Alarmed, due: float) -> list[Alarmed | None]:
        """Ring `relay.alarm` once `due` has passed; returns the ticket for `cancel`."""
        ticket = [relay]
        self._push(due, ticket)
        return ticket

    def cancel(self, ticket: list[Alarmed | None]) -> None:
        if ticket[0] is not None:
            ticket[0] = None
            self._dead += 1
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if entry[2][0] is not None]
                heapq.heapify(self._heap)
                self._dead = 0

    def _push(self, due: float, ticket: list[Alarmed | None]) -> None:
        heapq.heappush(self._heap, (due, next(self._order), ticket))
        if self._scope is not None and due < self._scope.deadline:
            self._scope.deadline = due

    async def run(self, until: trio.Event) -> None:
        """Ring alarms until `until` is set."""
        self.running = True
        try:
            while not until.is_set():
                self._ring(trio.current_time())
                with trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf) as self._scope:
                    await until.wait()
                self._scope = None
        finally:
            self.running = False
            self._scope = None

    def _ring(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, ticket = heapq.heappop(heap)
            relay = ticket[0]
            if relay is None:
                self._dead -= 1
                continue
            try:
                due = relay.alarm(now)
            except Exception:  # a bug in one stream's alarm must not stop everyone's
                log.exception("alarm failed")
                due = None
            if due is None:
                ticket[0] = None
            else:
                heapq.heappush(heap, (due, next(self._order), ticket))
