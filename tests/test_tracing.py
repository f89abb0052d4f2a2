"""OpenTelemetry traces end to end: a real gateway on port 0, the real fake provider(s), spans read
from the SDK's in-memory exporter (and, once, the real OTLP/HTTP exporter to a local collector)."""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial

import httpx
import pytest
import trio
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.config import parse_config
from proxy.core.errors import ConfigError
from proxy.core.usage import Usage
from proxy.observability import tracing as tracing_module
from proxy.observability.tracing import Tracing
from proxy.routing.failover import Served
from proxy.server.app import Gateway
from proxy.server.exchange import OPEN, Exchange
from proxy.server.serve import serve
from proxy.testing.fake import FakeProvider, FakeSettings

from .conftest import MASTER_KEY, PROVIDER_KEY, chat_body

PROMPT = "a secret prompt about zebras"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def tracing_config(ports: dict[str, int], *, tracing=None, models=None, router=None):
    return parse_config({
        "server": {"port": 0},
        "auth": {"master_key_env": "K"},
        "router": {"backoff_initial": 0.01, "backoff_max": 0.02, **(router or {})},
        "providers": {name: {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": "P"}
                      for name, port in ports.items()},
        "models": models or {"gpt-4o": {"deployments": [{"provider": name} for name in ports]}},
        # The OTLP endpoint is never reached by these tests unless they say so (schedule: 5 s).
        "tracing": {"enabled": True, "endpoint": "http://127.0.0.1:9/v1/traces", **(tracing or {})},
    })


@pytest.fixture
def memory(monkeypatch):
    """The gateway's batch processor exports into this in-memory exporter instead of OTLP."""
    exported = InMemorySpanExporter()
    monkeypatch.setattr(tracing_module, "exporter", lambda config: exported)
    return exported


async def start(nursery, config) -> tuple[str, Gateway]:
    gateway = Gateway(config, {"K": MASTER_KEY, "P": PROVIDER_KEY})
    binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=trio.sleep_forever))
    return binds[0], gateway


def tracing(gateway: Gateway) -> Tracing:
    (policy,) = [p for p in gateway.policies.list if isinstance(p, Tracing)]
    return policy


async def spans_of(gateway: Gateway, memory: InMemorySpanExporter) -> list:
    """One request's finished spans: its request span ends last, after its attempts (settle runs
    just after the response's last byte; the batch processor's thread is flushed)."""
    with trio.fail_after(5):
        while not any(s.kind is SpanKind.SERVER for s in memory.get_finished_spans()):
            await trio.to_thread.run_sync(tracing(gateway).provider.force_flush)
            await trio.sleep(0.005)
    spans = list(memory.get_finished_spans())
    memory.clear()
    return spans


async def nothing_traced(gateway: Gateway, memory: InMemorySpanExporter) -> bool:
    await trio.sleep(0.05)
    await trio.to_thread.run_sync(tracing(gateway).provider.force_flush)
    return memory.get_finished_spans() == ()


