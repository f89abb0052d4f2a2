"""The retry/failover loop with scripted providers and the autojump clock: exact times.

The upstream here is a stand-in (no sockets: the autojump clock would jump over real I/O);
`tests/test_routing_e2e.py` runs the same paths through real sockets and fake providers.
"""

import contextlib
import math
import random

import orjson
import pytest
import trio

from proxy.routing import failover as dispatch
from proxy.core.request import parse_chat_request
from proxy.config import parse_config
from proxy.core.errors import InvalidRequest, UpstreamError, UpstreamRateLimited, UpstreamStatusError, UpstreamTimeout
from proxy.formats import make_adapter
from proxy.core.errors import FirstTokenTimeout, NoHealthyDeployment, RequestTimeout, Saturated
from proxy.routing.policy import backoff
from proxy.routing.router import Router

COMPLETION = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)


ROLE = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOKEN = sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
END = sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n"


class Body:
    def __init__(self, script):
        self._script = list(script)  # [(delay, bytes | exception)]
        self.timer = None
        self.deadline = math.inf

    def first_output(self) -> None:  # as proxy.transport.upstream.Body: the TTFT deadline is over
        self.timer.deadline = self.deadline

    async def next(self) -> bytes:
        if not self._script:
            return b""
        delay, item = self._script.pop(0)
        await trio.sleep(delay)
        if isinstance(item, Exception):
            raise item
        return item


class ScriptedUpstream:
    """behaviours[provider] is a list consumed one per call: an exception, bytes, or a Body."""

    def __init__(self, **behaviours):
        self.behaviours = {k: list(v) for k, v in behaviours.items()}
        self.calls: list[tuple[float, str]] = []

    def _next(self, name):
        self.calls.append((trio.current_time(), name))
        script = self.behaviours[name]
        return script.pop(0) if len(script) > 1 else script[0]

    async def request(self, adapter, wire, *, deadline=math.inf):
        item = self._next(adapter.name)
        if isinstance(item, Exception):
            raise item
        return item

    @contextlib.asynccontextmanager
    async def stream(self, adapter, wire, *, ttft_deadline=math.inf, deadline=math.inf):
        """Like proxy.transport.upstream.Upstream.stream: the TTFT deadline and the request's own
        on the body's one timer."""
        item = self._next(adapter.name)
        if isinstance(item, Exception):
            raise item
        with trio.CancelScope(deadline=min(ttft_deadline, deadline)) as timer:
            item.timer = timer
            item.deadline = deadline
            yield item
        if timer.cancelled_caught:
            if timer.deadline >= deadline:
                raise RequestTimeout(f"request_timeout ran out streaming from provider {adapter.name}")
            raise FirstTokenTimeout(f"provider {adapter.name}: no first token within the ttft_timeout")


def routing_config(*, router=None, models=None, providers=("p1", "p2")):
    return parse_config({
        "router": router or {},
        "providers": {p: {"kind": "openai", "base_url": f"http://{p}.invalid/v1"} for p in providers},
        "models": models or {"m": {"deployments": [{"provider": "p1", "model": "a"},
                                                   {"provider": "p2", "model": "b"}]}},
    })


def gateway(upstream, *, router=None, models=None, providers=("p1", "p2")):
    config = routing_config(router=router, models=models, providers=providers)
    return dispatch.Failover(Router(config, rng=random.Random(1), environ={}), upstream,
                             {name: make_adapter(p, None) for name, p in config.providers.items()},
                             config.server.max_event_bytes)


def request(stream=False, model="m"):
    return parse_chat_request(orjson.dumps({"model": model, "stream": stream,
                                            "messages": [{"role": "user", "content": "x"}]}))


def err(status, **kw):
    if status == 429:
        return UpstreamRateLimited("limited", **kw)
    return UpstreamStatusError(f"status {status}", status=status)


PRIMARY_FIRST = {"m": {"deployments": [{"provider": "p1", "model": "a", "priority": 0},
                                       {"provider": "p2", "model": "b", "priority": 1}]}}


