"""ConnectionTasks keeps a nursery's rules for a stream's tasks run in its connection's nursery
(autojump clock: exact times)."""

from __future__ import annotations

import pytest
import trio

from proxy.server.connection_tasks import ConnectionTasks


async def test_tasks_run_in_the_connections_nursery_and_leaving_waits_for_them(autojump_clock):
    ended = []

    async def task(name: str, seconds: float) -> None:
        await trio.sleep(seconds)
        ended.append((name, trio.current_time()))

    async with trio.open_nursery() as connection:
        async with ConnectionTasks(connection, trio.CancelScope()) as tasks:
            tasks.start_soon(task, "a", 5.0)
            tasks.start_soon(task, "b", 2.0)
            await trio.sleep(0)
            assert tasks.running == 2
            assert sorted(t.name.rsplit(".", 1)[-1] for t in connection.child_tasks) == ["task", "task"]
        assert trio.current_time() == 5.0 and tasks.running == 0
    assert ended == [("b", 2.0), ("a", 5.0)]


async def test_a_task_started_while_leaving_is_waited_for_too(autojump_clock):
    async with trio.open_nursery() as connection:
        async with ConnectionTasks(connection, trio.CancelScope()) as tasks:

            async def first() -> None:
                await trio.sleep(1.0)
                tasks.start_soon(trio.sleep, 3.0)

            tasks.start_soon(first)
        assert trio.current_time() == 4.0


async def test_cancel_ends_every_task_and_the_reader_and_is_seen_by_later_tasks(autojump_clock):
    reader = trio.CancelScope()
    outcomes = []

    async def task() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            outcomes.append(trio.current_time())
            raise

    async with trio.open_nursery() as connection:
        async with ConnectionTasks(connection, reader) as tasks:
            tasks.start_soon(task)
            with reader:
                await trio.sleep(1.0)
                tasks.cancel_scope.cancel()
                await trio.sleep(10.0)  # the reader is cancelled here
            assert reader.cancelled_caught and tasks.cancel_scope.cancel_called
            tasks.start_soon(task)  # after the cancel: cancelled at once
    assert outcomes == [1.0, 1.0]
    assert trio.current_time() == 1.0


async def test_a_task_error_cancels_the_rest_and_is_raised_on_leaving(autojump_clock):
    reader = trio.CancelScope()

    async def broken() -> None:
        await trio.sleep(1.0)
        raise ValueError("a bug")

    async with trio.open_nursery() as connection:
        with pytest.raises(ValueError, match="a bug"):
            async with ConnectionTasks(connection, reader) as tasks:
                tasks.start_soon(broken)
                tasks.start_soon(trio.sleep_forever)
                with reader:
                    await trio.sleep_forever()
        assert reader.cancelled_caught and tasks.running == 0
    assert trio.current_time() == 1.0


async def test_a_task_error_never_reaches_the_connections_nursery(autojump_clock):
    async def broken() -> None:
        raise ValueError("a bug")

    async with trio.open_nursery() as connection:
        connection.start_soon(trio.sleep, 2.0)  # the connection's own work goes on
        with pytest.raises(ValueError):
            async with ConnectionTasks(connection, trio.CancelScope()) as tasks:
                tasks.start_soon(broken)
                await trio.sleep(0.5)
    assert trio.current_time() == 2.0


async def test_the_body_failing_cancels_the_tasks_and_its_error_goes_on(autojump_clock):
    cancelled = []

    async def task() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(trio.current_time())

    async with trio.open_nursery() as connection:
        with pytest.raises(KeyError):
            async with ConnectionTasks(connection, trio.CancelScope()) as tasks:
                tasks.start_soon(task)
                await trio.sleep(1.0)
                raise KeyError("body")
        assert cancelled == [1.0]


async def test_cancelled_from_outside_the_tasks_end_before_the_block_is_left(autojump_clock):
    order = []

    async def slow_to_end() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(3.0)  # e.g. a shielded socket write finishing
            order.append(("task ended", trio.current_time()))

    async with trio.open_nursery() as connection:
        with trio.move_on_after(1.0):
            try:
                async with ConnectionTasks(connection, trio.CancelScope()) as tasks:
                    tasks.start_soon(slow_to_end)
                    # the body ends at once: leaving waits for the task, and that wait is cancelled
            finally:
                order.append(("left", trio.current_time()))
    assert order == [("task ended", 4.0), ("left", 4.0)]


async def test_the_connection_being_cancelled_reaches_the_tasks(autojump_clock):
    async def task() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as connection:
        async def stream() -> None:
            async with ConnectionTasks(connection, trio.CancelScope()) as tasks:
                tasks.start_soon(task)

        connection.start_soon(stream)
        await trio.sleep(1.0)
        connection.cancel_scope.cancel()  # the server shutting down
    assert trio.current_time() == 1.0
