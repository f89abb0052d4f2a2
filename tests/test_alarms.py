"""The process's alarms (proxy/server/alarms.py): every stream's watchdog alarm from one task."""

import trio
import trio.testing

from proxy.server.alarms import Alarms


class Recorder:
    """An alarmed thing: records when it rang, then asks again `every` seconds later, `times` times."""

    def __init__(self, name, rang, every=None, times=1):
        self.name, self.rang, self.every, self.times = name, rang, every, times

    def alarm(self, now):
        self.rang.append((self.name, now))
        self.times -= 1
        return now + self.every if self.every and self.times > 0 else None


async def test_alarms_ring_in_due_order_never_early_and_again_when_asked(autojump_clock, nursery):
    alarms, rang, stop = Alarms(), [], trio.Event()
    nursery.start_soon(alarms.run, stop)
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    alarms.set(Recorder("b", rang), start + 2)
    alarms.set(Recorder("a", rang, every=5, times=3), start + 1)
    alarms.set(Recorder("c", rang), start + 0.5)  # earlier than the task's current deadline
    await trio.sleep(20)
    assert [(name, round(at - start, 3)) for name, at in rang] == [
        ("c", 0.5), ("a", 1), ("b", 2), ("a", 6), ("a", 11)]
    assert len(alarms) == 0
    stop.set()


async def test_a_cancelled_alarm_never_rings_and_keeps_no_reference(autojump_clock, nursery):
    alarms, rang, stop = Alarms(), [], trio.Event()
    nursery.start_soon(alarms.run, stop)
    await trio.testing.wait_all_tasks_blocked()
    ticket = alarms.set(Recorder("gone", rang), trio.current_time() + 1)
    alarms.cancel(ticket)
    alarms.cancel(ticket)  # twice: no harm
    assert ticket == [None] and len(alarms) == 0
    await trio.sleep(2)
    assert rang == []
    stop.set()


async def test_dead_entries_are_dropped_long_before_they_are_due(autojump_clock):
    alarms = Alarms()
    far = trio.current_time() + 3600
    tickets = [alarms.set(Recorder(i, []), far) for i in range(200)]
    for ticket in tickets[:150]:
        alarms.cancel(ticket)
    assert len(alarms) == 50 and len(alarms._heap) < 120  # rebuilt: the heap stays near the live count


async def test_a_failing_alarm_does_not_stop_the_others(autojump_clock, nursery, caplog):
    class Broken:
        def alarm(self, now):
            raise RuntimeError("bug")

    alarms, rang, stop = Alarms(), [], trio.Event()
    nursery.start_soon(alarms.run, stop)
    await trio.testing.wait_all_tasks_blocked()
    alarms.set(Broken(), trio.current_time() + 1)
    alarms.set(Recorder("ok", rang), trio.current_time() + 2)
    await trio.sleep(3)
    assert [name for name, _ in rang] == ["ok"]
    assert "alarm failed" in caplog.text
    stop.set()


async def test_running_only_while_run_serves(autojump_clock, nursery):
    alarms, stop = Alarms(), trio.Event()
    assert not alarms.running
    nursery.start_soon(alarms.run, stop)
    await trio.testing.wait_all_tasks_blocked()
    assert alarms.running
    stop.set()
    await trio.testing.wait_all_tasks_blocked()
    assert not alarms.running