async def test_retry_waits_a_full_jitter_backoff_then_tries_another_deployment(autojump_clock):
    up = ScriptedUpstream(p1=[err(503)], p2=[COMPLETION])
    gw = gateway(up, router={"backoff_initial": 0.5, "backoff_max": 8}, models=PRIMARY_FIRST)
    served = dispatch.Served()
    result = await gw.complete(request(), served)
    assert result["choices"][0]["message"]["content"] == "hi"
    rng = random.Random(1)  # the router's: one draw picked p1, the next is the backoff
    rng.random()
    expected = backoff(0, 0.5, 8, rng)
    assert up.calls == [(0.0, "p1"), (pytest.approx(expected), "p2")]
    assert served.attempts == 2 and served.deployment == "p2/b" and not served.fallback


async def test_retry_after_within_the_limit_is_honoured_exactly(autojump_clock):
    up = ScriptedUpstream(p1=[err(429, retry_after="2"), COMPLETION])
    gw = gateway(up, models={"m": {"deployments": [{"provider": "p1", "model": "a"}]}})
    await gw.complete(request(), dispatch.Served())
    assert up.calls == [(0.0, "p1"), (2.0, "p1")]


async def test_retry_after_beyond_the_limit_fails_over_at_once_and_cools_the_deployment(autojump_clock):
    up = ScriptedUpstream(p1=[err(429, retry_after="30")], p2=[COMPLETION])
    gw = gateway(up, router={"retry_after_max": 5}, models=PRIMARY_FIRST)
    await gw.complete(request(), dispatch.Served())
    assert up.calls == [(0.0, "p1"), (0.0, "p2")]
    await trio.sleep(29)
    await gw.complete(request(), dispatch.Served())
    assert up.calls[-1] == (29.0, "p2")  # p1 still cooling
    await trio.sleep(1)
    up.behaviours["p1"] = [COMPLETION]
    await gw.complete(request(), dispatch.Served())
    assert up.calls[-1] == (30.0, "p1")


async def test_401_opens_the_breaker_at_once_and_a_probe_follows_the_cooldown(autojump_clock):
    up = ScriptedUpstream(p1=[err(401)], p2=[COMPLETION])
    gw = gateway(up, router={"breaker_cooldown": 30}, models=PRIMARY_FIRST)
    served = dispatch.Served()
    await gw.complete(request(), served)
    assert up.calls == [(0.0, "p1"), (0.0, "p2")]  # no retry of p1, no backoff
    assert gw.router.states["p1/a"].breaker.state == "open"
    await trio.sleep(29.9)
    await gw.complete(request(), dispatch.Served())
    assert up.calls[-1] == (29.9, "p2")
    await trio.sleep(0.1)
    up.behaviours["p1"] = [COMPLETION]
    await gw.complete(request(), dispatch.Served())
    assert up.calls[-1] == (30.0, "p1")  # half-open probe succeeded
    assert gw.router.states["p1/a"].breaker.state == "closed"


async def test_400_goes_back_at_once(autojump_clock):
    up = ScriptedUpstream(p1=[err(400)], p2=[COMPLETION])
    gw = gateway(up, models=PRIMARY_FIRST)
    with pytest.raises(UpstreamStatusError) as info:
        await gw.complete(request(), dispatch.Served())
    assert info.value.status == 400
    assert up.calls == [(0.0, "p1")]


async def test_retries_exhausted_then_fallback_model(autojump_clock):
    up = ScriptedUpstream(p1=[err(503)], p2=[COMPLETION])
    models = {"m": {"deployments": [{"provider": "p1", "model": "a"}], "fallbacks": ["backup"]},
              "backup": {"deployments": [{"provider": "p2", "model": "b"}]}}
    gw = gateway(up, router={"retries": 2, "backoff_initial": 1, "backoff_max": 1}, models=models)
    served = dispatch.Served()
    await gw.complete(request(), served)
    assert [name for _, name in up.calls] == ["p1", "p1", "p1", "p2"]
    assert served.fallback and served.deployment == "p2/b" and served.attempts == 4


