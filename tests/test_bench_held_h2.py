"""The HTTP/2 held-stream client of scenario b: many streams per h2c connection, against a real gateway."""

import os

import trio

from loadtest.bench import held_h2
from loadtest.bench.scenarios import HELD_PROMPT
from loadtest.bench.targets import free_port
from loadtest.settings import Target

from .conftest import MASTER_KEY


def request(url: str, api_key: str = MASTER_KEY) -> held_h2.H2Request:
    return held_h2.H2Request.of(Target(urls=(url,), model="gpt-4o", api_key=api_key, prompt=HELD_PROMPT))


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_thirty_streams_over_two_connections_are_held_then_released(start_gateway):
    # The gateway writes a held stream's headers with its first token or its first keep-alive
    # comment: a short keep-alive makes every stream answered (200 + first DATA) within the test.
    gw = await start_gateway(server={"keepalive_interval": 0.5})
    client = held_h2.HeldH2(request(gw.v1), 30, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(5):
            await client.all_sent.wait()
        assert client.live.open_streams == 30 and client.peak == 30
        await wait_for(lambda: len(gw.gateway.streams) == 30)
        await wait_for(lambda: client.answered == 30)
        assert all(s.status == 200 and s.events >= 1 and s.bytes_in > 0 for s in client.samples)
        await trio.sleep(0.3)
        assert len(gw.gateway.streams) == 30 and client.live.open_streams == 30  # held, none ended
        nursery.cancel_scope.cancel()
    client.finish()
    assert client.error_kinds() == {}
    assert {s.outcome for s in client.samples} == {"cancelled"}
    await wait_for(lambda: len(gw.gateway.streams) == 0)  # closing the connections ends every stream


async def test_an_error_status_is_an_error_not_an_open_stream(gw):
    client = held_h2.HeldH2(request(gw.v1, api_key="sk-wrong"), 4, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await wait_for(lambda: client.live.errors == 4)
        nursery.cancel_scope.cancel()
    client.finish()
    assert client.error_kinds() == {"http_401": 4}
    assert client.live.open_streams == 0 and client.answered == 0 and client.live.errors == 4
    assert all('"error"' in s.detail for s in client.samples)  # the error body's start, for the report
    assert client.summary([]).errors == 4


async def test_no_listener_is_a_connect_error():
    client = held_h2.HeldH2(request(f"http://127.0.0.1:{free_port()}/v1"), 6, 3)
    with trio.fail_after(5):
        await client.run()  # every connection failed: run returns by itself
    client.finish()
    assert client.error_kinds() == {"connect": 6}


async def test_hold_samples_memory_and_reports_per_stream_figures(gw):
    async def gateway_count() -> int:
        return len(gw.gateway.streams)

    client, summary = await held_h2.hold((os.getpid(),), request(gw.v1), 20, per_connection=10, ramp=0.2,
                                         settle=5, hold_for=0.5, interval=0.05, idle_wait=0.2,
                                         count_open=gateway_count)
    assert client.connections == 2 and client.target_open == 20 and client.peak == 20
    assert summary.open_streams_peak == 20 and summary.errors == 0  # held, as the gateway counted them
    assert summary.target_rss_mb["idle"] is not None and summary.kb_per_stream is not None
    await wait_for(lambda: len(gw.gateway.streams) == 0)
