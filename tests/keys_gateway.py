"""A real gateway with virtual keys on: [state] on a temp SQLite file (or a Redis URL), the fake
provider behind it, and helpers to make keys through the admin API.

    from tests.keys_gateway import keys_gateway   # fixture: start(**config) -> Running
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from proxy.config import parse_config
from tests.conftest import MASTER_KEY, Running, run_gateway

# $10 / $30 per million tokens: one fake answer (8 tokens out, ~10 in) costs about $0.00034.
PRICED = {"gpt-4o": {"input_usd_per_mtok": 10.0, "output_usd_per_mtok": 30.0, "max_output_tokens": 100},
          "fake-model": {"input_usd_per_mtok": 10.0, "output_usd_per_mtok": 30.0, "max_output_tokens": 100},
          "gpt-4o-mini": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 3.0, "max_output_tokens": 100}}


def keys_config(provider_port: int, state: dict[str, Any], **sections: Any):
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "providers": {"fake": {"kind": "openai", "base_url": f"http://127.0.0.1:{provider_port}/v1",
                               "api_key_env": "TEST_PROVIDER_KEY"}},
        "models": {"gpt-4o": {"deployments": [{"provider": "fake"}]},
                   "alias": {"deployments": [{"provider": "fake", "model": "fake-model"}]},
                   "gpt-4o-mini": {"deployments": [{"provider": "fake"}]}},
        "state": state,
        "model_info": PRICED,
    }
    for name, value in sections.items():
        if name == "auth":
            raw["auth"].update(value)
        else:
            raw[name] = value
    return parse_config(raw)


@pytest.fixture
def keys_gateway(nursery, fake, tmp_path):
    """start(state={...}, budgets={...}, teams={...}, auth={...}) -> Running, keys on."""

    async def start(*, state: dict[str, Any] | None = None, master_key: str | None = MASTER_KEY,
                    **sections: Any) -> Running:
        config = keys_config(fake.port, {"path": str(tmp_path / "gateway.db"), **(state or {})}, **sections)
        return await run_gateway(nursery, config, master_key)

    return start


async def create_key(http: httpx.AsyncClient, url: str, **fields: Any) -> dict[str, Any]:
    response = await http.post(url + "/admin/keys", json={"name": "test", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
