"""What the pump costs per relayed event, counted with trio's own instrumentation.

Rules of the count:
- Tasks spawned and scheduler steps come from a `trio.abc.Instrument` (`task_spawned`,
  `before_task_step`). Cancel scopes created and entered, and deadlines moved (the `deadline`
  and `relative_deadline` setters), come from wrappers monkeypatched onto `trio.CancelScope` for
  the test only: every trio timeout (`move_on_after`, `fail_after`, `sleep`) and every nursery
  goes through that constructor, and every deadline change through those setters.
- Only the steady part of a stream is counted: from an idle moment after the headers and
  `WARMUP` events went out, to an idle moment after the last of `EVENTS` events was written.
  Each event arrives alone (`SPACING` virtual seconds apart), so none are joined into one write.
- The provider is a pacer task that hands the producer one event per `SPACING` over a rendezvous
  channel; it stands in for the socket the producer would wait on, so its steps and its sleeps'
  cancel scopes are not the pump's and are not counted. The client's `send` records the message
  and checkpoints: hypercorn's shielded write is the server's cost, not the pump's.
- The watchdog's lazy alarm wakes by time, not by event: at most once per
  `min(write_timeout, keepalive_interval)`, each wake-up one scope, a few steps. The bounds
  allow exactly that and nothing per event.
- Each bound has a negative control below: a Relay that brings back one per-event overhead,
  which must break that bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import trio

from proxy.core.sse import DONE, encode_event
from proxy.server.pump import KEEPALIVE as KEEPALIVE_COMMENT, Relay

EVENTS = 200
WARMUP = 10
SPACING = 0.25  # virtual seconds between events: 200 events = 50 s
OFFSET = SPACING / 2  # events never land on the same instant as a watchdog alarm
WRITE_TIMEOUT = 10.0
KEEPALIVE = 15.0
# Measured on today's pump (reader: wake on the upstream, `put` without a yield; writer: wake on
# the channel, client send) and on its watchdog (one step per alarm). Bounds, not estimates: a
# single extra step per event breaks them (a plain `channel.send` in the producer does).
STEPS_PER_EVENT = 3
STEPS_PER_ALARM = 1


class LeanClient:
    """ASGI send/receive that adds no scope and no task of its own: a send is one checkpoint."""

    def __init__(self):
        self.messages = []
        self._inbox_send, self._inbox = trio.open_memory_channel(1)

    async def send(self, message):
        self.messages.append(message)
        await trio.lowlevel.checkpoint()

    async def receive(self):
        return await self._inbox.receive()


@dataclass(frozen=True)
class Costs:
    events: int
    seconds: float
    tasks_spawned: int
    scopes_created: int
    scopes_entered: int
    deadlines_moved: int
    steps: int


class Counter(trio.abc.Instrument):
    """Counts while `counting`, for every task but the ignored ones (the pacer)."""

    def __init__(self):
        self.counting = False
        self.ignored: set[trio.lowlevel.Task] = set()
        self.counts = dict.fromkeys(
            ["tasks_spawned", "scopes_created", "scopes_entered", "deadlines_moved", "steps"], 0)

    def note(self, what: str) -> None:
        if self.counting and trio.lowlevel.current_task() not in self.ignored:
            self.counts[what] += 1

    def task_spawned(self, task):  # any task at all (the pacer spawns none)
        if self.counting:
            self.counts["tasks_spawned"] += 1

    def before_task_step(self, task):
        if self.counting and task not in self.ignored:
            self.counts["steps"] += 1


@pytest.fixture
def counter(monkeypatch):
    counter = Counter()
    scope = trio.CancelScope
    init, enter = scope.__init__, scope.__enter__
    deadline, relative = scope.deadline, scope.relative_deadline

    def counted(what, function):
        def wrapper(*args, **kwargs):
            counter.note(what)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(scope, "__init__", counted("scopes_created", init))
    monkeypatch.setattr(scope, "__enter__", counted("scopes_entered", enter))
    monkeypatch.setattr(scope, "deadline",
                        property(deadline.fget, counted("deadlines_moved", deadline.fset)))
    monkeypatch.setattr(scope, "relative_deadline",
                        property(relative.fget, counted("deadlines_moved", relative.fset)))
    return counter


def event(i: int) -> bytes:
    return encode_event(b'{"i": %d}' % i)


async def measure(counter: Counter, relay_class: type[Relay] = Relay) -> Costs:
    """Relay WARMUP + EVENTS + DONE, spaced in virtual time; count the EVENTS part."""
    client = LeanClient()
    relay = relay_class(client.send, client.receive, write_timeout=WRITE_TIMEOUT, buffer=4,
                        keepalive_interval=KEEPALIVE)
    upstream_send, upstream = trio.open_memory_channel(0)
    window = []

    async def produce(outlet):  # as the endpoints' producer: Outlet.put
        async for item in upstream:
            await outlet.put(item)

    async def pace():  # the provider: one event per SPACING
        counter.ignored.add(trio.lowlevel.current_task())
        async with upstream_send:
            await trio.sleep(OFFSET)
            for i in range(WARMUP + EVENTS):
                if i == WARMUP:  # idle: the previous event is written, everyone waits
                    assert client.messages[0]["type"] == "http.response.start"
                    window.append(trio.current_time())
                    counter.counting = True
                await upstream_send.send(event(i))
                await trio.sleep(SPACING)
            counter.counting = False  # idle again: the last event was written
            window.append(trio.current_time())
            await upstream_send.send(DONE)

    trio.lowlevel.add_instrument(counter)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pace)
            await relay.run(produce)
    finally:
        trio.lowlevel.remove_instrument(counter)
    body = b"".join(m.get("body", b"") for m in client.messages if m["type"] == "http.response.body")
    assert body == b"".join(event(i) for i in range(WARMUP + EVENTS)) + DONE
    assert relay.outcome == "ok"
    return Costs(events=EVENTS, seconds=window[1] - window[0], **counter.counts)


def over_budget(costs: Costs) -> set[str]:
    """The bounds a measured stream breaks. The window starts and ends between alarms, so it holds
    at most ceil(seconds / period) of them."""
    alarms = math.ceil(costs.seconds / min(WRITE_TIMEOUT, KEEPALIVE))
    within = {
        "tasks": costs.tasks_spawned == 0,
        "scopes": costs.scopes_created <= alarms and costs.scopes_entered <= alarms,
        "deadlines": costs.deadlines_moved == 0,
        "steps": costs.steps <= STEPS_PER_EVENT * costs.events + STEPS_PER_ALARM * alarms,
    }
    return {bound for bound, ok in within.items() if not ok}


def per_event(costs: Costs) -> str:
    return ", ".join(f"{name} {getattr(costs, name) / costs.events:.3f}"
                     for name in ["tasks_spawned", "scopes_created", "scopes_entered",
                                  "deadlines_moved", "steps"]) + " per event"


async def test_a_relayed_event_costs_no_task_no_scope_no_deadline_and_four_steps(counter,
                                                                                 autojump_clock):
    costs = await measure(counter)
    assert costs.seconds == EVENTS * SPACING
    assert over_budget(costs) == set(), (costs, per_event(costs))


# -- negative controls: each brings back one per-event overhead, which its bound must catch --


class TimedWait:
    """A receive channel whose `receive()` gives up after `seconds` with a keep-alive comment."""

    def __init__(self, channel: trio.MemoryReceiveChannel, seconds: float):
        self._channel = channel
        self._seconds = seconds

    def receive_nowait(self):
        return self._channel.receive_nowait()

    async def receive(self):
        with trio.move_on_after(self._seconds):
            return await self._channel.receive()
        return KEEPALIVE_COMMENT

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self._channel.aclose()


class ScopePerWait(Relay):
    """Keep-alive by a timeout around each wait for the next event: a cancel scope per event."""

    async def _write(self, channel):
        await super()._write(TimedWait(channel, self._keepalive))


class DeadlinePerWrite(Relay):
    """One long-lived write guard whose deadline is moved around each write: two moves per event."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard = trio.CancelScope()

    async def _write(self, channel):
        with self._guard:
            await super()._write(channel)

    async def _out(self, data, **kwargs):
        self._guard.deadline = trio.current_time() + self._write_timeout
        await super()._out(data, **kwargs)
        self._guard.deadline = math.inf


class TaskPerWrite(Relay):
    """A task per write (say, to record it), in a nursery opened once around the writer."""

    async def _write(self, channel):
        async with trio.open_nursery() as self._spare:
            await super()._write(channel)

    async def _out(self, data, **kwargs):
        if hasattr(self, "_spare"):  # the reader's first write comes before the writer starts
            self._spare.start_soon(self._note, len(data))
        await super()._out(data, **kwargs)

    async def _note(self, size):
        pass


class StepPerWrite(Relay):
    """A `sleep(0)` per write ("let the others run"): one scheduler step per event, nothing else."""

    async def _out(self, data, **kwargs):
        await trio.sleep(0)
        await super()._out(data, **kwargs)


@pytest.mark.parametrize("relay_class, broken", [
    (ScopePerWait, {"scopes"}),
    (DeadlinePerWrite, {"deadlines"}),
    (TaskPerWrite, {"tasks", "steps"}),  # the task's own step is counted too
    (StepPerWrite, {"steps"}),
])
async def test_the_bounds_catch_a_per_event_overhead(counter, autojump_clock, relay_class, broken):
    costs = await measure(counter, relay_class)
    assert over_budget(costs) == broken, (costs, per_event(costs))
