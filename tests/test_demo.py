"""`serve --demo` is an honest showcase: models listed, admin and dashboard open on loopback, a fault
tried in one request does not lock everyone out for long, and errors name the model asked for."""

from functools import partial

import httpx
import trio

from proxy.cli import DEMO_MODELS, demo_config
from proxy.server.app import Gateway, _loopback
from proxy.server.serve import serve


async def start_demo(nursery, fake):
    config = demo_config(fake.port, "127.0.0.1", 0)
    gateway = Gateway(config, environ={}, demo=True)
    stop = trio.Event()
    url = (await nursery.start(partial(serve, config, gateway, shutdown_trigger=stop.wait)))[0]
    return url, gateway, stop


async def test_demo_lists_its_models_and_opens_admin_on_loopback(nursery, fake):
    url, gateway, stop = await start_demo(nursery, fake)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        models = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        routing = await http.get("/admin/routing")
        dashboard = await http.get("/dashboard")
        answer = await http.post("/v1/chat/completions", json={
            "model": "any-other-name", "messages": [{"role": "user", "content": "hi"}]})
    assert models == list(DEMO_MODELS)
    assert routing.status_code == 200 and "fake/*" in routing.text
    assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
    assert answer.status_code == 200
    # Outside demo mode, without a master key, admin stays shut.
    plain = Gateway(demo_config(fake.port, "127.0.0.1", 0), environ={})
    assert not plain.demo
    stop.set()


def test_only_loopback_clients_count_as_local():
    assert _loopback({"client": ("127.0.0.1", 5000)}) and _loopback({"client": ("::1", 5000)})
    assert not _loopback({"client": ("10.0.0.7", 5000)}) and not _loopback({"client": None})


async def test_a_tried_fault_closes_the_breaker_again_within_seconds_and_the_503_names_the_model(
        nursery, fake):
    url, gateway, stop = await start_demo(nursery, fake)
    fault = 'fake: {"status": 500}'
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(12):  # retries included: enough failures to open the one breaker
            r = await http.post("/v1/chat/completions", json={
                "model": "gpt-4o", "messages": [{"role": "user", "content": fault}]})
            if r.status_code == 503 and "circuit" in r.text:
                break
        refused = await http.post("/v1/chat/completions", json={
            "model": "my-model", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503
        assert "'my-model'" in refused.json()["error"]["message"]
        assert "'*'" not in refused.json()["error"]["message"]
        assert gateway.config.router.breaker_cooldown <= 5
        await trio.sleep(gateway.config.router.breaker_cooldown + 0.5)
        healed = await http.post("/v1/chat/completions", json={
            "model": "my-model", "messages": [{"role": "user", "content": "hi"}]})
    assert healed.status_code == 200
    stop.set()
