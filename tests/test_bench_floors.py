"""The benchmark's two floors (loadtest/bench/floor_*.py), CPU per token, and the g table.

Real processes on real loopback sockets: the fake provider started with its CLI
(`python -m proxy fake-provider --port 0`), each floor as the child process the benchmark runs,
both on port 0 (each prints the port it bound; we read that line, no sleeps). The relays are
checked byte for byte against the provider addressed directly, and with `loadtest`'s own runner.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from array import array

import httpx
import pytest
import trio

from loadtest.bench.floor_pipe import ResponseEnd
from loadtest.bench.markdown import render
from loadtest.client import Sample
from loadtest.memory import MemorySample
from loadtest.report import table
from loadtest.runner import run
from loadtest.settings import RunSettings, Sampling, Shape, Target
from loadtest.stats import summarize

FLOORS = ("floor_trio", "floor_hypercorn")
PROMPT = 'fake: {"tokens": 20, "itl": 0.001}'
BODY = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}


def _spawn(argv: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a child that prints `... listening on http://HOST:PORT/v1`; returns it and that URL."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ready, _, _ = select.select([proc.stdout], [], [], 30)  # a bound on a broken child, not a wait
    line = proc.stdout.readline().decode() if ready else ""
    found = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
    if not found:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{argv} did not start: {line!r}")
    return proc, found.group(0)


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture(scope="module")
def provider():
    proc, url = _spawn(["-m", "proxy", "fake-provider", "--port", "0"])
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def floors(provider):
    """Both floors, relaying to the provider: name -> (url, pid)."""
    upstream = provider.split("//", 1)[1].split("/", 1)[0]
    procs = {}
    try:
        for name in FLOORS:
            procs[name] = _spawn(["-m", f"loadtest.bench.{name}", "--port", "0", "--upstream", upstream])
        yield {name: (url, proc.pid) for name, (proc, url) in procs.items()}
    finally:
        for proc, _ in procs.values():
            _stop(proc)


def _same_stream(body: bytes) -> bytes:
    """A response with its per-request id and timestamp blanked: equal across two requests."""
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb"chatcmpl-fake-\d+", b"chatcmpl-fake-N", body))


async def _raw_exchange(url: str) -> bytes:
    """One streamed request over a plain socket; every byte of the response, head included."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    body = httpx.Request("POST", url, json=BODY).read()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                              b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        end = ResponseEnd()  # the floors' own end detector: checked byte by byte below
        while not end.feed(chunk := await stream.receive_some(65536)):
            assert chunk, "connection closed before the response ended"
            data += chunk
        return data + chunk


async def test_raw_floor_relays_the_response_bytes_unchanged(provider, floors):
    # Only the raw floor: hypercorn writes its own status line, headers and chunk framing.
    url, _ = floors["floor_trio"]
    with trio.fail_after(10):
        direct, relayed = await _raw_exchange(provider), await _raw_exchange(url)
    assert direct.count(b"data: ") == 23  # role, 20 tokens, finish, [DONE]
    assert _same_stream(relayed) == _same_stream(direct)  # head, chunk framing and all


@pytest.mark.parametrize("name", FLOORS)
async def test_floor_relays_the_body_and_headers_to_httpx(provider, floors, name):
    url, _ = floors[name]
    async with httpx.AsyncClient(timeout=10) as client:
        direct = await client.post(provider + "/chat/completions", json=BODY)
        for _ in range(2):  # twice: the second request reuses both keep-alive connections
            relayed = await client.post(url + "/chat/completions", json=BODY)
            assert relayed.status_code == 200
            assert relayed.headers["content-type"] == direct.headers["content-type"] == "text/event-stream"
            assert _same_stream(relayed.content) == _same_stream(direct.content)
        plain = await client.post(url + "/chat/completions", json={**BODY, "stream": False})
        assert plain.json()["usage"]["completion_tokens"] == 20  # a Content-Length response too


@pytest.mark.parametrize("name", FLOORS)
async def test_floor_under_the_load_generator(floors, name):
    url, pid = floors[name]
    settings = RunSettings(target=Target(urls=(url,), model="fake-model", prompt=PROMPT),
                           shape=Shape(concurrency=8, requests=40), progress=False,
                           sampling=Sampling(target_pids=(pid,), interval=0.05, idle_wait=0.05))
    with trio.fail_after(20):
        result = await run(settings)
    s = result.summary
    assert (s.requests, s.ok, s.errors) == (40, 40, 0)
    assert all(x.tokens == 20 and x.events == 23 for x in result.samples)
    assert sum(x.reused for x in result.samples) == 32  # 8 client connections, kept alive
    assert s.target_cpu_us_per_token is not None and s.target_cpu_us_per_token >= 0


