"""Serve on failure: both providers stop in the middle of a load; the prompts the cache has seen
keep being answered (`x-gateway-cache: stale`), the others fail as they would without a cache."""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import partial

import httpx
import trio

from proxy.cache.policy import ResponseCache
from proxy.config import CacheConfig, parse_config
from proxy.server.app import Gateway
from proxy.server.serve import serve
from proxy.testing.fake import FakeProvider, FakeSettings

from .conftest import MASTER_KEY, PROVIDER_KEY, parse_sse
from .test_cache import Clock

CACHED = [f"cached prompt {i}" for i in range(10)]


async def killable(provider: FakeProvider, scopes: list, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as scope:
        scopes.append(scope)
        await provider.serve("127.0.0.1", 0, task_status=task_status)


async def test_both_providers_die_mid_load_and_cached_prompts_are_still_answered(nursery):
    scopes: list[trio.CancelScope] = []
    primary, backup = FakeProvider(FakeSettings(tokens=20)), FakeProvider(FakeSettings(tokens=20))
    ports = [await nursery.start(killable, p, scopes) for p in (primary, backup)]
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"master_key_env": "TEST_MASTER_KEY"},
        "router": {"retries": 1, "backoff_initial": 0.01, "backoff_max": 0.02, "breaker_cooldown": 60},
        "providers": {name: {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                             "api_key_env": "TEST_PROVIDER_KEY", "connect_timeout": 1}
                      for name, port in zip(("primary", "backup"), ports)},
        "models": {"m": {"deployments": [{"provider": "primary"}], "fallbacks": ["m-backup"]},
                   "m-backup": {"deployments": [{"provider": "backup"}]}},
    })
    config = dataclasses.replace(config, cache=CacheConfig(enabled=True, backend="memory", ttl=60,
                                                           stale_if_error=3600))
    gateway = Gateway(config, {"TEST_PROVIDER_KEY": PROVIDER_KEY, "TEST_MASTER_KEY": MASTER_KEY})
    clock = Clock()
    cache = ResponseCache(config.cache, clock=clock)
    gateway.policies.list[gateway.policies.list.index(gateway.cache)] = gateway.cache = cache
    stop = trio.Event()
    url = (await nursery.start(partial(serve, config, gateway, shutdown_trigger=stop.wait)))[0]

    tally: Counter = Counter()
    killed = trio.Event()
    unique = iter(range(10**6))

    async with httpx.AsyncClient(headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=30) as http:
        async def ask(prompt: str, stream: bool) -> tuple[int, str | None, bool]:
            payload = {"model": "m", "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": prompt}]}
            r = await http.post(url + "/v1/chat/completions", json=payload)
            complete = r.status_code == 200 and (parse_sse(r.content)[-1] == b"[DONE]" if stream else
                                                 bool(r.json()["choices"][0]["message"]["content"]))
            return r.status_code, r.headers.get("x-gateway-cache"), complete

        for i, prompt in enumerate(CACHED):  # warm: every cached prompt answered once
            assert (await ask(prompt, i % 2 == 0))[0] == 200
        with trio.fail_after(5):
            while cache.statistics().writes < len(CACHED):
                await trio.sleep(0.005)

        async def client(n: int) -> None:
            for i in range(40):
                after = killed.is_set()
                cached = i % 2 == 0
                prompt = CACHED[(n + i) % len(CACHED)] if cached else f"new prompt {next(unique)}"
                status, header, complete = await ask(prompt, stream=(n + i) % 3 == 0)
                phase = "after" if after else "before"
                tally[phase, "cached" if cached else "new", status, header, complete] += 1
                if after and cached:
                    assert status == 200 and complete and header in ("stale", "hit"), (status, header)

        async with trio.open_nursery() as load:
            for n in range(8):
                load.start_soon(client, n)
            with trio.fail_after(10):
                while sum(tally.values()) < 80:
                    await trio.sleep(0.002)
            for scope in scopes:  # both providers stop: listeners and open connections close
                scope.cancel()
            clock.now += 120  # every entry past its TTL, within stale_if_error: served only on failure
            killed.set()
    stop.set()

    after_cached = {k: v for k, v in tally.items() if k[:2] == ("after", "cached")}
    after_new = {k: v for k, v in tally.items() if k[:2] == ("after", "new")}
    stale = sum(v for k, v in after_cached.items() if k[3] == "stale")
    assert stale >= 100 and sum(after_cached.values()) >= 100
    # the prompts the cache never saw fail as they would without it (no stale answer to give)
    assert all(k[2] >= 500 or not k[4] for k in after_new if k[3] != "stale")
    assert not any(k[3] == "stale" for k in after_new)
    stats = cache.statistics()
    print(f"\nserve-on-failure: requests={sum(tally.values())} hits={stats.hits} misses={stats.misses} "
          f"stale={stats.stale}; after the kill: cached prompts answered "
          f"{sum(v for k, v in after_cached.items() if k[2] == 200)}/{sum(after_cached.values())} "
          f"(stale {stale}), new prompts failed {sum(v for k, v in after_new.items() if k[2] >= 500 or not k[4])}"
          f"/{sum(after_new.values())}")
