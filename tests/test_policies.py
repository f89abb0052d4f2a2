"""The per-request policy seam: admit before any provider, settle once per request whatever happened."""

from typing import Any

import trio

from proxy.core.errors import Saturated
from proxy.core.events import Chunk
from proxy.server.exchange import Exchange
from tests.conftest import chat_body, parse_sse


class Recorder:
    """A policy that refuses one model, answers another itself, and records every settlement."""

    def __init__(self):
        self.settled: list[tuple[str, str, int, str]] = []

    async def admit(self, x: Exchange, request: Any) -> None:
        if x.model == "refused":
            raise Saturated("slow down")
        if x.model == "answered":
            x.answer, x.cache = Canned(), "hit"
        x.response_headers.append((b"x-policy", b"seen"))

    def settle(self, x: Exchange) -> None:
        self.settled.append((x.path, x.model, x.status, x.outcome))


class Canned:
    async def stream(self, emit):
        await emit([Chunk(b'{"choices":[{"index":0,"delta":{"content":"from policy"}}]}')])

    def completion(self):
        return {"id": "c", "object": "chat.completion", "model": "answered", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "from policy"}, "finish_reason": "stop"}]}


async def test_settle_runs_once_for_served_refused_answered_and_unknown(gw, http):
    policy = Recorder()
    gw.gateway.policies.add(policy)
    ok = await http.post(gw.url + "/v1/chat/completions", json=chat_body("hi"))
    refused = await http.post(gw.url + "/v1/chat/completions", json=chat_body("hi", model="refused"))
    answered = await http.post(gw.url + "/v1/chat/completions", json=chat_body("hi", model="answered"))
    streamed = await http.post(gw.url + "/v1/chat/completions", json=chat_body("hi", model="answered", stream=True))
    missing = await http.get(gw.url + "/nope")
    assert [r.status_code for r in (ok, refused, answered, streamed, missing)] == [200, 429, 200, 200, 404]
    assert ok.headers["x-policy"] == "seen" and "x-gateway-cache" not in ok.headers
    assert answered.json()["choices"][0]["message"]["content"] == "from policy"
    assert answered.headers["x-gateway-cache"] == "hit" and "x-gateway-deployment" not in answered.headers
    assert b"from policy" in b"".join(parse_sse(streamed.content))
    with trio.fail_after(5):  # the server settles just after the response's last byte went out
        while len(policy.settled) < 5:
            await trio.sleep(0.01)
    assert policy.settled == [
        ("/v1/chat/completions", "gpt-4o", 200, "ok"),
        ("/v1/chat/completions", "refused", 429, "error"),
        ("/v1/chat/completions", "answered", 200, "ok"),
        ("/v1/chat/completions", "answered", 200, "ok"),
        ("/nope", "-", 404, "error"),
    ]


async def test_policies_run_in_their_declared_order_whatever_order_they_were_added(gw, http):
    from proxy.server.exchange import Policies

    seen: list[str] = []

    class Named:
        def __init__(self, name):
            self.name = name

        async def admit(self, x, request):
            seen.append(self.name)

        def settle(self, x):
            seen.append("settle " + self.name)

    policies = gw.gateway.policies
    policies.add(Named("metrics"), Policies.METRICS)
    policies.add(Named("keys"), Policies.KEYS)
    policies.add(Named("tiers"), Policies.TIERS)
    assert (await http.post(gw.url + "/v1/chat/completions", json=chat_body("hi"))).status_code == 200
    with trio.fail_after(5):
        while len(seen) < 6:
            await trio.sleep(0.01)
    assert seen == ["tiers", "keys", "metrics", "settle tiers", "settle keys", "settle metrics"]


async def test_a_prefix_route_serves_the_paths_below_it(gw, http):
    from proxy.server.app import Route
    from proxy.server.asgi import send_json

    async def echo(x, body, headers, receive, send):
        await send_json(send, 200, {"path": x.path}, x.response_headers)

    gw.gateway.add_route("/admin/things/", Route({"GET": echo}, auth="admin", body=False))
    response = await http.get(gw.url + "/admin/things/abc")
    assert response.json() == {"path": "/admin/things/abc"}
    assert (await http.get(gw.url + "/admin/thing")).status_code == 404
