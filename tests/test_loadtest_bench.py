"""The benchmark's rendering: results JSON -> bench.md tables and chart (no processes started)."""

from __future__ import annotations

from loadtest.bench.markdown import render, write_charts
from loadtest.bench.scenarios import cdf


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
