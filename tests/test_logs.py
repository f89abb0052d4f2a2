"""Log lines: request id on every line of a request, JSON format, bounded length, lifecycle events."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys

import httpx

from proxy.observability.logs import (MAX_LINE, TEXT_FORMAT, BoundedFormatter, JSONFormatter,
                                     install_request_ids)
from tests.conftest import chat_body, parse_sse


class Lines(logging.Handler):
    def __init__(self, formatter: logging.Formatter):
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def capture(formatter: logging.Formatter):
    """Lines as `formatter` makes them, while in the block (the root logger restored after)."""
    install_request_ids()
    handler, root = Lines(formatter), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_every_line_of_a_request_carries_its_id(gw, http):
    with capture(JSONFormatter()) as handler:
        response = await http.post(gw.v1 + "/chat/completions", json=chat_body(stream=True),
                                   headers={"x-request-id": "trace-abc-123"})
        assert parse_sse(response.content)[-1] == b"[DONE]"
        assert response.headers["x-request-id"] == "trace-abc-123"
        bad = await http.post(gw.v1 + "/chat/completions", json=chat_body(model="nope"))
        rid = bad.headers["x-request-id"]
        assert bad.json()["request_id"] == rid
    records = [json.loads(line) for line in handler.lines]
    mine = [r for r in records if r["request_id"] == "trace-abc-123"]
    assert any(r["logger"] == "proxy.server.chat" and "outcome=ok" in r["message"] for r in mine), records
    refused = [r for r in records if r["request_id"] == rid]
    assert refused and "404" in refused[0]["message"]
    assert all(set(r) >= {"ts", "level", "logger", "request_id", "message"} for r in records)


def test_a_huge_message_makes_a_bounded_line_in_both_formats():
    install_request_ids()
    record = logging.getLogger("t").makeRecord("t", logging.INFO, __file__, 1, "model=%s", ("x" * 1_000_000,),
                                                None)
    text = BoundedFormatter(TEXT_FORMAT).format(record)
    assert len(text) < MAX_LINE + 50 and text.endswith("chars cut]")
    line = JSONFormatter().format(record)
    assert len(line) < MAX_LINE + 100 and json.loads(line)["message"].endswith("chars cut]")
    try:
        raise ValueError("y" * 100_000)
    except ValueError:
        record.exc_info = sys.exc_info()
    assert len(JSONFormatter().format(record)) < MAX_LINE * 2


def test_serve_log_format_json_logs_config_drain_and_requests_as_json(tmp_path):
    config = tmp_path / "g.toml"
    config.write_text('[server]\nport = 0\n[auth]\nmaster_key_env = "UNSET_FOR_TEST"\n'
                      '[providers.p]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                      '[models."m"]\ndeployments = [{ provider = "p" }]\n')
    env = dict(os.environ, BYPASS_ROUTER="true")
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--log-format",
                                "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        response = httpx.post(url + "/v1/chat/completions", json=chat_body(model="m" * 500_000), timeout=30)
        assert response.status_code in (400, 404)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        records = [json.loads(line) for line in process.stderr.read().splitlines()]  # every line is JSON
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    messages = [(r["level"], r["message"]) for r in records]
    assert any(m.startswith("config loaded: 1 providers, 1 models, 1 deployments") for _, m in messages), messages
    assert ("WARNING", "router bypass ON at start (BYPASS_ROUTER): no retries, fallbacks or breakers") in messages
    assert any(m.startswith("shutting down: draining") for _, m in messages)
    assert any(m.startswith("drain done") for _, m in messages)
    refused = [r for r in records if r["request_id"] == response.headers["x-request-id"]]
    assert refused and all(len(json.dumps(r)) < 2 * 2000 for r in records)


async def test_the_bypass_switch_is_logged_with_the_request_id(gw, http):
    with capture(BoundedFormatter(TEXT_FORMAT)) as handler:
        response = await http.post(gw.url + "/admin/bypass", json={"enabled": True},
                                   headers={"x-request-id": "ops-42"})
        assert response.status_code == 200
        await http.post(gw.url + "/admin/bypass", json={"enabled": False})
    assert any("WARNING" in line and "[ops-42]" in line and "router bypass ON via /admin/bypass" in line
               for line in handler.lines), handler.lines
    assert any("router bypass off via /admin/bypass" in line for line in handler.lines)
