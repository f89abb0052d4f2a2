"""Shutdown: stop accepting, let open streams finish up to the drain timeout, then end them."""

import os
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from .conftest import chat_body, parse_sse


async def stream_until_first_token(http, gw, body):
    """Start a stream; return (response context, the bytes read so far) once content flows."""
    request = http.build_request("POST", gw.v1 + "/chat/completions", json=body)
    response = await http.send(request, stream=True)
    received = b""
    chunks = response.aiter_raw()
    while b'"content":"' not in received.replace(b'"content":""', b""):
        received += await chunks.__anext__()
    return response, chunks, received


async def drain(chunks, received: bytes) -> bytes:
    async for part in chunks:
        received += part
    return received


async def test_open_streams_finish_during_drain_and_new_connections_are_refused(start_gateway, http):
    gw = await start_gateway(server={"drain_timeout": 30.0})
    body = chat_body('fake: {"tokens": 10, "itl": 0.05}', stream=True)
    with trio.fail_after(20):
        response, chunks, received = await stream_until_first_token(http, gw, body)
        gw.stop.set()
        while not gw.gateway.draining:
            await trio.sleep(0.01)
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as fresh:
                await fresh.get(gw.url + "/healthz")
        received = await drain(chunks, received)
    await response.aclose()
    events = parse_sse(received)
    assert events[-1] == b"[DONE]" and len(events) == 1 + 10 + 1 + 1  # role, tokens, finish, DONE


async def test_streams_still_open_at_the_drain_timeout_end_with_an_error_event(start_gateway, http):
    gw = await start_gateway(server={"drain_timeout": 0.2})
    body = chat_body('fake: {"tokens": 100000, "itl": 0.05}', stream=True)
    with trio.fail_after(20):
        response, chunks, received = await stream_until_first_token(http, gw, body)
        gw.stop.set()
        received = await drain(chunks, received)
    await response.aclose()
    assert b"server_shutting_down" in received
    assert b"[DONE]" not in received


async def test_during_the_drain_a_kept_alive_connection_is_answered_with_503_draining(start_gateway, http):
    from .test_slow_clients import AUTH, connect, read_responses

    gw = await start_gateway(server={"drain_timeout": 30.0})
    body = chat_body('fake: {"tokens": 20, "itl": 0.05}', stream=True)
    with trio.fail_after(20):
        kept = await connect(gw.url)
        await kept.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        [(status, _)] = await read_responses(kept, 1)
        assert status == 200
        response, chunks, received = await stream_until_first_token(http, gw, body)
        gw.stop.set()
        while not gw.gateway.draining:
            await trio.sleep(0.01)
        # Before the fix the kept connection was closed at this point: no answer at all.
        await kept.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + AUTH + b"\r\n")
        [(status, answer)] = await read_responses(kept, 1)
        assert (status, answer) == (503, b'{"status":"draining"}')
        assert await kept.receive_some(100) == b""  # Connection: close, and closed
        received = await drain(chunks, received)
    await response.aclose()
    assert parse_sse(received)[-1] == b"[DONE]"


def test_sigterm_drains_and_exits_cleanly():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--demo", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "gateway (demo) on http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.split(" on ", 1)[1].split(",", 1)[0]
        response = httpx.post(url + "/v1/chat/completions", json=chat_body(stream=True), timeout=30)
        assert parse_sse(response.content)[-1] == b"[DONE]"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (from /proc: no pgrep needed)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_workers_share_the_port_and_all_drain_on_sigterm(tmp_path):
    config = tmp_path / "workers.toml"
    config.write_text('[server]\nport = 0\nworkers = 2\n[auth]\nmaster_key_env = "UNSET_FOR_TEST"\n'
                      '[providers.p]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                      '[models."*"]\ndeployments = [{ provider = "p" }]\n')
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert " 2 workers" in line, line + process.stderr.read()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        for _ in range(10):  # each connection lands on one worker or the other; all answer
            assert httpx.get(url + "/healthz", timeout=10).json()["status"] == "ok"
        assert len(processes_mentioning(str(config))) == 3  # the parent and its two workers
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert processes_mentioning(str(config)) == []
    finally:
        process.kill()
        process.wait()


async def test_memory_goes_back_to_the_os_once_enough_streams_ended(autojump_clock):
    from proxy.config import ServerConfig
    from proxy.server.serve import return_memory
    from proxy.server.streams import Streams

    streams, until, trims = Streams(ServerConfig()), trio.Event(), []

    async def trim() -> None:
        trims.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: return_memory(streams, until, every=5.0, after=100, trim=trim))
        await trio.sleep(12)
        assert trims == []  # nothing ended: nothing to give back
        streams.ended = 150
        await trio.sleep(5)
        assert trims == [15.0]  # at the next look, once
        streams.ended = 200  # only 50 more since
        await trio.sleep(10)
        assert len(trims) == 1
        streams.ended = 260
        await trio.sleep(5)
        assert trims == [15.0, 30.0]
        until.set()
    assert trio.current_time() == 32.0  # the task ended as soon as it was told
