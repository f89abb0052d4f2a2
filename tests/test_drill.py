"""The key-revocation drill, run as users run it: a subprocess, a report, an exit code."""

import subprocess
import sys

import orjson


def test_drill_fails_over_holds_the_slo_and_recovers(tmp_path):
    out = tmp_path / "drill.json"
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--log-level", "WARNING", "drill", "--duration", "6",
         "--concurrency", "8", "--cooldown", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SLO (99.5 % success, p95 <= 2.5 s): HELD" in result.stdout
    report = orjson.loads(out.read_bytes())
    phases = report["phases"]
    assert all(phases[p]["requests"] > 0 and phases[p]["success_pct"] >= 99.5 for p in phases)
    assert "primary/gpt-4o" in phases["before"]["served_by"]
    assert "primary/gpt-4o" not in phases["during"]["served_by"]  # every failure was invisible
    assert report["failover_s"] is not None and report["recovery_s"] is not None


def test_drill_exit_code_is_1_when_the_slo_is_missed(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--log-level", "WARNING", "drill", "--duration", "3",
         "--concurrency", "2", "--slo-p95", "0.001"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "MISSED" in result.stdout
