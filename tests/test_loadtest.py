"""loadtest end to end on loopback: real sockets, the fake provider (in process, or a subprocess
where the timing is the point), and the gateway for the error paths.

Accuracy against ground truth (the fake provider's known TTFT and inter-token gap) uses the
tolerances the issue sets; everything else asserts counts and behaviours, not speed.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
from functools import partial

import pytest
import trio

from loadtest.report import write_csv, write_json
from loadtest.runner import raise_fd_limit, run
from loadtest.settings import Behaviour, RunSettings, Sampling, Shape, Target
from proxy.testing.fake import FakeProvider, FakeSettings

from .conftest import MASTER_KEY

JSON_KEYS = {"requests", "ok", "errors", "ttft_ms", "itl_ms", "e2e_ms", "output_tokens_per_s",
             "requests_per_s", "target_rss_mb", "kb_per_stream"}


def settings(url: str, *, prompt: str = "Hello", stream: bool = True, api_key: str | None = None,
             behaviour: Behaviour = Behaviour(), sampling: Sampling = Sampling(), **shape) -> RunSettings:
    return RunSettings(target=Target(urls=(url,), model="gpt-4o", prompt=prompt, stream=stream,
                                     api_key=api_key),
                       shape=Shape(**shape), behaviour=behaviour, sampling=sampling, progress=False)


@pytest.fixture
async def provider(nursery):
    fake = FakeProvider(FakeSettings(tokens=8))
    fake.port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{fake.port}/v1"
    return fake


async def test_closed_loop_counts_tokens_and_reuses_connections(provider):
    with trio.fail_after(20):
        result = await run(settings(provider.url, concurrency=4, requests=20))
    s = result.summary
    assert (s.requests, s.ok, s.errors) == (20, 20, 0)
    assert all(x.tokens == 8 and x.events == 8 + 3 for x in result.samples)  # role, 8, finish, [DONE]
    assert sum(x.reused for x in result.samples) == 16  # 4 connections, kept alive
    assert len(provider.records) == 20 and all(r.completed for r in provider.records)
    assert s.ttft_ms["p50"] is not None and s.itl_ms["p50"] is not None
    assert s.output_tokens_per_s > 0 and s.requests_per_s > 0


async def test_role_only_chunk_is_not_the_first_token(provider):
    # ttft 0.3 s: the role chunk arrives at once, the first content token 300 ms later.
    prompt = 'fake: {"ttft": 0.3, "tokens": 2}'
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, concurrency=1, requests=1))
    (sample,) = result.samples
    assert sample.headers - sample.sent < 0.1
    assert 0.29 < sample.first_token - sample.sent < 0.5


async def test_json_and_csv_outputs(provider, tmp_path):
    with trio.fail_after(20):
        result = await run(settings(provider.url, concurrency=2, requests=6))
    write_json(tmp_path / "r.json", result.summary)
    write_csv(tmp_path / "r.csv", result)
    data = json.loads((tmp_path / "r.json").read_text())
    assert JSON_KEYS <= set(data)
    assert set(data["ttft_ms"]) >= {"p50", "p90", "p99", "max"} and set(data["itl_ms"]) >= {"p50", "p99"}
    assert set(data["e2e_ms"]) >= {"p50", "p99"} and set(data["target_rss_mb"]) == {"idle", "peak"}
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 6 and all(r["outcome"] == "ok" and float(r["ttft_ms"]) > 0 for r in rows)


async def test_non_streaming_requests(provider):
    with trio.fail_after(20):
        result = await run(settings(provider.url, stream=False, concurrency=3, requests=9))
    assert result.summary.ok == 9 and all(x.tokens == 8 for x in result.samples)
    assert not any(r.stream for r in provider.records)


async def test_open_loop_measures_from_the_scheduled_start(provider):
    # 20 arrivals/s for 0.5 s against a 0.1 s TTFT; the latency origin is the due time.
    prompt = 'fake: {"ttft": 0.1, "tokens": 2}'
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, rate=20, requests=10))
    s = result.summary
    assert s.ok == 10 and s.latency_origin == "scheduled start"
    due = [x.scheduled - result.started_at for x in result.samples]
    assert due == pytest.approx([i * 0.05 for i in range(10)], abs=1e-9)
    assert all(x.first_token - x.scheduled >= x.first_token - x.sent for x in result.samples)
    assert s.ttft_ms["p50"] >= 100


async def test_open_loop_beyond_max_in_flight_fails_fast(provider):
    prompt = 'fake: {"ttft": 5, "tokens": 1}'
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, rate=200, requests=10, max_in_flight=3,
                                    duration=0.5))
    outcomes = result.summary.outcomes
    assert outcomes["client_limit"] == 7 and outcomes["cancelled"] == 3


async def test_duration_cuts_in_flight_requests(provider):
    prompt = 'fake: {"ttft": 10, "tokens": 1}'
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, concurrency=5, duration=0.3))
    assert result.summary.outcomes == {"cancelled": 5} and result.summary.errors == 0
    with trio.fail_after(5):
        for record in await provider.wait_for_records(5):
            await record.closed.wait()  # the cut closes the sockets: the provider sees it


async def test_abort_after_k_events_closes_the_connection(provider):
    prompt = 'fake: {"itl": 0.01, "tokens": 50}'
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, concurrency=3, requests=3,
                                    behaviour=Behaviour(abort_after=4)))
    assert result.summary.outcomes == {"aborted": 3}
    assert all(x.events == 4 and x.tokens == 3 for x in result.samples)
    with trio.fail_after(5):
        for record in provider.records:
            await record.closed.wait()
            assert record.peer_closed_early and record.tokens_sent < 50


async def test_stall_after_k_events_holds_the_socket(provider):
    # Big tokens so the unread bytes fill the socket buffers and the provider's write blocks.
    prompt = 'fake: {"tokens": 100000, "token_bytes": 1000}'
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, concurrency=2, requests=2,
                                    behaviour=Behaviour(stall_after=3, hold=1.0)))
    assert result.summary.outcomes == {"stalled": 2}
    for x in result.samples:
        assert x.ended - x.stalled_at >= 0.99  # held for `hold`, then closed
    for record in provider.records:
        assert record.peer_closed_early and 0 < record.tokens_sent < 100000


async def test_slow_reader_is_paced(provider):
    # 20 KB/s reader against ~60 KB of body: about 3 s; an unpaced read takes milliseconds.
    prompt = 'fake: {"tokens": 60, "token_bytes": 900}'
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, concurrency=1, requests=1,
                                    behaviour=Behaviour(read_rate=20_000)))
    (x,) = result.samples
    assert x.outcome == "ok" and x.bytes_in > 60_000
    assert x.ended - x.sent == pytest.approx(x.bytes_in / 20_000, rel=0.25)


async def test_errors_are_counted_by_kind(start_gateway, provider):
    gw = await start_gateway(provider_port=provider.port)
    with trio.fail_after(20):
        unauthorized = await run(settings(gw.v1, concurrency=2, requests=4, api_key="wrong"))
        ok = await run(settings(gw.v1, concurrency=2, requests=4, api_key=MASTER_KEY))
        upstream_500 = await run(settings(gw.v1, concurrency=1, requests=2, api_key=MASTER_KEY,
                                          prompt='fake: {"status": 500}'))
    assert unauthorized.summary.outcomes == {"http_401": 4} and unauthorized.summary.errors == 4
    assert "Incorrect API key" in unauthorized.summary.error_details["http_401"]
    assert ok.summary.ok == 4 and all(x.tokens == 8 for x in ok.samples)
    assert upstream_500.summary.errors == 2


async def test_connect_errors_are_counted():
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with trio.fail_after(20):
        result = await run(settings(f"http://127.0.0.1:{port}/v1", concurrency=2, requests=4))
    assert result.summary.outcomes == {"connect": 4}


async def test_memory_sampling_of_a_target_process(provider, nursery):
    # The target is this very process: RSS is sampled and attributed to open streams. While the
    # 50 streams wait for their first token, the "target" takes 64 MiB more (written, so resident):
    # the idle RSS must be the RSS before the load, the peak must show the 64 MiB on top of it, and
    # the memory per open stream must carry them (a sampler reading the wrong process, a median
    # taken over the wrong samples or idle and peak mixed up fail here).
    from loadtest.memory import measure
    from proxy.core.encodings import encoding

    prompt = 'fake: {"ttft": 0.6, "tokens": 1}'
    held: list[bytes] = []

    async def grow() -> None:
        await provider.wait_for_records(50)  # every stream open, 0.6 s before its first token
        held.append(b"\x01" * (64 << 20))

    encoding("o200k_base")  # the run's tokenizer, loaded before "before" (tens of MB, once)
    before = measure((os.getpid(),))[0] / 1024  # as the sampler counts: children included
    nursery.start_soon(grow)
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompt=prompt, concurrency=50, requests=50,
                                    sampling=Sampling(target_pids=(os.getpid(),), interval=0.05,
                                                      idle_wait=0.1)))
    held.clear()
    s = result.summary
    assert s.target_rss_mb["idle"] == pytest.approx(before, abs=8)
    assert s.target_rss_mb["peak"] - s.target_rss_mb["idle"] >= 60
    assert s.open_streams_peak == 50
    assert s.kb_per_stream >= 0.5 * 64 * 1024 / 50  # most of the plateau had the 64 MiB
    assert any(m.open_streams == 50 for m in result.memory)


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once(nursery):
    # A server that promises keep-alive but closes after each response (idle timeouts do this).
    body = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    response = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
                % len(body)) + body
    connections = []

    async def handler(stream: trio.SocketStream) -> None:
        connections.append(stream)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            data += await stream.receive_some(65536)
        await stream.send_all(response)
        await trio.sleep(0.05)
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(20):
        result = await run(settings(f"http://127.0.0.1:{port}/v1", concurrency=1, requests=3))
    assert result.summary.outcomes == {"ok": 3} and len(connections) == 3
    assert all(x.tokens == 1 for x in result.samples)


async def test_anthropic_messages_stream(nursery):
    # A minimal /v1/messages server: what the gateway will speak; checks path, headers, events.
    events = [("message_start", {"type": "message_start", "message": {"content": []}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
              ("ping", {"type": "ping"}),
              *[("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": w}}) for w in ("Hi", " there")],
              ("message_stop", {"type": "message_stop"})]
    body = b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
                    for name, data in events)
    seen = []

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while not data.endswith(b"}"):
            data += await stream.receive_some(65536)
        seen.append(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    target = Target(urls=(f"http://127.0.0.1:{port}/v1",), api="anthropic", api_key="k", model="claude")
    with trio.fail_after(20):
        result = await run(RunSettings(target=target, shape=Shape(concurrency=1, requests=2), progress=False))
    assert result.summary.outcomes == {"ok": 2} and all(x.tokens == 2 for x in result.samples)
    assert seen[0].startswith(b"POST /v1/messages HTTP/1.1") and b"x-api-key: k" in seen[0]
    assert b'"max_tokens":1024' in seen[0]


async def test_plot_writes_a_png(provider, tmp_path):
    pytest.importorskip("matplotlib")
    from loadtest.plot import plot_run

    with trio.fail_after(20):
        result = await run(settings(provider.url, concurrency=5, requests=10,
                                    sampling=Sampling(target_pids=(os.getpid(),), interval=0.05)))
    plot_run(result, str(tmp_path / "run.png"))
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fd_limit_is_raised_to_the_hard_limit():
    raise_fd_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY


# -- accuracy against a known ground truth: the provider runs in its own process (its own core) --

def _ground_truth_priority() -> None:
    # The machine is shared: a provider starved of CPU would send late and move the ground truth
    # itself. Where allowed (root), it gets a higher scheduling weight; elsewhere it runs as is.
    try:
        os.nice(-10)
    except OSError:
        pass


@pytest.fixture
async def provider_process():
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "fake-provider", "--port", "0",
                             "--ttft", "0.2", "--itl", "0.01", "--tokens", "5"],
                            stdout=subprocess.PIPE, text=True, preexec_fn=_ground_truth_priority)
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        yield line.split("http://", 1)[1].strip()  # e.g. 127.0.0.1:41234/v1
    finally:
        proc.terminate()
        proc.wait(5)


# Timing accuracy against a ground truth is a measurement, not a unit test: on a shared, noisy
# machine a ±2 ms bound can fail for reasons outside the code. Run them on purpose with
# LOADTEST_ACCURACY=1 (the recorded runs are in bench.md, "The load generator: accuracy and reach").
accuracy = pytest.mark.skipif(os.environ.get("LOADTEST_ACCURACY") != "1",
                              reason="timing accuracy run: set LOADTEST_ACCURACY=1")


@accuracy
async def test_ttft_and_itl_accuracy_at_100_streams(provider_process):
    # 5 tokens 10 ms apart per stream, 100 streams back to back: ~2,000 events/s.
    with trio.fail_after(30):
        result = await run(settings(f"http://{provider_process}", concurrency=100, requests=300,
                                    ramp_up=0.5))
    s = result.summary
    assert s.ok == 300
    assert s.ttft_ms["p50"] == pytest.approx(200, abs=2)
    assert s.itl_ms["p50"] == pytest.approx(10, abs=2)


@accuracy
async def test_ttft_accuracy_at_1000_concurrent_streams(provider_process):
    # 1,000 streams open at once: each gets 5 tokens 10 ms apart, then the provider holds it
    # silent (stall_after) until the run's end cuts it, so all 1,000 overlap.
    prompt = 'fake: {"tokens": 100, "stall_after": 5}'
    with trio.fail_after(30):
        result = await run(settings(f"http://{provider_process}", prompt=prompt, concurrency=1000,
                                    requests=1000, ramp_up=2.0, duration=3.5))
    s = result.summary
    assert s.open_streams_peak == 1000 and s.outcomes == {"cancelled": 1000}
    assert all(x.tokens == 5 for x in result.samples)
    assert s.ttft_ms["p50"] == pytest.approx(200, abs=5)
    assert s.itl_ms["p50"] == pytest.approx(10, abs=2)


async def test_command_line_writes_json(provider, tmp_path):
    out = tmp_path / "r.json"
    argv = [sys.executable, "-m", "loadtest", "--url", provider.url, "--concurrency", "2",
            "--requests", "4", "--json", str(out), "--quiet"]
    # run_process keeps this loop (and the in-process provider) running while the CLI talks to it
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    assert b"TTFT ms p50" in done.stdout
    assert json.loads(out.read_text())["ok"] == 4
