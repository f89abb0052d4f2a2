"""The response cache, end to end: official SDKs -> gateway -> fake provider (memory store)."""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import trio

from proxy.cache import key as keys
from proxy.cache.entry import Entry
from proxy.cache.policy import ResponseCache
from proxy.cache.stores import MemoryStore
from proxy.config import CacheConfig, ConfigError, parse_config
from proxy.server.app import Gateway
from proxy.server.exchange import Policies, Principal
from proxy.server.serve import serve

from .conftest import MASTER_KEY, PROVIDER_KEY, Running, parse_sse
from .kinds import MODELS, kinds_config

OPENAI, ANTHROPIC = MODELS["openai"], MODELS["anthropic"]
HEADERS = {"authorization": f"Bearer {MASTER_KEY}"}


class Clock:
    """Wall-clock seconds the test moves by hand (TTL and stale windows without sleeping)."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def start_cached(nursery, port: int, *, clock: Clock | None = None, store: Any = None,
                       **cache: Any) -> Running:
    config = kinds_config(port)
    config = dataclasses.replace(config, cache=CacheConfig(**{"enabled": True, "backend": "memory", **cache}))
    gateway = Gateway(config, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    if clock is not None or store is not None:  # the same policy, with the test's clock or store
        cache_policy = ResponseCache(config.cache, store=store, clock=clock or time.time)
        gateway.policies.list[gateway.policies.list.index(gateway.cache)] = cache_policy
        gateway.cache = cache_policy
    stop = trio.Event()
    binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=stop.wait))
    return Running(binds[0], gateway, stop)


async def settled(gw: Running, writes: int) -> None:
    """Until the writer stored `writes` entries (it runs after the response went out)."""
    with trio.fail_after(5):
        while gw.gateway.cache.statistics().writes < writes:
            await trio.sleep(0.005)


def body(content: str = "Hello", *, model: str = OPENAI, stream: bool = False, **extra: Any) -> dict:
    return {"model": model, "stream": stream, "temperature": 0,
            "messages": [{"role": "user", "content": content}], **extra}


def upstream_calls(fake) -> int:
    return sum(1 for r in fake.records if r.path.endswith(("/chat/completions", "/messages", "/embeddings")))


# -- the key --

def test_key_ignores_key_order_whitespace_and_delivery_fields():
    a = orjson.loads(b'{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}],"stream":true}')
    b = orjson.loads(b'{ "messages" : [ {"content":"hi", "role":"user"} ],\n "temperature": 0, "model": "m",'
                     b' "user": "u1", "stream_options": {"include_usage": true}}')
    assert keys.cache_key("default", "chat", "m", a) == keys.cache_key("default", "chat", "m", b)
    # what changes the answer changes the key: content, sampling, model, endpoint, tenant
    assert keys.cache_key("default", "chat", "m", a) != keys.cache_key("default", "chat", "m", dict(a, temperature=0.5))
    assert keys.cache_key("default", "chat", "m", a) != keys.cache_key("default", "chat", "m2", a)
    assert keys.cache_key("default", "chat", "m", a) != keys.cache_key("default", "messages", "m", a)
    assert keys.cache_key("default", "chat", "m", a) != keys.cache_key("team:t", "chat", "m", a)
    assert keys.namespace("t", "k1") == keys.namespace("t", "k2") == "team:t"
    assert keys.namespace(None, "t") != keys.namespace("t", None)
    assert keys.namespace(None, None) == "default"


def test_directive_from_mode_and_headers():
    d = keys.directive
    assert d({}, False, True) == keys.Directive(True, True)
    assert d({}, False, False) == keys.Directive(False, False)
    assert d({}, True, False) == keys.Directive(True, True)
    assert d({b"x-gateway-cache": b"use"}, False, False) == keys.Directive(True, True)
    assert d({b"x-gateway-cache": b"skip"}, True, True) == keys.Directive(False, False)
    assert d({b"x-gateway-cache": b"refresh"}, False, True) == keys.Directive(False, True)
    assert d({b"cache-control": b"no-cache"}, False, True) == keys.Directive(False, True)
    assert d({b"cache-control": b"max-age=0, no-store"}, False, True) == keys.Directive(True, False)
    assert keys.deterministic({"seed": 7}) and keys.deterministic({"temperature": 0})
    assert not keys.deterministic({}) and not keys.deterministic({"seed": True, "temperature": 1})


def test_config_checks_name_the_key():
    base = {"providers": {"p": {"kind": "openai", "base_url": "http://x/v1"}},
            "models": {"m": {"deployments": [{"provider": "p"}]}}}
    config = parse_config({**base, "cache": {"enabled": True, "backend": "memory", "ttl": 60, "mode": "all",
                                             "stale_if_error": 0, "max_entries": 10, "max_bytes": 4096,
                                             "max_entry_bytes": 1024, "replay": "original"}})
    assert config.cache.mode == "all" and config.cache.max_entries == 10 and config.cache.replay == "original"
    for bad, where in [({"backend": "disk"}, "cache.backend"), ({"mode": "some"}, "cache.mode"),
                       ({"replay": "paced"}, "cache.replay"),
                       ({"ttl": 0}, "cache.ttl"), ({"backend": "redis"}, "cache.url"),
                       ({"max_bytes": 2048, "max_entry_bytes": 4096}, "cache.max_entry_bytes"),
                       ({"size": 1}, "cache.size")]:
        with pytest.raises(ConfigError) as e:
            parse_config({**base, "cache": bad})
        assert where in str(e.value)


# -- hits through the official SDKs --

async def test_openai_sdk_stream_hit_is_the_same_stream_with_usage(nursery, fake):
    gw = await start_cached(nursery, fake.port)
    client = openai.OpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0, timeout=30)

    def ask():
        raw = client.chat.completions.with_raw_response.create(
            model=OPENAI, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Tell me something"}])
        return raw.headers.get("x-gateway-cache"), list(raw.parse())

    first_header, first = await trio.to_thread.run_sync(ask)
    await settled(gw, 1)
    second_header, second = await trio.to_thread.run_sync(ask)
    assert (first_header, second_header) == ("miss", "hit")
    assert upstream_calls(fake) == 1
    assert [c.model_dump() for c in second] == [c.model_dump() for c in first]
    assert second[-1].usage is not None and second[-1].usage.completion_tokens == 8
    # without include_usage, the hit has no usage chunk (as the provider's stream would not)
    def plain_stream():
        return list(client.chat.completions.create(model=OPENAI, temperature=0, stream=True,
                                                   messages=[{"role": "user", "content": "Tell me something"}]))
    without = await trio.to_thread.run_sync(plain_stream)
    assert all(c.usage is None for c in without) and upstream_calls(fake) == 1
    assert "".join(c.choices[0].delta.content or "" for c in without) == \
        "".join(c.choices[0].delta.content or "" for c in first if c.choices)


async def test_plain_and_streamed_answers_serve_each_other(nursery, fake):
    gw = await start_cached(nursery, fake.port)
    client = openai.OpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0, timeout=30)
    msgs = [{"role": "user", "content": "stream first"}]
    other = [{"role": "user", "content": "plain first"}]

    def run():
        streamed = list(client.chat.completions.create(model=OPENAI, temperature=0, stream=True, messages=msgs))
        return streamed

    streamed = await trio.to_thread.run_sync(run)
    await settled(gw, 1)
    whole = await trio.to_thread.run_sync(lambda: client.chat.completions.with_raw_response.create(
        model=OPENAI, temperature=0, messages=msgs))
    assert whole.headers["x-gateway-cache"] == "hit"
    answer = whole.parse()
    assert answer.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in streamed)
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 8

    plain = await trio.to_thread.run_sync(lambda: client.chat.completions.create(
        model=OPENAI, temperature=0, messages=other))
    await settled(gw, 2)
    def stream_other():  # read in the thread: the gateway runs on this test's event loop
        raw = client.chat.completions.with_raw_response.create(
            model=OPENAI, temperature=0, messages=other, stream=True, stream_options={"include_usage": True})
        return raw.headers["x-gateway-cache"], list(raw.parse())

    header, chunks = await trio.to_thread.run_sync(stream_other)
    assert header == "hit"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert upstream_calls(fake) == 2


@pytest.mark.parametrize("model", [OPENAI, ANTHROPIC])
async def test_anthropic_sdk_hits_stream_and_plain(nursery, fake, model):
    """/v1/messages, to an OpenAI deployment (translated chunks) and to an Anthropic one (its own
    events passed through): the hit reads the same through the anthropic SDK, both ways."""
    gw = await start_cached(nursery, fake.port)
    client = anthropic.Anthropic(base_url=gw.url, api_key=MASTER_KEY, max_retries=0, timeout=30)
    args = dict(model=model, max_tokens=100, extra_body={"temperature": 0},
                messages=[{"role": "user", "content": "Hi there"}])

    def stream_text():
        with client.messages.stream(**args) as s:
            text = "".join(s.text_stream)
            return text, s.get_final_message()

    text, message = await trio.to_thread.run_sync(stream_text)
    await settled(gw, 1)
    again, message2 = await trio.to_thread.run_sync(stream_text)
    assert again == text and message2.usage.output_tokens == message.usage.output_tokens == 8
    assert message2.stop_reason == message.stop_reason == "end_turn"
    raw = await trio.to_thread.run_sync(lambda: client.messages.with_raw_response.create(**args))
    assert raw.headers["x-gateway-cache"] == "hit"
    whole = raw.parse()
    assert whole.content[0].text == text and whole.usage.output_tokens == 8
    assert upstream_calls(fake) == 1
    # the other way: a plain answer cached, then streamed from the cache
    args["messages"] = [{"role": "user", "content": "Bye there"}]
    plain = await trio.to_thread.run_sync(lambda: client.messages.create(**args))
    await settled(gw, 2)
    text2, message3 = await trio.to_thread.run_sync(stream_text)
    assert text2 == plain.content[0].text and message3.usage.output_tokens == plain.usage.output_tokens == 8
    assert message3.stop_reason == plain.stop_reason and upstream_calls(fake) == 2


async def test_embeddings_are_cached(nursery, fake):
    gw = await start_cached(nursery, fake.port)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        request = {"model": OPENAI, "input": ["a", "b"]}
        first = await http.post(gw.v1 + "/embeddings", json=request)
        await settled(gw, 1)
        second = await http.post(gw.v1 + "/embeddings", json=request)
    assert (first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]) == ("miss", "hit")
    assert second.json() == first.json() and upstream_calls(fake) == 1


# -- what is cached, and when --

async def test_only_deterministic_requests_by_default_and_the_headers_decide(nursery, fake):
    gw = await start_cached(nursery, fake.port)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        async def post(payload, **headers):
            r = await http.post(gw.v1 + "/chat/completions", json=payload, headers=headers)
            assert r.status_code == 200, r.text
            return r.headers["x-gateway-cache"]

        warm = body("random", temperature=0.7)
        assert [await post(warm), await post(warm)] == ["miss", "miss"]  # not deterministic: not cached
        assert await post(body("seeded", temperature=1, seed=3)) == "miss"
        await settled(gw, 1)
        assert await post(body("seeded", temperature=1, seed=3)) == "hit"
        # opt in per request
        assert await post(warm, **{"x-gateway-cache": "use"}) == "miss"
        await settled(gw, 2)
        assert await post(warm, **{"x-gateway-cache": "use"}) == "hit"
        calls = upstream_calls(fake)
        assert await post(body("seeded", temperature=1, seed=3), **{"x-gateway-cache": "skip"}) == "miss"
        assert await post(body("seeded", temperature=1, seed=3), **{"cache-control": "no-cache"}) == "miss"
        assert upstream_calls(fake) == calls + 2
        assert await post(body("fresh"), **{"cache-control": "no-store"}) == "miss"
        assert await post(body("fresh")) == "miss"  # no-store wrote nothing
        bad = await http.post(gw.v1 + "/chat/completions", json=body("x"), headers={"x-gateway-cache": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-gateway-cache"
        assert "request_id" in bad.json()


async def test_refresh_goes_upstream_and_replaces_the_entry(nursery, fake):
    clock = Clock()
    gw = await start_cached(nursery, fake.port, clock=clock)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        payload = body("refresh me")
        await http.post(gw.v1 + "/chat/completions", json=payload)
        await settled(gw, 1)
        clock.now += 10
        r = await http.post(gw.v1 + "/chat/completions", json=payload, headers={"x-gateway-cache": "refresh"})
        assert r.headers["x-gateway-cache"] == "miss" and upstream_calls(fake) == 2
        await settled(gw, 2)
        entry = await gw.gateway.cache.store.get(next(iter(gw.gateway.cache.store._entries)))
        assert entry.stored_at == clock.now  # the refreshed answer replaced the old one


async def test_mode_all_caches_every_request(nursery, fake):
    gw = await start_cached(nursery, fake.port, mode="all")
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        payload = body("any", temperature=1.2)
        first = await http.post(gw.v1 + "/chat/completions", json=payload)
        await settled(gw, 1)
        second = await http.post(gw.v1 + "/chat/completions", json=payload)
    assert (first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]) == ("miss", "hit")


async def test_ttl_then_stale_window_then_gone(nursery, fake):
    clock = Clock()
    gw = await start_cached(nursery, fake.port, clock=clock, ttl=60, stale_if_error=600)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        payload = body("ttl")
        async def state():
            return (await http.post(gw.v1 + "/chat/completions", json=payload)).headers["x-gateway-cache"]

        assert await state() == "miss"
        await settled(gw, 1)
        clock.now += 59
        assert await state() == "hit"
        clock.now += 2  # past the TTL: providers are up, so a fresh answer (and a new entry)
        assert await state() == "miss"
        await settled(gw, 2)
        assert await state() == "hit"
        clock.now += 61 + 600  # past the stale window too: the store has dropped it
        assert await gw.gateway.cache.store.get(next(iter(gw.gateway.cache.store._entries))) is None


@pytest.mark.parametrize("replay", ["original", "fast"])
async def test_replay_original_keeps_the_providers_gaps(nursery, fake, replay):
    """`replay = "original"`: the entry holds each read's time and a hit types out like the first
    answer (the first token at once); `fast` records no times. Only lower bounds on time here:
    a slow machine makes gaps longer, never shorter."""
    gw = await start_cached(nursery, fake.port, replay=replay)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0, timeout=30)

    async def ask():
        raw = await client.chat.completions.with_raw_response.create(
            model=OPENAI, temperature=0, stream=True,
            messages=[{"role": "user", "content": 'fake: {"tokens": 4, "itl": 0.15}\nType it out'}])
        arrivals = []
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
        return raw.headers["x-gateway-cache"], arrivals

    header, first = await ask()
    await settled(gw, 1)
    (entry, _, _), = gw.gateway.cache.store._entries.values()
    again, second = await ask()
    assert (header, again) == ("miss", "hit") and upstream_calls(fake) == 1
    assert [text for _, text in second] == [text for _, text in first]
    if replay == "fast":
        assert entry.offsets is None
        return
    gaps = [b - a for a, b in zip(entry.offsets, entry.offsets[1:]) if b > a]
    assert sum(gap >= 0.14 for gap in gaps) >= 3, entry.offsets  # the token gaps (the last events follow at once)
    assert second[-1][0] - second[0][0] >= 0.42  # 3 gaps of >= 0.15 s between the 4 tokens


async def test_cache_off_has_no_header(gw, http):
    r = await http.post(gw.v1 + "/chat/completions", json={"model": "gpt-4o", "temperature": 0,
                                                           "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and "x-gateway-cache" not in r.headers


async def test_tenants_never_share_answers(nursery, fake):
    """A principal set before the cache (as the keys policy does) picks the namespace."""
    gw = await start_cached(nursery, fake.port)

    class AsTenant:
        async def admit(self, x, request):
            team = x.headers.get(b"x-test-tenant", b"").decode() or None
            if team:
                x.principal = Principal("key", "k-" + team, team)

        def settle(self, x):
            pass

    gw.gateway.policies.add(AsTenant(), Policies.KEYS)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        async def state(team):
            r = await http.post(gw.v1 + "/chat/completions", json=body("shared prompt"),
                                headers={"x-test-tenant": team})
            return r.headers["x-gateway-cache"]

        assert await state("a") == "miss"
        await settled(gw, 1)
        assert await state("b") == "miss"
        await settled(gw, 2)
        assert [await state("a"), await state("b"), await state("")] == ["hit", "hit", "miss"]


# -- bounds and bad entries --

async def test_lru_eviction_by_entries_and_bytes():
    clock = Clock()
    store = MemoryStore(max_entries=3, max_bytes=1000, clock=clock)
    def entry(size):
        return Entry("chat", clock(), completion={"x": 1}, size=size)
    for name in "abc":
        await store.put(name, entry(100), 100, clock() + 60)
    assert await store.get("a") is not None  # a is now the most recently used
    await store.put("d", entry(100), 100, clock() + 60)
    assert [k for k in "abcd" if k in store._entries] == ["a", "c", "d"] and store.evictions == 1
    await store.put("e", entry(850), 850, clock() + 60)  # 4 entries, then 1,050 bytes: the oldest go
    assert list(store._entries) == ["d", "e"] and store.bytes == 950 and store.evictions == 3
    clock.now += 61
    assert await store.get("e") is None and await store.get("d") is None and store.bytes == 0


async def test_an_answer_over_max_entry_bytes_is_not_cached(nursery, fake, caplog):
    gw = await start_cached(nursery, fake.port, max_entry_bytes=1024, max_bytes=4096)
    caplog.set_level(logging.INFO, "proxy.cache")
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        big = body('fake: {"tokens": 300}')
        for stream in (False, True, False):
            r = await http.post(gw.v1 + "/chat/completions", json=dict(big, stream=stream))
            assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"
        with trio.fail_after(5):
            while gw.gateway.cache.statistics().too_large < 3:
                await trio.sleep(0.005)
        small = body("small")
        await http.post(gw.v1 + "/chat/completions", json=small)
        await settled(gw, 1)
        assert (await http.post(gw.v1 + "/chat/completions", json=small)).headers["x-gateway-cache"] == "hit"
    assert gw.gateway.cache.statistics().writes == 1
    assert any("max_entry_bytes" in r.getMessage() for r in caplog.records)


class BytesStore(MemoryStore):
    """A memory store that holds encoded entries, as SQLite and Redis do."""
    holds_bytes = True


async def test_a_corrupt_entry_is_dropped_and_the_request_goes_upstream(nursery, fake, caplog):
    store = BytesStore(100, 1 << 20)
    gw = await start_cached(nursery, fake.port, store=store)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        payload = body("corrupt")
        first = await http.post(gw.v1 + "/chat/completions", json=payload)
        await settled(gw, 1)
        key = next(iter(store._entries))
        entry, expires, size = store._entries[key]
        store._entries[key] = (b'{"v":1,"e":"chat","t":1,"c":[["{",1]]', expires, size)  # a broken store's answer
        second = await http.post(gw.v1 + "/chat/completions", json=payload)
        assert second.status_code == 200 and second.headers["x-gateway-cache"] == "miss"
        assert second.json()["choices"] == first.json()["choices"] and upstream_calls(fake) == 2
        await settled(gw, 2)
        assert (await http.post(gw.v1 + "/chat/completions", json=payload)).headers["x-gateway-cache"] == "hit"
    assert gw.gateway.cache.statistics().corrupt == 1
    assert any("corrupt" in r.getMessage() for r in caplog.records)


async def test_nothing_is_cached_from_a_cut_or_failed_stream(nursery, fake):
    gw = await start_cached(nursery, fake.port)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        cut = body('fake: {"drop_after": 3}', stream=True)
        failed = body('fake: {"status": 500}', stream=True)
        for payload in (cut, cut, failed, failed):
            r = await http.post(gw.v1 + "/chat/completions", json=payload)
            assert r.status_code >= 500 or r.headers["x-gateway-cache"] == "miss"
        # a client that leaves mid-stream: nothing cached either
        slow = body('fake: {"itl": 0.05, "tokens": 50}', stream=True)
        async with http.stream("POST", gw.v1 + "/chat/completions", json=slow) as r:
            async for _ in r.aiter_bytes():
                break
        with trio.fail_after(5):
            while gw.gateway.cache.statistics().misses < 5:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
    stats = gw.gateway.cache.statistics()
    assert stats.writes == 0 and stats.entries == 0


# -- a store that fails or stalls --

class BrokenStore(MemoryStore):
    def __init__(self):
        super().__init__(100, 1 << 20)
        self.fail = True

    async def get(self, key):
        if self.fail:
            raise ConnectionError("store is down")
        return await super().get(key)


class StalledStore(MemoryStore):
    async def put(self, key, value, size, expires):
        await trio.sleep_forever()


async def test_a_store_that_is_down_means_no_cache_and_one_warning(nursery, fake, caplog):
    store = BrokenStore()
    gw = await start_cached(nursery, fake.port, store=store)
    caplog.set_level(logging.WARNING, "proxy.cache")
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        for i in range(5):
            r = await http.post(gw.v1 + "/chat/completions", json=body(f"down {i}", stream=i % 2 == 1))
            assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"
    warnings = [r for r in caplog.records if r.name == "proxy.cache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no cache" in warnings[0].getMessage()
    assert gw.gateway.cache.statistics().store_errors == 1  # then the store is left alone a while
    assert upstream_calls(fake) == 5


async def test_writes_never_wait_for_the_store(nursery, fake):
    gw = await start_cached(nursery, fake.port, store=StalledStore(100, 1 << 20), write_queue=2)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        with trio.fail_after(10):
            for i in range(6):
                r = await http.post(gw.v1 + "/chat/completions", json=body(f"w{i}", stream=True))
                assert r.status_code == 200 and parse_sse(r.content)[-1] == b"[DONE]"
            while gw.gateway.cache.statistics().misses < 6:  # the last one settles after its last byte
                await trio.sleep(0.005)
    stats = gw.gateway.cache.statistics()
    # one write held by the stalled store, two waiting in the queue, the rest dropped
    assert stats.dropped_writes == 3 and stats.queued == 2 and stats.writes == 0


async def test_admin_statistics(nursery, fake):
    gw = await start_cached(nursery, fake.port)
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        await http.post(gw.v1 + "/chat/completions", json=body("s"))
        await settled(gw, 1)
        await http.post(gw.v1 + "/chat/completions", json=body("s"))
        stats = (await http.get(gw.url + "/admin/cache")).json()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["writes"] == 1 and stats["entries"] == 1


@pytest.mark.parametrize("model", [OPENAI, ANTHROPIC])
@pytest.mark.parametrize("directive", ["", 'fake: {"tool_call": [{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]}'])
async def test_a_hit_reads_like_the_provider_both_ways(nursery, fake, model, directive):
    """Streamed entry -> plain answer and plain entry -> stream, text and tool calls: what the
    client gets from the cache equals what the provider gives for the same request."""
    gw = await start_cached(nursery, fake.port)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with httpx.AsyncClient(headers=HEADERS, timeout=30) as http:
        async def chat(text, stream, cache=None):
            payload = body(f"{directive}\n{text}", model=model, stream=stream, tools=tools)
            if stream:
                payload["stream_options"] = {"include_usage": True}
            r = await http.post(gw.v1 + "/chat/completions", json=payload,
                                headers={"x-gateway-cache": cache} if cache else {})
            assert r.status_code == 200, r.text
            return r

        def gathered(r):
            """A stream's text, tool calls (name, arguments), finish reason and usage."""
            text, calls, finish, usage = "", {}, None, None
            for data in parse_sse(r.content)[:-1]:
                chunk = orjson.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    delta = choice["delta"]
                    text += delta.get("content") or ""
                    for call in delta.get("tool_calls") or ():
                        name, args = calls.get(call["index"], ("", ""))
                        fn = call.get("function") or {}
                        calls[call["index"]] = (name + (fn.get("name") or ""), args + (fn.get("arguments") or ""))
                    finish = choice.get("finish_reason") or finish
            # arguments as JSON values: an Anthropic deployment's plain answer re-serializes them
            return text, [(n, orjson.loads(a)) for n, a in calls.values()], finish, usage["completion_tokens"]

        def whole(r):
            message = r.json()["choices"][0]["message"]
            calls = [(c["function"]["name"], orjson.loads(c["function"]["arguments"]))
                     for c in message.get("tool_calls") or ()]
            return (message.get("content") or "", calls, r.json()["choices"][0]["finish_reason"],
                    r.json()["usage"]["completion_tokens"])

        streamed = await chat("one", True)
        await settled(gw, 1)
        from_stream = await chat("one", False)
        upstream_plain = await chat("one", False, cache="skip")
        assert from_stream.headers["x-gateway-cache"] == "hit"
        assert whole(from_stream) == whole(upstream_plain) == gathered(streamed)

        plain = await chat("two", False)
        await settled(gw, 2)
        from_plain = await chat("two", True)
        upstream_stream = await chat("two", True, cache="skip")
        assert from_plain.headers["x-gateway-cache"] == "hit"
        assert gathered(from_plain) == gathered(upstream_stream) == whole(plain)
        if directive:
            assert whole(plain)[1] == [("get_weather", {"city": "Paris"})]
