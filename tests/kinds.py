"""Test helper: one gateway in front of the fake provider speaking each wire format.

Models: "via-openai" (kind openai), "via-anthropic" (kind anthropic), "via-ollama" (kind ollama),
all served by the same fake provider (it answers each format on that format's path).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import trio

from proxy.server.app import Gateway
from proxy.config import parse_config
from proxy.server.serve import serve

from .conftest import MASTER_KEY, PROVIDER_KEY, Running

KINDS = ("openai", "anthropic", "ollama")
MODELS = {"openai": "via-openai", "anthropic": "via-anthropic", "ollama": "via-ollama"}
UPSTREAM_MODELS = {"openai": "gpt-fake", "anthropic": "claude-fake", "ollama": "llama-fake"}


def kinds_config(port: int, *, extra: dict[str, dict[str, Any]] | None = None):
    extra = extra or {}
    base = f"http://127.0.0.1:{port}"
    providers = {
        "openai": {"kind": "openai", "base_url": base + "/v1", "api_key_env": "TEST_PROVIDER_KEY"},
        "anthropic": {"kind": "anthropic", "base_url": base, "api_key_env": "TEST_PROVIDER_KEY"},
        "ollama": {"kind": "ollama", "base_url": base},
    }
    for kind, keys in extra.items():
        providers[kind].update(keys)
    return parse_config({
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "providers": providers,
        "models": {MODELS[k]: {"deployments": [{"provider": k, "model": UPSTREAM_MODELS[k]}]} for k in KINDS},
    })


async def start_kinds(nursery: trio.Nursery, port: int, **kw: Any) -> Running:
    config = kinds_config(port, **kw)
    gateway = Gateway(config, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    stop = trio.Event()
    binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=stop.wait))
    return Running(binds[0], gateway, stop)
