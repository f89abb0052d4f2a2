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
    assert "SLO (99.5 % success, p95 <= 2.5 s, failover and recovery seen): HELD" in result.stdout
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


def test_drill_is_quiet_by_default_and_a_recovery_not_seen_is_a_failed_drill():
    # A 30 s breaker cooldown outlasts the run: the primary cannot serve again before it ends.
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "drill", "--duration", "3", "--concurrency", "4",
         "--cooldown", "30"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "time to recover (restoration -> primary serving again): NOT OBSERVED" in result.stdout
    assert "): MISSED" in result.stdout and "HELD" not in result.stdout
    assert " INFO " not in result.stderr and " WARNING " not in result.stderr, result.stderr[:2000]
    assert result.stdout.startswith("drill: model gpt-4o")


def test_drill_verbose_shows_the_gateways_log():
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "drill", "-v", "--duration", "1", "--concurrency", "2"],
        capture_output=True, text=True, timeout=120)
    assert " INFO proxy." in result.stderr


def test_drill_with_a_config_revokes_through_the_fake_providers_control(tmp_path):
    fakes = [subprocess.Popen([sys.executable, "-m", "proxy", "fake-provider", "--port", "0",
                               "--ttft", "0.02", "--itl", "0.01", "--tokens", "5"],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        primary, secondary = (f.stdout.readline().strip().rsplit(" ", 1)[1] for f in fakes)
        config = tmp_path / "drill.toml"
        config.write_text(
            '[auth]\nmaster_key_env = "DRILL_TEST_NO_KEY"\n'
            '[router]\nbreaker_cooldown = 1.0\nbackoff_initial = 0.05\n'
            f'[providers.primary]\nkind = "openai"\nbase_url = "{primary}"\n'
            f'[providers.secondary]\nkind = "openai"\nbase_url = "{secondary}"\n'
            '[models."gpt-4o"]\ndeployments = [{ provider = "primary", weight = 9 }, '
            '{ provider = "secondary", weight = 1 }]\n')
        out = tmp_path / "drill.json"
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "--log-level", "WARNING", "drill", "--config", str(config),
             "--duration", "6", "--concurrency", "8", "--json", str(out)],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        report = orjson.loads(out.read_bytes())
        assert report["primary"] == "primary/gpt-4o" and report["failover_s"] is not None
        assert "primary/gpt-4o" not in report["phases"]["during"]["served_by"]
        assert "primary/gpt-4o" in report["phases"]["after"]["served_by"]
    finally:
        for f in fakes:
            f.terminate()
            f.wait(10)
