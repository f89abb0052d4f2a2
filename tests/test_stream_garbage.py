"""A finished stream is freed by reference counting alone: no reference cycle keeps its relay and
the objects around it waiting for the cyclic GC.

Such a cycle is easy to write (a bound method of an object the relay holds, stored on an object
the relay reaches) and costly under load: every finished stream's objects pile up until a
collection, collections run ~2.5x as often, and the full ones pause the event loop for tens of
milliseconds, which shows as TTFT p99 (bench.md, "A reference cycle per stream"). A real gateway
in this process, the fake provider beside it, a stream that ends cleanly, by a provider error
(mid-stream, or as a status before the first byte) or by the client leaving; the cyclic GC off
meanwhile: none of the stream's own objects may be left."""

from __future__ import annotations

import gc

import httpx
import pytest
import trio

from proxy.routing.failover import _StreamAttempt
from proxy.server.connection_tasks import ConnectionTasks
from proxy.server.endpoints import _StreamJob
from proxy.server.pump import Outlet, Relay
from .conftest import MASTER_KEY, chat_body

STREAM_TYPES = (Relay, Outlet, ConnectionTasks, _StreamJob, _StreamAttempt)


def left() -> list[str]:
    return sorted(type(o).__name__ for o in gc.get_objects() if type(o) in STREAM_TYPES)


@pytest.mark.parametrize("how", ["clean", "provider error mid-stream", "provider error status",
                                 "client leaves"])
async def test_a_finished_stream_is_freed_without_the_cyclic_gc(start_gateway, how):
    gw = await start_gateway()
    url = gw.v1 + "/chat/completions"
    prompt = {"clean": "Hello", "provider error mid-stream": 'fake: {"error_after": 2}',
              "provider error status": 'fake: {"status": 503}',
              "client leaves": 'fake: {"tokens": 1000, "itl": 0.01}'}[how]
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        async with client.stream("POST", url, json=chat_body(stream=True)) as response:
            await response.aread()  # warm: imports, pools, caches
        gc.collect()
        gc.disable()
        try:
            async with client.stream("POST", url, json=chat_body(prompt, stream=True)) as response:
                if how == "client leaves":
                    async for _ in response.aiter_bytes():
                        break
                else:
                    await response.aread()
            with trio.fail_after(5):
                while len(gw.gateway.streams):
                    await trio.sleep(0.01)
            await trio.sleep(0.1)
            remaining = left()
        finally:
            gc.enable()
    assert remaining == [], f"kept until the cyclic GC runs: {remaining}"
