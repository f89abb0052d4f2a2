"""The command line as a user meets it: real `python -m proxy` subprocesses."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

CONFIG = ('[server]\nport = 0\n[auth]\nmaster_key_env = "UNSET_FOR_TEST"\n'
          '[providers.p]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
          '[models."*"]\ndeployments = [{ provider = "p" }]\n')


def proxy(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize("command", [["serve", "--config", "CONFIG"], ["serve", "--demo"], ["fake-provider"]])
def test_a_port_in_use_is_one_line_and_exit_status_2(command, busy_port, config_file):
    args = [str(config_file) if a == "CONFIG" else a for a in command]
    result = proxy(*args, "--port", str(busy_port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: 127.0.0.1:{busy_port} is in use"
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr


def start(args: list[str], **kwargs) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "proxy", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, **kwargs)
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise AssertionError(process.stderr.read())
    return process, line


def test_pid_file_holds_the_server_pid_and_is_removed_on_a_clean_exit(config_file, tmp_path):
    pid_file = tmp_path / "gateway.pid"
    process, line = start(["serve", "--config", str(config_file), "--pid-file", str(pid_file)])
    try:
        assert f"(pid {process.pid}, " in line
        assert pid_file.read_text() == f"{process.pid}\n"
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not pid_file.exists()
    finally:
        process.kill()
        process.wait()


def test_the_open_file_limit_is_raised_to_the_hard_limit_and_bounds_max_connections(config_file):
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 600))

    process, line = start(["serve", "--config", str(config_file)], preexec_fn=low_limit)
    try:
        assert "open-file limit 600," in line, line
        assert "max_connections 250 per worker" in line, line  # (600 - 100) / 2
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_help_texts_are_written_for_users():
    top = proxy("--help").stdout
    assert "usage: llm-gateway" in top and "Thin on purpose" not in top
    for command in ("serve", "fake-provider", "drill"):
        assert command in top
    fake = proxy("fake-provider", "--help").stdout
    assert fake.startswith("usage: python -m proxy fake-provider") and "proxy.fake_provider" not in fake
    serve = proxy("serve", "--help").stdout
    assert "--pid-file PATH" in serve
    drill = proxy("drill", "--help").stdout
    assert "-v" in drill and "usage: python -m proxy drill" in drill


def test_demo_mode_prints_its_pid_and_keeps_a_pid_file(tmp_path):
    pid_file = tmp_path / "demo.pid"
    process, line = start(["serve", "--demo", "--port", "0", "--pid-file", str(pid_file)])
    try:
        assert f"(pid {process.pid}, " in line
        assert pid_file.read_text() == f"{process.pid}\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not pid_file.exists()
    finally:
        process.kill()
        process.wait()


def test_the_readme_openai_snippet_prints_the_text_then_the_usage(tmp_path):
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = re.search(r"```python\n(from openai import OpenAI.*?)```", readme, re.S).group(1)
    process, line = start(["serve", "--demo", "--port", "0"])
    try:
        url = re.search(r"http://[0-9.]+:\d+", line).group(0)
        script = tmp_path / "snippet.py"
        script.write_text(snippet.replace("http://127.0.0.1:8080", url))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    text, usage = result.stdout.rstrip("\n").rsplit("\n", 1)
    assert result.returncode == 0, result.stderr
    assert text.endswith("lazy dog.") and "None" not in text  # the finish chunk has no content
    assert usage.startswith("CompletionUsage(completion_tokens=40")
