"""Configuration: the contract's names, defaults, and errors that name key, value and expectation."""

import subprocess
import sys

import pytest
import trio

from proxy.server.app import Gateway
from proxy.config import ConfigError, load_config, parse_config

BASE = {
    "providers": {"primary": {"kind": "openai", "base_url": "https://api.openai.com/v1",
                              "api_key_env": "OPENAI_API_KEY"}},
    "models": {"gpt-4o": {"deployments": [{"provider": "primary", "model": "gpt-4o", "weight": 1}]}},
}

EXAMPLE = '''
[server]
host = "127.0.0.1"
port = 8080
write_timeout = 10.0
stream_buffer = 16
max_body_bytes = 10485760
keepalive_interval = 15.0

[auth]
master_key_env = "PROXY_MASTER_KEY"

[providers.primary]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
max_concurrency = 1000

[models."gpt-4o"]
deployments = [{ provider = "primary", model = "gpt-4o", weight = 1 }]

[models."gpt-*"]
deployments = [{ provider = "primary" }]

[models."*"]
deployments = [{ provider = "primary", model = "gpt-4o-mini" }]
'''


def with_(path: str, value):
    raw = {"providers": {k: dict(v) for k, v in BASE["providers"].items()},
           "models": {k: dict(v) for k, v in BASE["models"].items()}}
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return raw


def test_the_documented_example_parses(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(EXAMPLE)
    config = load_config(str(path))
    assert config.server.write_timeout == 10.0 and config.server.stream_buffer == 16
    assert config.providers["primary"].max_concurrency == 1000
    assert config.auth.master_key_env == "PROXY_MASTER_KEY"


def test_exact_names_win_over_globs_then_first_glob_in_file_order(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(EXAMPLE)
    config = load_config(str(path))
    assert config.route("gpt-4o").name == "gpt-4o"
    assert config.route("gpt-4.1").name == "gpt-*"
    assert config.route("claude").name == "*"
    from proxy.routing.router import Router
    assert config.route("gpt-4.1").deployments[0].model == ""  # a glob without model forwards the name
    assert config.route("claude").deployments[0].model == "gpt-4o-mini"
    assert Router(config).model_names() == ["gpt-4o"]


@pytest.mark.parametrize("path, value, key, expected", [
    ("server.write_timeout", -1, "server.write_timeout", "a number >= 0.001"),
    ("server.write_timeout", "10", "server.write_timeout", "a number"),
    ("server.stream_buffer", 0, "server.stream_buffer", "an integer >= 1"),
    ("server.stream_buffer", 1.5, "server.stream_buffer", "an integer"),
    ("server.port", 70000, "server.port", "0..65535"),
    ("server.header_timeout", 0, "server.header_timeout", "a number >= 0.001"),
    ("server.body_timeout", "10s", "server.body_timeout", "a number"),
    ("server.min_body_rate", 0.5, "server.min_body_rate", "an integer >= 1"),
    ("server.max_connections", 0, "server.max_connections", "an integer >= 1"),
    ("server.certfile", "/no/such/cert.pem", "server.certfile", "readable file"),
    ("server.colour", "blue", "server.colour", "no such key"),
    ("providers.primary.kind", "openia", "providers.primary.kind", "one of openai"),
    ("providers.primary.base_url", "api.openai.com", "providers.primary.base_url", "http:// or https://"),
    ("providers.primary.max_concurrency", 0, "providers.primary.max_concurrency", ">= 1"),
    ("auth.master_key_env", "not a name!", "auth.master_key_env", "environment variable"),
    ("models", {}, "models", "at least one"),
])
def test_bad_values_name_the_key_the_value_and_the_expectation(path, value, key, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(with_(path, value))
    assert info.value.key == key
    assert info.value.value == value
    assert expected in info.value.expected
    assert key in str(info.value) and repr(value) in str(info.value)


def test_deployment_must_name_a_defined_provider():
    raw = with_("models", {"m": {"deployments": [{"provider": "ghost"}]}})
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.key == 'models."m".deployments[0].provider'
    assert "primary" in info.value.expected


def test_missing_required_provider_key():
    raw = with_("providers", {"p": {"kind": "openai"}})
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.key == "providers.p.base_url"


def test_provider_key_variable_must_be_set_at_start():
    config = parse_config(BASE)
    with pytest.raises(ConfigError) as info:
        Gateway(config, environ={})
    assert info.value.key == "providers.primary.api_key_env"
    Gateway(config, environ={"OPENAI_API_KEY": "sk-x"})  # and set, it starts


def test_cli_fails_at_start_with_the_key_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nstream_buffer = "lots"\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "server.stream_buffer" in result.stderr and "'lots'" in result.stderr
    assert "expected an integer" in result.stderr


async def test_the_readme_configuration_example_parses_and_starts_as_pasted(tmp_path, nursery):
    import re
    from functools import partial
    from pathlib import Path

    import httpx

    from proxy.config import with_server_overrides
    from proxy.server.app import Gateway
    from proxy.server.serve import serve

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1]
    block = re.findall(r"```toml\n(.*?)```", reference, re.S)[0]
    path = tmp_path / "gateway.toml"
    path.write_text(block)  # as pasted: optional lines (TLS files) are commented out
    config = load_config(str(path))
    assert config.route("gpt-4o").fallbacks == ("gpt-4o-mini",)
    assert config.router.ttft_timeout == 2.0
    keys = re.findall(r'api_key_env = "(\w+)"', block)
    gateway = Gateway(config, environ={name: "sk-test" for name in keys})
    config = with_server_overrides(config, {"port": 0})  # 8080 may be taken on a test machine
    (url,) = await nursery.start(partial(serve, config, gateway, shutdown_trigger=trio.sleep_forever))
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(url + "/healthz")).json()["status"] == "ok"
