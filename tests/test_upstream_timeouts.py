"""first_byte_timeout vs read_timeout, on the autojump clock: exact times, both modes; and the
bounds on a plain answer (max_response_bytes, also for a compressed body that inflates past it).

A scripted provider (raw trio socket, same process) sends its response head at once, then the
body parts at given virtual times. first_byte_timeout must cover the wait for the first output
(a stream's first token, a plain answer's first bytes) and read_timeout only the later gaps.
"""

from __future__ import annotations

import orjson
import pytest
import trio

from proxy.config import parse_config
from proxy.core.errors import FirstTokenTimeout, RequestTimeout, UpstreamTimeout
from proxy.formats import make_adapter
from proxy.transport.upstream import Upstream

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def token(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"


async def provider(nursery: trio.Nursery, script: list[tuple[float, bytes]], content_type: bytes,
                   head: bytes = HEAD) -> int:
    """Serve one request: head at t=0, then each (delay, bytes) of the script."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(head % content_type)
        for delay, part in script:
            await trio.sleep(delay)
            await stream.send_all(chunk(part))
        await stream.send_all(b"0\r\n\r\n")
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, serve, listeners)
    return listeners[0].socket.getsockname()[1]


def upstream(port: int, **provider_config) -> tuple[Upstream, object]:
    config = parse_config({"providers": {"p": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                               **provider_config}},
                           "models": {"m": {"deployments": [{"provider": "p"}]}}})
    adapter = make_adapter(config.providers["p"], None)
    return Upstream(config.providers), adapter


def wire(adapter, stream: bool):
    from proxy.core.request import parse_chat_request
    request = parse_chat_request(orjson.dumps({"model": "m", "stream": stream,
                                               "messages": [{"role": "user", "content": "x"}]}))
    return adapter.chat_request(request, "m")


async def read_stream(up: Upstream, adapter, *, ttft_deadline: float = float("inf")) -> list[float]:
    """Read a stream as failover does (first_output() after the first read); the read times."""
    times = []
    async with up.stream(adapter, wire(adapter, True), ttft_deadline=ttft_deadline) as body:
        first = True
        while await body.next():
            times.append(trio.current_time())
            if first:
                body.first_output()
                first = False
    return times


@pytest.mark.parametrize("first_token_at", [1.0, 4.9])
async def test_a_slow_first_token_waits_first_byte_timeout_not_read_timeout(autojump_clock, first_token_at):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(first_token_at, token("a")), (0.2, token("b"))], b"text/event-stream")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        times = await read_stream(up, adapter)
        nursery.cancel_scope.cancel()
    assert times == [pytest.approx(first_token_at), pytest.approx(first_token_at + 0.2)]


async def test_no_first_token_within_first_byte_timeout_is_a_timeout_at_exactly_that_time(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(6.0, token("a"))], b"text/event-stream")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        with pytest.raises(UpstreamTimeout, match="first_byte_timeout"):
            await read_stream(up, adapter)
        assert trio.current_time() == pytest.approx(5.0)
        nursery.cancel_scope.cancel()


async def test_a_gap_after_the_first_token_is_bounded_by_read_timeout(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(1.0, token("a")), (0.5, token("b"))], b"text/event-stream")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        with pytest.raises(UpstreamTimeout, match="read_timeout"):
            await read_stream(up, adapter)
        assert trio.current_time() == pytest.approx(1.3)
        nursery.cancel_scope.cancel()


async def test_time_spent_waiting_for_the_client_between_reads_is_not_a_read_gap(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(0.1, token(str(i))) for i in range(3)], b"text/event-stream")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        async with up.stream(adapter, wire(adapter, True)) as body:
            body.first_output()
            parts = []
            while data := await body.next():
                parts.append(data)
                await trio.sleep(2.0)  # a slow client: the relay's channel is full
        assert b"".join(parts) == b"".join(token(str(i)) for i in range(3))
        nursery.cancel_scope.cancel()


async def test_the_routers_earlier_ttft_deadline_shares_the_timer(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(3.0, token("a"))], b"text/event-stream")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        with pytest.raises(FirstTokenTimeout):
            await read_stream(up, adapter, ttft_deadline=trio.current_time() + 2.0)
        assert trio.current_time() == pytest.approx(2.0)
        nursery.cancel_scope.cancel()


async def test_the_requests_own_deadline_shares_the_timer_before_the_first_token(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(3.0, token("a"))], b"text/event-stream")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        with pytest.raises(RequestTimeout, match="request_timeout"):
            async with up.stream(adapter, wire(adapter, True), ttft_deadline=trio.current_time() + 2.5,
                                 deadline=trio.current_time() + 1.5) as body:
                await body.next()
        assert trio.current_time() == pytest.approx(1.5)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("client_wait", [0.0, 2.0])
async def test_the_requests_own_deadline_ends_a_stream_mid_way_in_a_read_or_waiting_for_the_client(
        autojump_clock, client_wait):
    # Tokens every 0.2 s; the request's deadline at 1.1 s. Without a slow client it falls in a
    # read (capped below read_timeout); with one, while the stream waits for it between reads
    # (where read_timeout does not count, but the request's whole time does).
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(0.2, token(str(i))) for i in range(20)], b"text/event-stream")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        reads = []
        with pytest.raises(RequestTimeout):
            async with up.stream(adapter, wire(adapter, True), deadline=trio.current_time() + 1.1) as body:
                body.first_output()
                while await body.next():
                    reads.append(trio.current_time())
                    await trio.sleep(client_wait)
        assert trio.current_time() == pytest.approx(1.1)
        assert len(reads) == (5 if client_wait == 0.0 else 1)
        nursery.cancel_scope.cancel()


async def test_the_requests_own_deadline_bounds_a_plain_answer(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(0.2, b"{"), (3.0, b"}")], b"application/json")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=10.0)
        with pytest.raises(RequestTimeout):
            await up.request(adapter, wire(adapter, False), deadline=trio.current_time() + 1.0)
        assert trio.current_time() == pytest.approx(1.0)
        nursery.cancel_scope.cancel()


COMPLETION = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})


async def test_a_plain_answer_may_take_first_byte_timeout_to_start(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(1.0, COMPLETION[:20]), (0.2, COMPLETION[20:])], b"application/json")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        body = await up.request(adapter, wire(adapter, False))
        assert body == COMPLETION and trio.current_time() == pytest.approx(1.2)
        nursery.cancel_scope.cancel()


async def test_a_plain_answer_later_gap_is_bounded_by_read_timeout(autojump_clock):
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(1.0, COMPLETION[:20]), (0.5, COMPLETION[20:])], b"application/json")
        up, adapter = upstream(port, first_byte_timeout=5.0, read_timeout=0.3)
        with pytest.raises(UpstreamTimeout):
            await up.request(adapter, wire(adapter, False))
        assert trio.current_time() == pytest.approx(1.3)
        nursery.cancel_scope.cancel()


async def test_a_plain_answer_larger_than_max_response_bytes_is_a_502(autojump_clock):
    big = b"x" * 4096
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(0.0, big)] * 3, b"application/json")
        up, adapter = upstream(port, max_response_bytes=8192)
        with pytest.raises(Exception) as info:
            await up.request(adapter, wire(adapter, False))
        assert info.value.status == 502 and "max_response_bytes" in info.value.message
        nursery.cancel_scope.cancel()


async def test_a_gzip_bomb_is_a_502_at_max_response_bytes_with_bounded_memory():
    """1 MiB of gzip that inflates to 1 GiB: refused once the decoded bytes pass the cap, without
    ever holding much more than the cap (the transport inflates at most 64 KiB per step)."""
    import tracemalloc
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 2 << 20
    head = HEAD.replace(b"transfer-encoding", b"content-encoding: gzip\r\ntransfer-encoding")
    async with trio.open_nursery() as nursery:
        port = await provider(nursery, [(0.0, bomb[i:i + 65536]) for i in range(0, len(bomb), 65536)],
                              b"application/json", head=head)
        up, adapter = upstream(port, max_response_bytes=4 << 20)
        tracemalloc.start()
        try:
            with pytest.raises(Exception) as info:
                await up.request(adapter, wire(adapter, False))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.value.status == 502 and "max_response_bytes" in info.value.message
        assert peak < 16 << 20  # the 4 MiB cap, its copy while growing, the socket's reads
        nursery.cancel_scope.cancel()