def test_cpu_per_token_is_target_cpu_over_tokens_received():
    samples = [Sample(i, 0, 0.0, sent=0.5, first_token=1.0, last_token=1.5, ended=2.0, outcome="ok",
                      tokens=50) for i in range(4)]
    memory = [MemorySample(0.0, 1000, 10.0, 0, 100, 1.0), MemorySample(1.0, 2000, 10.5, 4, 100, 1.2),
              MemorySample(2.5, 1500, 10.013, 0, 100, 1.4)]
    s = summarize(samples, array("d"), memory, open_loop=False, peak_open=4)
    assert s.target_cpu_us_per_token == pytest.approx(0.013 * 1e6 / 200)  # 65 µs
    assert s.to_json()["target_cpu_us_per_token"] == s.target_cpu_us_per_token
    assert re.search(r"^target CPU µs per token +65\.00$", table(s), re.M)
    none = summarize(samples, array("d"), memory[:1], open_loop=False, peak_open=4)
    assert none.target_cpu_us_per_token is None  # one sample: no CPU interval to divide


CHUNKED = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
           b"b\r\ndata: a\n\n\r\n\r\n" b"10;ext=1\r\ndata: [DONE]\n\n\r\n\r\n" b"0\r\n\r\n")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_framing_survives_any_split(size):
    pieces = [CHUNKED[i:i + size] for i in range(0, len(CHUNKED), size)]
    end = ResponseEnd()
    assert [end.feed(p) for p in pieces] == [False] * (len(pieces) - 1) + [True]
    sized = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
    end = ResponseEnd()
    assert [end.feed(sized[i:i + size]) for i in range(0, len(sized), size)][-1] is True


def test_markdown_shows_cpu_per_token_and_held_memory_against_both_floors():
    def g(target: str, key: str, us: float) -> dict:
        return {"target": target, "key": key, "streams": 100, "waves": 4, "tokens": 20000, "cpu_s": us / 50,
                "cpu_us_per_token": us, "cpu_us_per_token_runs": [us, us], "cores": 0.3,
                "loadgen_cores": 0.2, "errors": 0}

    def b(target: str, key: str, kb: float) -> dict:
        return {"target": target, "key": key, "streams": 2000, "open_peak": 2000, "rss_idle_mb": 30.0,
                "rss_peak_mb": 50.0, "kb_per_stream": kb, "errors": 0}

    results = {
        "date": "d", "command": "python -m loadtest.bench --scenarios b,g", "commands": {}, "notes": [],
        "environment": {"machine": "m", "python": "3.11", "gateway": "g", "litellm": "l", "portkey": "p"},
        "rows": {
            "b": [b("floor: raw trio", "floor-trio", 8.0), b("floor: hypercorn", "floor-hypercorn", 22.0),
                  b("this gateway", "gateway", 44.0)],
            "g": [g("floor: raw trio", "floor-trio", 65.0), g("floor: hypercorn", "floor-hypercorn", 130.0),
                  g("this gateway", "gateway", 260.0), {"target": "LiteLLM", "key": "litellm", "failed": "RuntimeError: x"}],
        },
    }
    md = render(results, [])
    assert "### g. CPU per relayed token" in md
    assert "| target | streams | tokens (median run) | CPU s (median run) | CPU µs / token | × trio floor | " \
           "× hypercorn floor |" in md
    assert "| floor: raw trio | 100 | 20,000 | 1.30 | 65.0 | 1.00 | 0.50 | 65, 65 |" in md
    assert "| this gateway | 100 | 20,000 | 5.20 | 260.0 | 4.00 | 2.00 | 260, 260 |" in md
    assert "| LiteLLM | - | - | - | - | - | - | - | - | - | - | RuntimeError: x |" in md
    assert "| this gateway | 2,000 | 2,000 | 30.0 | 50.0 | 44.0 | 0 | 5.50 | 2.00 |" in md
    del results["rows"]["b"][1]  # no hypercorn floor measured: "-", never a made-up ratio
    assert "| this gateway | 2,000 | 2,000 | 30.0 | 50.0 | 44.0 | 0 | 5.50 | - |" in render(results, [])
