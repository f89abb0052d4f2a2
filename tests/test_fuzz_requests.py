"""Property: whatever JSON a client sends to a model endpoint, through whichever adapter kind, the
answer is never a 5xx, and every refusal is a well-formed error in the endpoint's own shape.

One real gateway in front of the real fake provider (all three wire formats) runs in a thread for
the whole module, so hypothesis can drive it from plain synchronous examples. Bodies are arbitrary
JSON, arbitrary objects that look like requests, and valid requests with one part replaced, removed
or added. Example counts are moderate: the module runs in a few seconds.
"""

from __future__ import annotations

import queue
import threading
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.core.validate import CHAT_FIELDS, EMBEDDINGS_FIELDS, MESSAGES_FIELDS
from proxy.server.app import Gateway
from proxy.server.serve import serve
from proxy.testing.fake import FakeProvider, FakeSettings

from .conftest import MASTER_KEY, PROVIDER_KEY
from .kinds import KINDS, MODELS, kinds_config

EXAMPLES = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def gateway_url():
    """A gateway and the fake on loopback, served by their own trio loop in a thread."""
    ready: queue.Queue = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fake = FakeProvider(FakeSettings(tokens=3))
            fake.port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
            config = kinds_config(fake.port)
            gateway = Gateway(config, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
            stop = trio.Event()
            binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=stop.wait))
            ready.put((binds[0], trio.lowlevel.current_trio_token(), stop))
            await stop.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    url, token, stop = ready.get(timeout=30)
    yield url
    trio.from_thread.run_sync(stop.set, trio_token=token)
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(gateway_url):
    with httpx.Client(base_url=gateway_url, timeout=30,
                      headers={"authorization": f"Bearer {MASTER_KEY}"}) as c:
        yield c


# -- strategies --

scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False,
                                                                                   allow_infinity=False) \
    | st.text(max_size=12) | st.sampled_from(["", "user", "assistant", "system", "tool", "text", "function",
                                              "image_url", "json_schema", "auto", "none", "required"])
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(
                               ["role", "content", "type", "text", "name", "function", "arguments", "id"]),
                               inner, max_size=4), max_leaves=12)
models = st.sampled_from([MODELS[k] for k in KINDS])

VALID = {
    "/v1/chat/completions": {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                     {"role": "user", "content": "And?"}],
        "max_tokens": 5, "stop": ["x"], "temperature": 0.5,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
    },
    "/v1/messages": {
        "max_tokens": 5, "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                       {"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"},
                                                  {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                               "data": "AA"}}]}],
        "stop_sequences": ["x"], "temperature": 0.5, "metadata": {"user_id": "u"},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "auto"},
    },
    "/v1/embeddings": {"input": ["a", "b"], "dimensions": 4, "encoding_format": "float"},
}
KNOWN = {"/v1/chat/completions": sorted(CHAT_FIELDS), "/v1/messages": sorted(MESSAGES_FIELDS),
         "/v1/embeddings": sorted(EMBEDDINGS_FIELDS)}


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place inside a JSON value: key paths into objects and arrays."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, prefix + (i,))
    return out


def mutate(body: Any, path: tuple, how: str, new: Any) -> Any:
    if not path:
        return new if how == "replace" else body
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == "delete":
        del parent[last]
    else:
        parent[last] = new
    return body


@st.composite
def mutated(draw, endpoint: str) -> Any:
    body = orjson.loads(orjson.dumps({"model": draw(models), **VALID[endpoint]}))
    if endpoint != "/v1/embeddings":
        body["stream"] = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["replace", "delete", "add"]))
        if how == "add":
            if isinstance(body, dict):
                body[draw(st.sampled_from(KNOWN[endpoint]))] = draw(json_values)
            continue
        body = mutate(body, draw(st.sampled_from(paths(body))), how, draw(json_values))
    return body


def request_like(endpoint: str):
    keys = st.sampled_from(["model", "messages", "input", "stream", "max_tokens", *KNOWN[endpoint]])
    return st.dictionaries(keys, json_values, max_size=6) | st.fixed_dictionaries(
        {"model": models}, optional={"messages": json_values, "input": json_values, "max_tokens": json_values,
                                     "stream": json_values})


def bodies(endpoint: str):
    return json_values | request_like(endpoint) | mutated(endpoint)


def check(client: httpx.Client, endpoint: str, body: Any) -> None:
    response = client.post(endpoint, content=orjson.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:500], body)
    if response.status_code >= 400:
        answer = response.json()
        if endpoint == "/v1/messages":
            assert answer["type"] == "error" and isinstance(answer["error"]["message"], str), answer
        else:
            assert isinstance(answer["error"]["message"], str) and answer["error"]["type"], answer


@EXAMPLES
@given(body=bodies("/v1/chat/completions"))
def test_chat_completions_never_answers_5xx(client, body):
    check(client, "/v1/chat/completions", body)


@EXAMPLES
@given(body=bodies("/v1/messages"))
def test_messages_never_answers_5xx(client, body):
    check(client, "/v1/messages", body)


@EXAMPLES
@given(body=bodies("/v1/embeddings"))
def test_embeddings_never_answers_5xx(client, body):
    check(client, "/v1/embeddings", body)


def test_a_good_request_is_served_after_all_of_that(client):
    """After the examples above (whatever order pytest runs them in): nothing tripped a breaker."""
    for kind in KINDS:
        response = client.post("/v1/chat/completions", json={"model": MODELS[kind],
                                                             "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 200, response.text
