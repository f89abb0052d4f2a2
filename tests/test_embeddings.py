"""POST /v1/embeddings through the official openai SDK, to OpenAI-compatible and Ollama deployments."""

from __future__ import annotations

import openai
import pytest
import trio

from .conftest import MASTER_KEY, PROVIDER_KEY
from .kinds import MODELS, start_kinds


@pytest.fixture
async def kgw(nursery, fake):
    return await start_kinds(nursery, fake.port)


def sdk(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0, timeout=30)


@pytest.mark.parametrize("kind, path", [("openai", "/v1/embeddings"), ("ollama", "/api/embed")])
async def test_embeddings_through_the_sdk(kgw, fake, kind, path):
    result = await trio.to_thread.run_sync(lambda: sdk(kgw).embeddings.create(
        model=MODELS[kind], input=["hello world", "good bye"], encoding_format="float"))
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8 and result.data[0].embedding != result.data[1].embedding
    assert result.model == MODELS[kind]
    assert result.usage.prompt_tokens == 4
    record = fake.records[-1]
    assert record.path == path and record.body["input"] == ["hello world", "good bye"]
    if kind == "openai":
        assert record.authorization == f"Bearer {PROVIDER_KEY}"
    else:
        assert record.authorization is None  # ollama needs no key and none is configured


async def test_dimensions_are_forwarded(kgw):
    result = await trio.to_thread.run_sync(lambda: sdk(kgw).embeddings.create(
        model="via-ollama", input="one", dimensions=3))
    assert len(result.data[0].embedding) == 3


async def test_anthropic_deployment_has_no_embeddings(kgw, http):
    response = await http.post(kgw.v1 + "/embeddings", json={"model": "via-anthropic", "input": "x"})
    assert response.status_code == 400
    assert "no embeddings" in response.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": "via-openai"}, "input"), ({"model": "via-openai", "input": []}, "input"),
    ({"model": "via-openai", "input": [1, "a"]}, "input[1]"), ({"input": "x"}, "model"),
    ({"model": "via-openai", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "via-openai", "input": "x", "encoding_format": "int8"}, "encoding_format"),
])
async def test_bad_embeddings_requests(kgw, http, body, param):
    response = await http.post(kgw.v1 + "/embeddings", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_provider_error_is_relayed(kgw, fake, http):
    fake.set_control(fail_percent=100, fail_status=503)
    response = await http.post(kgw.v1 + "/embeddings", json={"model": "via-openai", "input": "x"})
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    assert PROVIDER_KEY not in response.text


async def test_unknown_model_and_auth(kgw, http):
    assert (await http.post(kgw.v1 + "/embeddings", json={"model": "nope", "input": "x"})).status_code == 404
    response = await http.post(kgw.v1 + "/embeddings", json={"model": "via-openai", "input": "x"},
                               headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401