async def test_context_length_error_goes_to_the_context_window_fallback(autojump_clock):
    too_long = UpstreamStatusError("too long", status=400, code="context_length_exceeded")
    up = ScriptedUpstream(p1=[too_long], p2=[COMPLETION])
    models = {"m": {"deployments": [{"provider": "p1", "model": "small"}],
                    "context_window_fallback": "big"},
              "big": {"deployments": [{"provider": "p2", "model": "large"}]}}
    served = dispatch.Served()
    await gateway(up, models=models).complete(request(), served)
    assert served.deployment == "p2/large" and served.fallback


async def test_all_breakers_open_is_503_with_retry_after(autojump_clock):
    up = ScriptedUpstream(p1=[err(401)], p2=[err(403)])
    gw = gateway(up, router={"breaker_cooldown": 30})
    with pytest.raises(UpstreamStatusError):
        await gw.complete(request(), dispatch.Served())
    await trio.sleep(10)
    with pytest.raises(NoHealthyDeployment) as info:
        await gw.complete(request(), dispatch.Served())
    assert info.value.status == 503
    assert dict(info.value.headers())[b"retry-after"] == b"20"


async def test_request_timeout_bounds_retries(autojump_clock):
    up = ScriptedUpstream(p1=[err(503)], p2=[err(503)])
    gw = gateway(up, router={"retries": 100, "backoff_initial": 1, "backoff_max": 1,
                             "request_timeout": 5, "breaker_failures": 1000})
    with pytest.raises(UpstreamTimeout, match="request_timeout"):
        await gw.complete(request(), dispatch.Served())
    assert trio.current_time() == 5.0


async def test_request_timeout_ends_a_committed_stream_without_failover_or_a_verdict(autojump_clock):
    # Tokens at 1 s, then every 2 s; request_timeout 5: the stream ends at 5 s exactly, after
    # three tokens, with no switch to p2 and nothing counted against p1's breaker.
    slow = Body([(0, ROLE), (1.0, TOKEN), (2.0, TOKEN), (2.0, TOKEN), (2.0, TOKEN), (0, END)])
    up = ScriptedUpstream(p1=[slow], p2=[Body([(0, ROLE), (0, TOKEN), (0, END)])])
    gw = gateway(up, router={"request_timeout": 5}, models=PRIMARY_FIRST)
    emitted = []

    async def emit(chunks):
        emitted.append(trio.current_time())

    served = dispatch.Served()
    with pytest.raises(UpstreamTimeout, match="request_timeout of 5 s exceeded after 1 attempts"):
        await gw.stream(request(stream=True), emit, served)
    assert trio.current_time() == 5.0
    assert emitted == [1.0, 3.0]  # the role chunk goes with the first token
    assert up.calls == [(0.0, "p1")]
    state = gw.router.states["p1/a"]
    assert state.failures == 0 and state.breaker.consecutive_failures == 0
    assert served.tried[0][:2] == ("p1/a", "upstream_timeout")


@pytest.mark.parametrize("how", ["pinned", "bypass"])
async def test_request_timeout_bounds_a_pinned_or_bypassed_request_too(autojump_clock, how):
    models = {"m": {"deployments": [{"provider": "p1", "model": "a"}]}}
    if how == "pinned":
        models["m"]["pin"] = "p1/a"
    up = ScriptedUpstream(p1=[Body([(0, ROLE), (30.0, TOKEN), (0, END)])])
    gw = gateway(up, router={"request_timeout": 4}, models=models)
    gw.router.bypass = how == "bypass"
    with pytest.raises(UpstreamTimeout, match="request_timeout"):
        await gw.stream(request(stream=True), _sink, dispatch.Served())
    assert trio.current_time() == 4.0


