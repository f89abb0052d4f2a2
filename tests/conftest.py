"""Shared fixtures: a real fake provider and a real gateway, both on port 0 on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from proxy.server.app import Gateway
from proxy.config import Config, parse_config
from proxy.testing.fake import FakeProvider, FakeSettings
from proxy.server.serve import serve

PROVIDER_KEY = "sk-provider-secret-123"
MASTER_KEY = "sk-master-secret-456"


@dataclass
class Running:
    url: str  # e.g. http://127.0.0.1:41234
    gateway: Gateway
    stop: trio.Event

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def config_for(provider_port: int, *, server: dict[str, Any] | None = None,
               provider: dict[str, Any] | None = None, models: dict[str, Any] | None = None,
               router: dict[str, Any] | None = None):
    return parse_config({
        "server": {"host": "127.0.0.1", "port": 0, **(server or {})},
        "router": router or {},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "providers": {"fake": {"kind": "openai", "base_url": f"http://127.0.0.1:{provider_port}/v1",
                               "api_key_env": "TEST_PROVIDER_KEY", **(provider or {})}},
        "models": models or {"gpt-4o": {"deployments": [{"provider": "fake"}]},
                             "alias": {"deployments": [{"provider": "fake", "model": "fake-model"}]}},
    })


@pytest.fixture
async def fake(nursery):
    provider = FakeProvider(FakeSettings(tokens=8))
    provider.port = await nursery.start(partial(provider.serve, "127.0.0.1", 0))
    return provider


@pytest.fixture
def start_gateway(nursery, fake):
    """start_gateway(server={...}, provider={...}, master_key=...) -> Running."""

    async def start(*, master_key: str | None = MASTER_KEY, provider_port: int | None = None,
                    **overrides: Any) -> Running:
        return await run_gateway(nursery, config_for(provider_port or fake.port, **overrides), master_key)

    return start


async def run_gateway(nursery, config: Config, master_key: str | None = MASTER_KEY) -> Running:
    """A gateway serving `config` on its port (0: a free one) until `.stop` is set."""
    environ = {"TEST_PROVIDER_KEY": PROVIDER_KEY}
    if master_key:
        environ["TEST_MASTER_KEY"] = master_key
    gateway = Gateway(config, environ)
    stop = trio.Event()
    binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=stop.wait))
    return Running(binds[0], gateway, stop)


@pytest.fixture
async def gw(start_gateway):
    return await start_gateway()


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        yield client


def chat_body(content: str = "Hello", *, model: str = "gpt-4o", stream: bool = False, **extra: Any):
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}], **extra}


def parse_sse(body: bytes) -> list[bytes]:
    """The data payloads of a complete SSE body (test helper; the product uses proxy.core.sse)."""
    from proxy.core.sse import SSEDecoder

    decoder = SSEDecoder()
    return [e.data for e in decoder.feed(body) + decoder.close()]
