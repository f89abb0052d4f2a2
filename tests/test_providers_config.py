"""Config for provider kinds: new keys, their errors (key, value, expectation), and variants on the wire."""

from __future__ import annotations

import pytest
import trio

import openai

from proxy.config import ConfigError, parse_config

from .conftest import MASTER_KEY, PROVIDER_KEY


def config(**provider):
    return parse_config({
        "providers": {"p": {"kind": "openai", "base_url": "https://api.example/v1", **provider}},
        "models": {"m": {"deployments": [{"provider": "p"}]}},
    })


async def test_defaults_and_new_kinds():
    p = config().providers["p"]
    assert (p.headers, p.api_key_header, p.api_version, p.max_tokens, p.auto_prompt_cache, p.tool_arguments) \
        == ((), None, None, 4096, False, "pass")
    for kind in ("openai-compatible", "anthropic", "ollama"):
        assert config(kind=kind).providers["p"].kind == kind
    anthropic = config(kind="anthropic", auto_prompt_cache=True, max_tokens=1000, api_version="2023-06-01")
    assert anthropic.providers["p"].auto_prompt_cache is True


@pytest.mark.parametrize("key, value, expected", [
    ("kind", "azure", "one of openai, openai-compatible, anthropic, ollama"),
    ("headers", {"x-a": 5}, "a printable ASCII string"),
    ("headers", {"bad header": "v"}, "an HTTP header name"),
    ("headers", "x-a: 1", "a table"),
    ("api_key_header", "api key", "an HTTP header name"),
    ("api_version", "2024 10", "a version string without spaces"),
    ("max_tokens", 0, "an integer >= 1"),
    ("auto_prompt_cache", "yes", "true or false"),
    ("auto_prompt_cache", True, 'false unless kind = "anthropic"'),
    ("tool_arguments", "strict", "one of pass, validate"),
])
async def test_bad_values_name_key_value_and_expectation(key, value, expected):
    with pytest.raises(ConfigError) as info:
        config(**{key: value})
    assert info.value.key.startswith(f"providers.p.{key}")
    assert expected in str(info.value)


async def test_azure_style_deployment_on_the_wire(nursery, fake):
    """openai-compatible with api-key header, api-version query and extra headers (Azure OpenAI)."""
    from functools import partial

    from proxy.server.app import Gateway
    from proxy.server.serve import serve

    cfg = parse_config({
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "providers": {"azure": {"kind": "openai-compatible", "api_key_env": "TEST_PROVIDER_KEY",
                                "base_url": f"http://127.0.0.1:{fake.port}/v1",
                                "api_key_header": "api-key", "api_version": "2024-10-21",
                                "headers": {"X-Tenant": "t-1"}}},
        "models": {"gpt-4o": {"deployments": [{"provider": "azure"}]}},
    })
    gateway = Gateway(cfg, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    binds = await nursery.start(partial(serve, cfg, gateway, shutdown_trigger=trio.Event().wait))
    client = openai.OpenAI(base_url=binds[0] + "/v1", api_key=MASTER_KEY, max_retries=0)
    await trio.to_thread.run_sync(lambda: client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]))
    record = fake.records[-1]
    assert record.path == "/v1/chat/completions?api-version=2024-10-21"
    assert record.headers["api-key"] == PROVIDER_KEY and record.headers["x-tenant"] == "t-1"
    assert record.authorization is None