async def test_ttft_timeout_fails_over_before_any_byte(autojump_clock):
    slow = Body([(0, ROLE), (3.0, TOKEN), (0, END)])
    fast = Body([(0, ROLE), (0.5, TOKEN), (0, END)])
    up = ScriptedUpstream(p1=[slow], p2=[fast])
    gw = gateway(up, router={"ttft_timeout": 2.0}, models=PRIMARY_FIRST)
    emitted = []

    async def emit(chunks):
        emitted.append((trio.current_time(), chunks))

    served = dispatch.Served()
    await gw.stream(request(stream=True), emit, served)
    assert up.calls == [(0.0, "p1"), (2.0, "p2")]
    assert emitted[0][0] == 2.5  # role chunk held back until the first token, then both at once
    assert b'"role"' in emitted[0][1][0].data and b'"Hi"' in emitted[0][1][1].data
    assert served.deployment == "p2/b"


async def test_ttft_timeout_per_deployment_overrides_model_and_router(autojump_clock):
    models = {"m": {"ttft_timeout": 5, "deployments": [
        {"provider": "p1", "model": "a", "priority": 0, "ttft_timeout": 1},
        {"provider": "p2", "model": "b", "priority": 1}]}}
    up = ScriptedUpstream(p1=[Body([(0, ROLE), (1.5, TOKEN), (0, END)])],
                          p2=[Body([(0, ROLE), (4.5, TOKEN), (0, END)])])
    gw = gateway(up, router={"ttft_timeout": 0.1}, models=models)
    await gw.stream(request(stream=True), _sink, dispatch.Served())
    assert up.calls == [(0.0, "p1"), (1.0, "p2")]  # p1 gave up at 1 s; p2 had 5 s and needed 4.5


async def _sink(chunks):
    pass


async def test_failure_after_the_first_token_is_not_retried(autojump_clock):
    broken = Body([(0, ROLE), (0.1, TOKEN), (0.1, UpstreamError("provider p1: reset"))])
    up = ScriptedUpstream(p1=[broken], p2=[Body([(0, ROLE), (0, TOKEN), (0, END)])])
    gw = gateway(up, models=PRIMARY_FIRST)
    emitted = []

    async def emit(chunks):
        emitted.extend(chunks)

    served = dispatch.Served()
    with pytest.raises(UpstreamError, match="reset"):
        await gw.stream(request(stream=True), emit, served)
    assert [name for _, name in up.calls] == ["p1"] and served.committed
    assert len(emitted) == 2  # role + token reached the client; no silent switch


async def test_weights_nine_to_one_over_a_thousand_picks():
    gw = gateway(ScriptedUpstream(), models={"m": {"deployments": [
        {"provider": "p1", "model": "a", "weight": 9}, {"provider": "p2", "model": "b", "weight": 1}]}})
    route = gw.router.check_model("m")
    picks = [gw.router.choose(route, 0.0, excluded=set(), tried=set()).name for _ in range(1000)]
    assert 860 <= picks.count("p1/a") <= 940  # 900 +- 4 sigma


async def test_priority_moves_on_only_when_the_first_group_is_exhausted():
    gw = gateway(ScriptedUpstream(), models=PRIMARY_FIRST)
    route = gw.router.check_model("m")
    assert {gw.router.choose(route, 0.0, excluded=set(), tried=set()).name for _ in range(50)} == {"p1/a"}
    assert gw.router.choose(route, 0.0, excluded={"p1/a"}, tried=set()).name == "p2/b"
    assert gw.router.choose(route, 0.0, excluded={"p1/a", "p2/b"}, tried=set()) is None


async def test_saturated_deployment_waits_queue_timeout_then_moves_on(autojump_clock):
    models = {"m": {"deployments": [{"provider": "p1", "model": "a", "max_concurrency": 1, "priority": 0},
                                    {"provider": "p2", "model": "b", "priority": 1}]}}
    hold = Body([(0, ROLE), (10, TOKEN), (0, END)])
    up = ScriptedUpstream(p1=[hold], p2=[COMPLETION])
    gw = gateway(up, router={"queue_timeout": 0.5}, models=models)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.stream, request(stream=True), _sink, dispatch.Served())
        await trio.sleep(1)
        served = dispatch.Served()
        await gw.complete(request(), served)
        assert served.deployment == "p2/b" and trio.current_time() == 1.5


