"""GET /metrics: the contract's families, what one request of each kind adds, bounded labels, auth."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxy.server.exchange import Exchange, OPEN
from tests.conftest import MASTER_KEY, chat_body, parse_sse

CONTRACT = {"gateway_requests": "counter", "gateway_ttft_seconds": "histogram",
            "gateway_request_duration_seconds": "histogram", "gateway_overhead_seconds": "histogram",
            "gateway_tokens": "counter", "gateway_cost_usd": "counter", "gateway_open_streams": "gauge",
            "gateway_upstream_attempts": "counter", "gateway_breaker_state": "gauge",
            "gateway_clients_dropped": "counter"}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(url: str, **kw) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(url + "/metrics", **kw)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-request-id"]
    return response.text


async def test_every_contract_family_is_there_with_its_type(gw):
    families = {f.name: f.type for f in text_string_to_metric_families(await scrape(gw.url))}
    for name, kind in CONTRACT.items():
        assert families.get(name) == kind, (name, families.get(name))


async def test_a_stream_and_a_plain_answer_are_counted_with_tokens_latency_and_attempts(gw, http):
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body())).status_code == 200  # warm (tokenizer)
    before = await scrape(gw.url)
    response = await http.post(gw.v1 + "/chat/completions", json=chat_body(stream=True, stream_options={
        "include_usage": True}))
    assert parse_sse(response.content)[-1] == b"[DONE]"
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body())).status_code == 200
    after = await scrape(gw.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gateway_requests_total", endpoint="chat", model="gpt-4o", status="200", outcome="ok") == 2
    assert delta("gateway_ttft_seconds_count", model="gpt-4o") == 1
    assert delta("gateway_inter_token_latency_seconds_count", model="gpt-4o") == 1
    assert delta("gateway_request_duration_seconds_count", model="gpt-4o", stream="true") == 1
    assert delta("gateway_request_duration_seconds_count", model="gpt-4o", stream="false") == 1
    assert delta("gateway_overhead_seconds_count", endpoint="chat") == 2
    assert 0 < delta("gateway_overhead_seconds_sum", endpoint="chat") < 0.1
    assert delta("gateway_tokens_total", model="gpt-4o", direction="output") == 16  # the fake's 8 tokens, twice
    assert delta("gateway_tokens_total", model="gpt-4o", direction="input") > 0
    assert delta("gateway_upstream_attempts_total", deployment="fake/gpt-4o", outcome="ok") == 2
    assert value(after, "gateway_breaker_state", deployment="fake/gpt-4o") == 0
    assert value(after, "gateway_open_streams") == 0
    # a bucket at 1 ms: the low end resolves milliseconds
    assert ("gateway_ttft_seconds_bucket", (("le", "0.001"), ("model", "gpt-4o"))) in samples(after)


async def test_open_streams_is_read_at_scrape_time(gw, http):
    slow = chat_body('fake: {"itl": 0.2}', stream=True)  # still open while we scrape
    async with http.stream("POST", gw.v1 + "/chat/completions", json=slow) as response:
        chunks = response.aiter_bytes()  # kept: a dropped iterator would be closed, and the stream with it
        await chunks.__anext__()
        text = await scrape(gw.url)
        assert value(text, "gateway_open_streams") == 1, [l for l in text.splitlines() if "open_streams" in l]
    with trio.fail_after(5):
        while len(gw.gateway.streams):
            await trio.sleep(0.01)
    assert value(await scrape(gw.url), "gateway_open_streams") == 0


async def start_with(nursery, fake, *, master_key: str | None = MASTER_KEY, stop: trio.Event | None = None,
                     **sections):
    """A gateway on port 0 with any config sections (the shared fixture takes only a few);
    the fake as provider "fake" and model "gpt-4o" unless `providers`/`models` say otherwise."""
    from functools import partial

    from proxy.config import parse_config
    from proxy.server.app import Gateway
    from proxy.server.serve import serve

    raw = {"server": {"port": 0}, "auth": {"master_key_env": "TEST_MASTER_KEY"},
           "providers": {"fake": {"kind": "openai", "base_url": f"http://127.0.0.1:{fake.port}/v1"}},
           "models": {"gpt-4o": {"deployments": [{"provider": "fake"}]}}, **sections}
    config = parse_config(raw)
    gateway = Gateway(config, environ={"TEST_MASTER_KEY": master_key} if master_key else {})
    stop = trio.Event() if stop is None else stop
    binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=stop.wait))
    return binds[0], gateway


async def two_provider_gateway(nursery, fake, **router):
    """Model "gpt-4o": deployment "first" on a dead port, then "second" on the fake."""
    return await start_with(nursery, fake, router={"backoff_initial": 0, **router}, providers={
        "dead": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
        "fake": {"kind": "openai", "base_url": f"http://127.0.0.1:{fake.port}/v1"}},
        models={"gpt-4o": {"deployments": [{"provider": "dead", "name": "first"},
                                           {"provider": "fake", "name": "second", "priority": 1}]}})


async def test_errors_unknown_models_and_failovers_are_labelled(nursery, fake, http):
    url, _ = await two_provider_gateway(nursery, fake, retries=1)
    response = await http.post(url + "/v1/chat/completions", json=chat_body())
    assert response.status_code == 200, response.text
    huge = chat_body(model="x" * 1_000_000)
    assert (await http.post(url + "/v1/chat/completions", json=huge)).status_code in (400, 404)
    assert (await http.post(url + "/v1/chat/completions", json=chat_body(model="nope"))).status_code == 404
    text = await scrape(url)
    assert value(text, "gateway_upstream_attempts_total", deployment="first", outcome="upstream_error") == 1
    assert value(text, "gateway_upstream_attempts_total", deployment="second", outcome="ok") == 1
    assert value(text, "gateway_failovers_total", model="gpt-4o") == 1
    assert value(text, "gateway_retries_total", model="gpt-4o") == 0
    assert value(text, "gateway_requests_total", endpoint="chat", model="unknown", status="404",
                 outcome="error") == 1
    assert "xxxxxxxxxx" not in text  # a client's model name never becomes a label


async def test_glob_routes_keep_names_until_the_bound_then_other(start_gateway, http, monkeypatch):
    from proxy.observability import metrics

    monkeypatch.setattr(metrics, "MAX_MODEL_LABELS", 2)
    gw = await start_gateway(models={"*": {"deployments": [{"provider": "fake"}]}})
    for name in ("a", "b", "c", "d", "a"):
        assert (await http.post(gw.v1 + "/chat/completions", json=chat_body(model=name))).status_code == 200
    text = await scrape(gw.url)
    got = {labels: v for (name, labels), v in samples(text).items() if name == "gateway_requests_total"}
    models = {dict(labels)["model"]: v for labels, v in got.items()}
    assert models == {"a": 2, "b": 1, "other": 2}


async def test_cost_tier_cache_and_per_key_labels_come_from_the_other_policies(nursery, fake, http):
    from proxy.server.exchange import Principal

    class Keys:  # stands in for the keys, cache and tiers features: what they leave on the exchange
        async def admit(self, x, request):
            x.principal = Principal("key", "key_123", "team-a")
            x.notes["tier"] = "cheap"
            x.cache = "miss"

        def settle(self, x):
            x.cost_usd = 0.002
            x.notes["keys"] = {"budget_remaining_usd": 4.5}

    url, gateway = await start_with(nursery, fake, metrics={"per_key": True})
    gateway.policies.add(Keys(), 16)  # after accounting (15): the cost is ours
    assert (await http.post(url + "/v1/chat/completions", json=chat_body())).status_code == 200
    text = await scrape(url)
    assert value(text, "gateway_cost_usd_total", model="gpt-4o") == pytest.approx(0.002)
    assert value(text, "gateway_tier_requests_total", tier="cheap") == 1
    assert value(text, "gateway_cache_requests_total", model="gpt-4o", result="miss") == 1
    assert value(text, "gateway_key_requests_total", key="key_123", team="team-a") == 1
    assert value(text, "gateway_key_cost_usd_total", key="key_123", team="team-a") == pytest.approx(0.002)
    assert value(text, "gateway_key_budget_remaining_usd", key="key_123", team="team-a") == 4.5


async def test_breaker_state_follows_transitions_and_they_are_logged(nursery, http, fake, caplog):
    url, _ = await start_with(nursery, fake, router={"retries": 0, "breaker_failures": 1, "breaker_cooldown": 0.2})
    fake.set_control(fail_percent=100, fail_status=500)
    caplog.set_level(logging.INFO, "proxy.routing.breaker")
    assert (await http.post(url + "/v1/chat/completions", json=chat_body())).status_code == 502
    assert value(await scrape(url), "gateway_breaker_state", deployment="fake/gpt-4o") == 2
    fake.set_control(reset=True)
    await trio.sleep(0.25)
    assert (await http.post(url + "/v1/chat/completions", json=chat_body())).status_code == 200
    assert value(await scrape(url), "gateway_breaker_state", deployment="fake/gpt-4o") == 0
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "proxy.routing.breaker"]
    assert lines[0][0] == "WARNING" and "fake/gpt-4o: closed -> open" in lines[0][1], lines
    assert "upstream_error" in lines[0][1], lines
    assert ("INFO", "breaker fake/gpt-4o: open -> half_open (cooldown over: one probe request)") in lines
    assert ("INFO", "breaker fake/gpt-4o: half_open -> closed (probe succeeded)") in lines


async def test_require_key_and_disabled(nursery, fake, http):
    url, _ = await start_with(nursery, fake, metrics={"require_key": True})
    async with httpx.AsyncClient(timeout=30) as anonymous:
        assert (await anonymous.get(url + "/metrics")).status_code == 401
    await scrape(url, headers={"authorization": f"Bearer {MASTER_KEY}"})
    off_url, off = await start_with(nursery, fake, metrics={"enabled": False})
    assert (await http.get(off_url + "/metrics")).status_code == 404
    assert not any(type(p).__name__ == "Metrics" for p in off.policies.list)


def test_settle_cost_per_request_is_small():
    """CPU per request at settle (one-process registry): the issue's bound is 50 µs for metrics and
    logging together; this keeps a wide margin for a shared machine."""
    import time

    from proxy.config import parse_config
    from proxy.core.usage import Usage
    from proxy.observability.metrics import Metrics
    from proxy.routing.failover import Served
    from proxy.routing.router import Router
    from proxy.server.streams import Streams

    config = parse_config({"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                           "models": {"m": {"deployments": [{"provider": "p"}]}}})
    metrics = Metrics(config, Router(config), Streams(config.server))
    n = 2000
    exchanges = []
    for _ in range(n):
        x = Exchange("r", "/v1/chat/completions", OPEN, time.perf_counter() - 0.5, endpoint="chat", model="m",
                     stream=True, usage=Usage(prompt_tokens=10, completion_tokens=40),
                     served=Served(deployment="p/m", tried=[("p/m", "ok", 0.0, 0.0)]), outcome="ok")
        x.first_token_at = x.started + 0.2
        x.notes["metrics"] = x.started + 0.0001
        exchanges.append(x)
    metrics.settle(exchanges[0])  # builds the families
    started = time.process_time()
    for x in exchanges[1:]:
        metrics.settle(x)
    per_request = (time.process_time() - started) / (n - 1)
    assert per_request < 40e-6, per_request


async def test_one_scrape_shows_every_worker(tmp_path, fake):
    """`serve --workers 2`: requests land on one worker or the other; any worker's scrape counts them
    all (prometheus-client multiprocess mode in a fresh directory, removed at exit)."""
    import os
    import signal
    import subprocess
    import sys

    config = tmp_path / "workers.toml"
    config.write_text('[server]\nport = 0\nworkers = 2\n[auth]\nmaster_key_env = "UNSET_FOR_TEST"\n'
                      f'[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:{fake.port}/v1"\n'
                      '[models."gpt-4o"]\ndeployments = [{ provider = "fake" }]\n')
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp_path)  # the metrics directory is made there: we can look into it
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def drive() -> list[str]:
        line = process.stdout.readline()
        assert " 2 workers" in line, line  # (stderr is not read: the server is still running)
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        for _ in range(20):  # a new connection each: the kernel spreads them over both workers
            response = httpx.post(url + "/v1/chat/completions", json=chat_body(), timeout=30)
            assert response.status_code == 200, response.text
        return [httpx.get(url + "/metrics", timeout=30).text for _ in range(6)]

    try:
        texts = await trio.to_thread.run_sync(drive)
        [shared] = [d for d in tmp_path.iterdir() if d.name.startswith("gateway-metrics-")]
        writers = {f.name.rsplit("_", 1)[1] for f in shared.iterdir() if f.name.startswith("counter_")}
        assert len(writers) == 2, writers  # both workers served and wrote their counts
        for text in texts:  # whichever worker answered the scrape saw all 20 requests
            assert value(text, "gateway_requests_total", endpoint="chat", model="gpt-4o", status="200",
                         outcome="ok") == 20
            assert value(text, "gateway_ttft_seconds_count", model="gpt-4o") == 0
            assert value(text, "gateway_request_duration_seconds_count", model="gpt-4o", stream="false") == 20
            assert value(text, "gateway_open_streams") == 0
            assert value(text, "gateway_breaker_state", deployment="fake/gpt-4o") == 0
        process.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: process.wait(timeout=30)) == 0
        assert not shared.exists()
    finally:
        if process.poll() is None:  # SIGTERM first: the parent forwards it, no worker is left behind
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_a_scrape_of_a_thousand_deployments_lets_the_event_loop_run_between_steps():
    """100 models x 10 deployments, every series populated (~12,000 samples): the scrape yields to
    the event loop every STEP samples, so streams keep flowing while it renders."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent / "scripts"))
    import metrics_bench

    from proxy.config import parse_config
    from proxy.observability.metrics import Metrics
    from proxy.routing.router import Router
    from proxy.server.streams import Streams

    config = parse_config(metrics_bench.big_config(9))
    metrics = Metrics(config, Router(config, environ={}), Streams(config.server))
    metrics_bench.populate(metrics)
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        ticks = 0
        text = (await metrics.render()).decode()
        done = True
    assert text.count("\n") > 11_000
    assert ticks >= 20, ticks  # one unbroken render would let it run at most once
    assert value(text, "gateway_upstream_attempts_total", deployment="d99-9", outcome="ok") == 2


async def test_queue_wait_at_max_concurrency_is_observed(start_gateway, http):
    running = await start_gateway(models={"gpt-4o": {"deployments": [{"provider": "fake", "max_concurrency": 1}]}})
    slow = chat_body('fake: {"ttft": 0.3, "tokens": 2}')
    before = await scrape(running.url)
    async def ask():
        assert (await http.post(running.v1 + "/chat/completions", json=slow)).status_code == 200

    async with trio.open_nursery() as nursery:
        for _ in range(2):  # the second waits ~0.3 s for the first's slot
            nursery.start_soon(ask)
    with trio.fail_after(5):  # settled just after each response's last byte
        while True:
            after = await scrape(running.url)
            count = value(after, "gateway_queue_wait_seconds_count", model="gpt-4o") - \
                value(before, "gateway_queue_wait_seconds_count", model="gpt-4o")
            if count >= 2:
                break
            await trio.sleep(0.02)
    waited = value(after, "gateway_queue_wait_seconds_sum", model="gpt-4o") - \
        value(before, "gateway_queue_wait_seconds_sum", model="gpt-4o")
    assert count == 2
    assert 0.2 < waited < 1.0  # one request waited for the other's 0.3 s, the other not at all
