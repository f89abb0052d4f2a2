"""The benchmark's rendering: results JSON -> bench.md tables and chart (no processes started)."""

from __future__ import annotations

import math

import trio

from loadtest.bench import scenarios
from loadtest.bench.markdown import render, write_charts
from loadtest.bench.scenarios import cdf
from loadtest.bench.targets import Running
from proxy.testing.fake import FakeProvider, FakeSettings


def results() -> dict:
    def a(target: str, key: str, streams: int, p50: float, p99: float, cores: float) -> dict:
        return {"target": target, "key": key, "streams": streams, "ttft_p50": p50, "ttft_p99": p99,
                "itl_p50": 20.0, "itl_p99": 25.0, "tokens_per_s": 4000.0, "cores": cores,
                "loadgen_cores": 0.2, "errors": 0, "ttft_cdf": cdf([p50, p50 + 1, p99])}

    return {
        "date": "2026-11-25 14:46 UTC", "command": "python -m loadtest.bench",
        "environment": {"machine": "2 cores", "python": "3.11", "gateway": "g", "litellm": "l", "portkey": "p"},
        "commands": {"this gateway": "-m proxy serve"}, "notes": ["Portkey skipped: x", "Portkey skipped: x"],
        "rows": {
            "a": [a("fake provider (direct)", "fake", 100, 101.0, 105.0, 0.3),
                  a("this gateway", "gateway", 100, 103.5, 112.0, 0.5),
                  a("fake provider (direct)", "fake", 1000, 240.0, 7000.0, 0.98),
                  a("this gateway", "gateway", 1000, 900.0, 9000.0, 0.9)],
            "b": [{"target": "this gateway", "key": "gateway", "streams": 1000, "open_peak": 1000,
                   "rss_idle_mb": 38.0, "rss_peak_mb": 98.0, "kb_per_stream": 61.2, "errors": 0}],
            "e": [{"target": "this gateway", "key": "gateway", "stalled": 100, "upstream_requests": 100,
                   "hold_s": 40.0, "released_during_hold": 100, "release_p50_s": 10.9,
                   "release_max_s": 11.3, "provider_completed": 0, "provider_sent_mb": 35.9,
                   "rss_peak_mb": 52.1}],
            "c": [{"target": "LiteLLM", "key": "litellm", "failed": "RuntimeError: not ready"}],
        },
    }


def test_render_tables_added_latency_and_notes(tmp_path):
    md = render(results(), [])
    assert "| this gateway | 100 | 103.5 | 112.0 | 2.5 | 7.0 |" in md  # minus the floor at 100
    assert "| this gateway | 1,000 | 900.0 | 9,000.0 | n/a (floor saturated) |" in md
    assert "| this gateway | 1,000 | 1,000 | 38.0 | 98.0 | 61.2 | 0 |" in md
    assert "| this gateway | 100 | 100 | 40.0 | 100 | 10.90 | 11.30 |" in md
    assert "RuntimeError: not ready" in md
    assert md.count("Portkey skipped: x") == 1


def test_charts_are_written(tmp_path):
    charts = write_charts(results(), tmp_path)
    assert charts == [str(tmp_path / "bench.png")]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_of_held_streams_alone_gets_its_one_panel(tmp_path):
    data = results()
    data["rows"] = {"b": data["rows"]["b"]}  # no TTFT rows: the memory panel only
    assert write_charts(data, tmp_path) == [str(tmp_path / "bench.png")]


def h(target: str, key: str, idle99: float, p99: float, gap99: float, **more) -> dict:
    return {"target": target, "key": key, "streams": 200, "offered_tokens_per_s": 10000, "probe_rate": 10.0,
            "probes": 120, "window_s": 12.1, "idle_ttft_p50": 102.0, "idle_ttft_p99": idle99,
            "ttft_p50": 110.0, "ttft_p99": p99, "added_p50": 8.0, "added_p99": p99 - idle99,
            "no_first_token": 0, "probe_errors": 0, "error_kinds": {}, "old_open": 200,
            "old_tokens_per_s": 6100, "old_itl_p50": 0.1, "old_itl_p99": gap99, "old_itl_max": 300.0,
            "old_errors": 0, "old_error_kinds": {}, "cores": 1.01, "provider_cores": 0.5, "loadgen_cores": 0.3,
            "machine_cores": 1.2, "machine_cpus": 2, **more}


def test_render_overload_fairness():
    data = results()
    data["rows"] = {"h": [
        h("floor: raw trio", "floor-trio", 104.0, 120.0, 30.0),
        h("this gateway", "gateway", 105.0, 305.0, 50.0, no_first_token=3, old_errors=1, machine_cores=1.95,
          old_error_kinds={"closed": "1: ReadError"}, error_kinds={"closed": "2: reset"}),
        {"target": "Portkey", "key": "portkey", "failed": "RuntimeError: not ready"},
    ]}
    md = render(data, [])
    assert "### h. Overload fairness" in md
    assert "New streams: 10.0/s" in md
    # target, old streams, offered, delivered, cores, idle p50/p99, loaded p50/p99, added p50/p99,
    # no first token / probes, old ITL p50/p99/max, added p99 over old ITL p99, provider, load gen
    # and machine cores, errors, note
    assert ("| floor: raw trio | 200 | 10,000 | 6,100 | 1.01 | 102.0 | 104.0 | 110.0 | 120.0 | 8.0 | 16.0 "
            "| 0 / 120 | 0.1 | 30.0 | 300.0 | 0.5 | 0.50 | 0.30 | 1.20 | 0 |  |") in md
    assert ("| this gateway | 200 | 10,000 | 6,100 | 1.01 | 102.0 | 105.0 | 110.0 | 305.0 | 8.0 | 200.0 "
            "| 3 / 120 |") in md
    assert "| 50.0 | 300.0 | 4.0 | 0.50 | 0.30 | 1.95 | 1 | machine saturated |" in md
    assert "| Portkey | -" in md and "RuntimeError: not ready" in md
    assert "- this gateway, new streams, closed x 2: reset" in md
    assert "- this gateway, old streams, closed x 1: ReadError" in md


async def test_overload_fairness_smoke():
    """Scenario h end to end at toy sizes against an in-process fake provider (about 3 s)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(FakeProvider(FakeSettings()).serve)
        target = Running("fake", (f"http://127.0.0.1:{port}/v1",), [])
        sizes = scenarios.Sizes(overload_settle=0.3, probe_rate=20.0, probe_seconds=1.0,
                                probe_grace=2.0)
        row = await scenarios.overload_fairness(target, sizes, 10)
        nursery.cancel_scope.cancel()
    assert row["probes"] == 20 and row["no_first_token"] == 0 and row["idle_no_first_token"] == 0
    assert row["probe_errors"] == 0 and row["old_errors"] == 0
    assert row["old_open"] == row["old_open_before"] == 10  # the old streams outlived the window
    assert 95 < row["idle_ttft_p50"] < 1000 and 95 < row["ttft_p50"] < 1000  # provider TTFT 100 ms
    assert 15 < row["old_itl_p50"] < 100  # 20 ms apart
    assert row["old_tokens_per_s"] > 200  # 10 x 50 offered
    assert row["cores"] is None and row["provider_cores"] is None  # no process to sample in-process
    assert row["machine_cores"] is not None and row["loadgen_cores"] is not None
    assert len(row["ttft_cdf"]) == 201 and not any(math.isnan(x) for x in row["ttft_cdf"])