async def test_saturated_with_nowhere_else_is_429(autojump_clock):
    models = {"m": {"deployments": [{"provider": "p1", "model": "a", "max_concurrency": 1}]}}
    up = ScriptedUpstream(p1=[Body([(0, ROLE), (10, TOKEN), (0, END)])])
    gw = gateway(up, router={"queue_timeout": 0.5}, models=models)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.stream, request(stream=True), _sink, dispatch.Served())
        await trio.sleep(1)
        with pytest.raises(Saturated) as info:
            await gw.complete(request(), dispatch.Served())
        assert info.value.status == 429 and dict(info.value.headers())[b"retry-after"] == b"1"


async def test_bypass_goes_straight_to_the_first_deployment_once(autojump_clock):
    up = ScriptedUpstream(p1=[err(503)], p2=[COMPLETION])
    gw = gateway(up, models=PRIMARY_FIRST)
    gw.router.bypass = True
    with pytest.raises(UpstreamStatusError):
        await gw.complete(request(), dispatch.Served())
    assert up.calls == [(0.0, "p1")]
    assert gw.router.states["p1/a"].breaker.consecutive_failures == 0  # breaker out of the way


def test_bypass_from_the_environment():
    config = routing_config()
    assert Router(config, environ={"BYPASS_ROUTER": "true"}).bypass
    assert not Router(config, environ={"BYPASS_ROUTER": "false"}).bypass


async def test_pinned_model_and_deployment_header(autojump_clock):
    models = {"fast": {"pin": "p2/b", "deployments": [{"provider": "p1", "model": "a"},
                                                      {"provider": "p2", "model": "b"}]},
              "m": {"allow_deployment_header": True, "deployments": [{"provider": "p1", "model": "a"},
                                                                    {"provider": "p2", "model": "b"}]},
              # p2 only after p1: if the header were honoured here, p2 would serve
              "closed": {"deployments": [{"provider": "p1", "model": "a"},
                                         {"provider": "p2", "model": "b", "priority": 1}]}}
    up = ScriptedUpstream(p1=[COMPLETION], p2=[err(503)])
    gw = gateway(up, models=models)
    with pytest.raises(UpstreamStatusError):  # pinned: one attempt, no failover
        await gw.complete(request(model="fast"), dispatch.Served())
    assert up.calls == [(0.0, "p2")]
    served = dispatch.Served(requested="p1/a")
    await gw.complete(request(model="m"), served)
    assert served.deployment == "p1/a"
    with pytest.raises(InvalidRequest):
        await gw.complete(request(model="m"), dispatch.Served(requested="nope"))
    served = dispatch.Served(requested="p2/b")  # not allowed on "closed": the header is ignored
    up.behaviours["p2"] = [COMPLETION]
    up.calls.clear()
    await gw.complete(request(model="closed"), served)
    assert served.attempts == 1 and served.deployment == "p1/a"
    assert [name for _, name in up.calls] == ["p1"]


async def test_in_flight_is_counted_without_max_concurrency(autojump_clock):
    router = Router(routing_config(models={"m": {"deployments": [
        {"provider": "p1", "model": "a"}, {"provider": "p2", "model": "b", "max_concurrency": 1}]}}),
        environ={})
    free, limited = router.states["p1/a"], router.states["p2/b"]

    def in_flight() -> dict[str, int]:
        return {d["name"]: d["in_flight"] for d in router.snapshot(trio.current_time())["deployments"]}

    assert in_flight() == {"p1/a": 0, "p2/b": 0}
    for state in (free, free, limited):
        await router.admit(state)
    assert in_flight() == {"p1/a": 2, "p2/b": 1}

    async def refused() -> None:  # another request finds the limited one full
        with pytest.raises(Saturated):
            await router.admit(limited)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refused)
    assert in_flight() == {"p1/a": 2, "p2/b": 1}  # a refused admission is not in flight
    router.release(free)
    router.release(limited)
    assert in_flight() == {"p1/a": 1, "p2/b": 0}