def split(spans: list):
    (request,) = [s for s in spans if s.kind is SpanKind.SERVER]
    attempts = sorted((s for s in spans if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time)
    for attempt in attempts:
        assert attempt.parent.span_id == request.context.span_id
        assert attempt.context.trace_id == request.context.trace_id
        assert request.start_time <= attempt.start_time <= attempt.end_time <= request.end_time
    return request, attempts


def no_secrets(spans: list) -> None:
    for span in spans:
        for value in span.attributes.values():
            text = str(value)
            assert PROVIDER_KEY not in text and MASTER_KEY not in text and "zebras" not in text


@pytest.fixture
async def one(nursery):
    fake = FakeProvider(FakeSettings(tokens=8))
    fake.port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
    return fake


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {MASTER_KEY}"}) as client:
        yield client


async def test_a_plain_answer_a_stream_and_embeddings_each_give_a_request_span_and_an_attempt_span(
        nursery, one, http, memory):
    models = {"gpt-4o": {"deployments": [{"provider": "fake"}]},
              "alias": {"deployments": [{"provider": "fake", "model": "fake-model"}]}}
    url, gateway = await start(nursery, tracing_config({"fake": one.port}, models=models))
    for stream in (False, True):
        started = time.time_ns()
        response = await http.post(url + "/v1/chat/completions",
                                   json=chat_body(PROMPT, model="alias", stream=stream),
                                   headers={"x-request-id": f"trace-test-{stream}"})
        assert response.status_code == 200
        spans = await spans_of(gateway, memory)
        no_secrets(spans)
        request, (attempt,) = split(spans)
        assert started <= request.start_time < request.end_time <= time.time_ns()
        assert request.name == "chat alias" and attempt.name == "chat fake-model"
        attributes = dict(request.attributes)
        assert attributes["gen_ai.usage.input_tokens"] > 0
        assert {k: v for k, v in attributes.items() if k != "gen_ai.usage.input_tokens"} == {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.system": "openai",
            "gen_ai.request.model": "alias", "gen_ai.response.model": "fake-model",
            "gen_ai.usage.output_tokens": 8, "http.response.status_code": 200,
            "gateway.request_id": f"trace-test-{stream}", "gateway.deployment": "fake/fake-model",
            "gateway.attempts": 1, "gateway.outcome": "ok", "gateway.stream": stream}
        assert request.parent is None and request.status.status_code is StatusCode.UNSET
        assert dict(attempt.attributes) == {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.system": "openai",
            "gen_ai.request.model": "fake-model", "gateway.deployment": "fake/fake-model", "gateway.outcome": "ok"}
        assert request.resource.attributes["service.name"] == "llm-gateway"

    response = await http.post(url + "/v1/embeddings", json={"model": "gpt-4o", "input": ["a", "b"]})
    assert response.status_code == 200
    request, (attempt,) = split(await spans_of(gateway, memory))
    assert request.name == "embeddings gpt-4o"
    assert request.attributes["gen_ai.operation.name"] == attempt.attributes["gen_ai.operation.name"] == "embeddings"
    assert request.attributes["gen_ai.usage.input_tokens"] > 0

    # not a model request: not traced
    assert (await http.get(url + "/healthz")).status_code == 200
    assert await nothing_traced(gateway, memory)


async def test_a_failover_gives_two_attempt_spans_the_first_with_its_error(nursery, http, memory):
    fakes = {}
    for name in ("primary", "secondary"):
        fakes[name] = FakeProvider(FakeSettings(tokens=5))
        fakes[name].port = await nursery.start(partial(fakes[name].serve, "127.0.0.1", 0))
    models = {"gpt-4o": {"deployments": [{"provider": "primary", "priority": 0},
                                         {"provider": "secondary", "priority": 1}]}}
    url, gateway = await start(nursery, tracing_config({n: f.port for n, f in fakes.items()}, models=models))
    fakes["primary"].settings = dataclasses.replace(fakes["primary"].settings, status=500)
    for stream in (False, True):
        response = await http.post(url + "/v1/chat/completions", json=chat_body(PROMPT, stream=stream))
        assert response.status_code == 200 and response.headers["x-gateway-attempts"] == "2"
        spans = await spans_of(gateway, memory)
        no_secrets(spans)
        request, (first, second) = split(spans)
        assert first.end_time <= second.start_time
        assert first.attributes["gateway.deployment"] == "primary/gpt-4o"
        assert first.attributes["error.type"] == first.attributes["gateway.outcome"] != "ok"
        assert first.status.status_code is StatusCode.ERROR
        assert second.attributes["gateway.deployment"] == "secondary/gpt-4o"
        assert second.attributes["gateway.outcome"] == "ok" and "error.type" not in second.attributes
        assert request.attributes["gateway.deployment"] == "secondary/gpt-4o"
        assert request.attributes["gateway.attempts"] == 2 and "error.type" not in request.attributes

    # both fail: the request span carries the error the client got
    fakes["secondary"].settings = dataclasses.replace(fakes["secondary"].settings, status=500)
    response = await http.post(url + "/v1/chat/completions", json=chat_body(PROMPT))
    assert response.status_code >= 500
    request, attempts = split(await spans_of(gateway, memory))
    assert len(attempts) >= 2 and all(a.status.status_code is StatusCode.ERROR for a in attempts)
    assert request.attributes["http.response.status_code"] == response.status_code
    assert request.attributes["error.type"] == (response.json()["error"]["code"] or response.json()["error"]["type"])
    assert request.status.status_code is StatusCode.ERROR


async def test_an_incoming_traceparent_makes_the_request_span_a_child_of_that_trace(nursery, one, http, memory):
    url, gateway = await start(nursery, tracing_config({"fake": one.port}))
    response = await http.post(url + "/v1/chat/completions", json=chat_body(stream=True),
                               headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=x"})
    assert response.status_code == 200
    request, (attempt,) = split(await spans_of(gateway, memory))
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID and request.parent.is_remote
    assert request.context.trace_state.get("vendor") == "x"

    # a malformed one is ignored: a new trace
    await http.post(url + "/v1/chat/completions", json=chat_body(), headers={"traceparent": "00-zz-" + "x" * 500})
    request, _ = split(await spans_of(gateway, memory))
    assert request.parent is None and format(request.context.trace_id, "032x") != TRACE_ID


async def test_sampling_honours_the_ratio_and_a_sampled_parent(nursery, one, http, memory):
    url, gateway = await start(nursery, tracing_config({"fake": one.port}, tracing={"sample_ratio": 0.0}))
    await http.post(url + "/v1/chat/completions", json=chat_body())
    assert await nothing_traced(gateway, memory)  # ratio 0: no new trace is kept
    await http.post(url + "/v1/chat/completions", json=chat_body(),
                    headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    request, _ = split(await spans_of(gateway, memory))  # the caller sampled it: kept
    assert format(request.context.trace_id, "032x") == TRACE_ID


async def test_tracing_is_off_by_default_and_registers_nothing(one):
    default = parse_config({"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                            "models": {"m": {"deployments": [{"provider": "p"}]}}})
    assert default.tracing.enabled is False
    for config in (default, tracing_config({"fake": one.port}, tracing={"enabled": False})):
        gateway = Gateway(config, {"K": MASTER_KEY, "P": PROVIDER_KEY})
        assert not any(isinstance(p, Tracing) for p in gateway.policies.list)
        assert "Metrics" in [type(p).__name__ for p in gateway.policies.list]  # the list is the real one


async def test_tracing_on_runs_just_before_metrics_with_a_bounded_batch_queue(one):
    gateway = Gateway(tracing_config({"fake": one.port}, tracing={"queue_size": 100}),
                      {"K": MASTER_KEY, "P": PROVIDER_KEY})
    policy = tracing(gateway)
    names = [type(p).__name__ for p in gateway.policies.list]
    assert names[names.index("Tracing") + 1] == "Metrics"
    assert policy.aclose in gateway.on_shutdown
    (processor,) = policy.provider._active_span_processor._span_processors
    assert isinstance(processor, BatchSpanProcessor)
    assert processor._batch_processor._max_queue_size == 100
    assert processor._batch_processor._max_export_batch_size == 100
    await policy.aclose()


def test_config_errors_name_the_key_and_the_install_command(monkeypatch):
    def parse(tracing):
        return parse_config({"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                             "models": {"m": {"deployments": [{"provider": "p"}]}}, "tracing": tracing})

    for bad, key in (({"sample_ratio": 1.5}, "tracing.sample_ratio"), ({"endpoint": "localhost:4318"}, "tracing.endpoint"),
                     ({"queue_size": 0}, "tracing.queue_size"), ({"sampler": "x"}, "tracing.sampler")):
        with pytest.raises(ConfigError) as caught:
            parse(bad)
        assert key in str(caught.value)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    assert parse({"enabled": False}).tracing.enabled is False  # off: the packages are not needed
    with pytest.raises(ConfigError) as caught:
        parse({"enabled": True})
    message = str(caught.value)
    assert "tracing.enabled" in message and "pip install 'trio-llm-gateway[otel]'" in message


async def test_the_otlp_exporter_sends_the_spans_to_a_collector_off_the_event_loop(nursery, one, http):
    """A collector on a loopback port receives OTLP/HTTP protobuf from the SDK's export thread."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[bytes] = []

    async def collector(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")][0])
        while len(body) < length:
            body += await stream.receive_some(65536)
        received.append(body)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\n"
                              b"content-length: 0\r\nconnection: close\r\n\r\n")
        await stream.aclose()

    (listener,) = await nursery.start(partial(trio.serve_tcp, collector, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    url, gateway = await start(nursery, tracing_config(
        {"fake": one.port}, tracing={"endpoint": f"http://127.0.0.1:{port}/v1/traces", "service_name": "gw-a"}))
    response = await http.post(url + "/v1/chat/completions", json=chat_body(PROMPT, stream=True))
    assert response.status_code == 200
    await trio.sleep(0.05)
    await trio.to_thread.run_sync(tracing(gateway).provider.force_flush)  # the export blocks: a thread
    with trio.fail_after(5):
        while not received:
            await trio.sleep(0.01)
    export = ExportTraceServiceRequest.FromString(received[0])
    (resource,) = export.resource_spans
    assert {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"] == "gw-a"
    spans = [s for scope in resource.scope_spans for s in scope.spans]
    assert sorted(s.name for s in spans) == ["chat gpt-4o", "chat gpt-4o"]
    assert PROMPT.encode() not in received[0] and PROVIDER_KEY.encode() not in received[0]
    await tracing(gateway).aclose()


def test_settle_cost_per_request_is_small():
    """CPU per request at settle with tracing on (the real batch processor: settle appends to its
    queue, the SDK's thread exports). Bound kept wide for a shared machine; README has the figure."""
    config = tracing_config({"p": 9})
    exported = InMemorySpanExporter()
    policy = Tracing(config, BatchSpanProcessor(exported, max_queue_size=10000))
    per_request = settle_cpu(policy)
    policy.provider.shutdown()
    assert len(exported.get_finished_spans()) > 1000
    assert per_request < 300e-6, per_request


def settle_cpu(policy: Tracing, n: int = 2000, attempts: int = 1) -> float:
    """process_time per settle (the export thread's CPU counts too), over n requests."""
    exchanges = []
    now = time.perf_counter()
    for i in range(n):
        tried = [("p/gpt-4o", "ok" if a == attempts - 1 else "server_error", now - 0.5 + a * 0.1, now - 0.45 + a * 0.1)
                 for a in range(attempts)]
        x = Exchange(f"req_{i}", "/v1/chat/completions", OPEN, now - 0.5, endpoint="chat", model="gpt-4o",
                     stream=True, usage=Usage(prompt_tokens=10, completion_tokens=40), outcome="ok",
                     served=Served(provider="p", model="gpt-4o", deployment="p/gpt-4o", attempts=attempts, tried=tried))
        exchanges.append(x)
    policy.settle(exchanges[0])
    started = time.process_time()
    for x in exchanges[1:]:
        policy.settle(x)
    policy.provider.force_flush()
    return (time.process_time() - started) / (n - 1)


if __name__ == "__main__":  # python -m tests.test_tracing: the README's figure
    import statistics

    for attempts in (1, 2):
        runs = []
        for _ in range(5):
            policy = Tracing(tracing_config({"p": 9}), BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=10000))
            runs.append(settle_cpu(policy, attempts=attempts))
            policy.provider.shutdown()
        print(f"{attempts} attempt(s): median {statistics.median(runs) * 1e6:.1f} µs CPU per request "
              f"(runs: {', '.join(f'{r * 1e6:.1f}' for r in runs)})")
