"""The shipped Prometheus rules: `promtool check rules` and `promtool test rules` on synthetic series
(deploy/prometheus/*.test.yml: each alert fires when it should and not otherwise). In CI promtool
must be there; elsewhere the test is skipped without it."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

RULES = pathlib.Path(__file__).parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)


def promtool(*args: str) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (Debian package prometheus)")
        pytest.skip("promtool not installed")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=RULES)


def test_rules_check():
    files = sorted(p.name for p in RULES.glob("*.rules.yml"))
    assert files
    result = promtool("check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass():
    files = sorted(p.name for p in RULES.glob("*.test.yml"))
    assert files
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent():
    alerts = {m for p in RULES.glob("*.rules.yml") for m in re.findall(r"- alert: (\w+)", p.read_text())}
    assert len(alerts) >= 3
    fired, silent = set(), set()
    for path in RULES.glob("*.test.yml"):
        # each case: "alertname: X" then "exp_alerts: []" (silent) or a list of expected alerts
        for name, expected in re.findall(r"alertname: (\w+)\n\s+exp_alerts:(.*)\n", path.read_text()):
            (silent if expected.strip() == "[]" else fired).add(name)
    assert fired == alerts and silent == alerts


def test_rules_use_only_metrics_the_gateway_exports():
    from tests.test_metrics import CONTRACT

    text = "".join(p.read_text() for p in RULES.glob("*.rules.yml"))
    used = set(re.findall(r"\bgateway_[a-z_]+", text))
    known = {n + suffix for n in CONTRACT for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    assert used and used <= known, used - known


def test_grafana_dashboard_uses_only_exported_metrics_and_recorded_rules():
    import json

    from tests.test_metrics import CONTRACT

    dashboard = json.loads((RULES.parent / "grafana" / "gateway.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    rules_text = "".join(p.read_text() for p in RULES.glob("*.rules.yml"))
    recorded = set(re.findall(r"record: (\S+)", rules_text))
    exported = {n + s for n in list(CONTRACT) + ["gateway_inter_token_latency_seconds", "gateway_retries",
                                                  "gateway_failovers", "gateway_fallbacks"]
                for s in ("", "_total", "_bucket", "_count", "_sum")}
    used = set(re.findall(r"\bgateway[_:][a-z_:0-9]+", exprs))
    assert used and used <= exported | recorded, used - exported - recorded
