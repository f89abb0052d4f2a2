"""OpenTelemetry traces: one span per model request, a child span per upstream attempt.

Built after the fact, in `settle(x)`: the request is over, so its span is started and ended with
explicit timestamps (`x.started`, and each attempt's start and end recorded in `served.tried`)
rather than kept open across the relay. Nothing runs per token, nothing runs on the way in, and
with `[tracing] enabled = false` (the default) this module is not even imported: the gateway's
one cost is the `if` in `install`.

Attributes follow the GenAI semantic conventions (gen_ai.operation.name, gen_ai.provider.name and
its older name gen_ai.system, gen_ai.request.model, gen_ai.response.model, gen_ai.usage.*) plus
the gateway's own (gateway.request_id, gateway.deployment, gateway.outcome, gateway.cache). Keys,
prompts and completions never go into a span. An incoming W3C `traceparent` makes the request
span a child of the caller's trace.

Export: the SDK's BatchSpanProcessor hands finished spans to OTLP/HTTP on its own thread; the
event loop only appends to its queue, which holds at most `[tracing] queue_size` spans (when
full, the SDK drops the oldest and logs it).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.server.exchange import Exchange

if TYPE_CHECKING:
    from proxy.config import Config

log = logging.getLogger("proxy.observability.tracing")

MAX_MODEL_CHARS = 256   # a client's model name is echoed into spans: bounded like log lines
MAX_OUTCOME_CHARS = 64
MAX_EXPORT_BATCH = 512  # spans per OTLP request (the SDK's default), at most the queue's bound


def exporter(config: "Config") -> SpanExporter:
    """OTLP over HTTP/protobuf to `[tracing] endpoint` (tests put an in-memory exporter here)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.tracing.endpoint)


class Tracing:
    """The tracing policy: `settle` turns a finished request into spans, handed to `processor`
    (default: a BatchSpanProcessor over `exporter(config)`)."""

    def __init__(self, config: "Config", processor: SpanProcessor | None = None):
        settings = config.tracing
        if processor is None:
            processor = BatchSpanProcessor(exporter(config),
                                           max_queue_size=settings.queue_size,
                                           max_export_batch_size=min(MAX_EXPORT_BATCH, settings.queue_size))
        # The gateway's own provider, not the process-wide one: nothing else in the process is
        # traced through it, and tests can run several gateways side by side.
        self.provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("proxy.gateway")
        self._propagator = TraceContextTextMapPropagator()
        # perf_counter -> epoch nanoseconds: one offset taken now (exchanges carry perf_counter).
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)
        # deployment name -> (provider kind, upstream model or "" for the requested one)
        self._deployments: dict[str, tuple[str, str]] = {
            d.name: (config.providers[d.provider].kind, d.model)
            for route in config.models for d in route.deployments}

    async def admit(self, x: Exchange, request: Any) -> None:
        pass

    def settle(self, x: Exchange) -> None:
        if x.model == "-":  # not a model request (admin, health, metrics scrape): not traced
            return
        end_ns = self._ns(time.perf_counter())
        parent = None
        traceparent = x.headers.get(b"traceparent")
        if traceparent is not None:  # an invalid one yields an empty context: a new trace
            carrier = {"traceparent": traceparent.decode("latin-1")}
            state = x.headers.get(b"tracestate")
            if state is not None:
                carrier["tracestate"] = state.decode("latin-1")
            parent = self._propagator.extract(carrier)
        operation = "embeddings" if x.endpoint == "embeddings" else "chat"
        model = x.model[:MAX_MODEL_CHARS]
        span = self._tracer.start_span(f"{operation} {model}", context=parent, kind=SpanKind.SERVER,
                                       start_time=self._ns(x.started))
        if not span.is_recording():  # sampled out: nothing more to build
            span.end(end_time=end_ns)
            return
        served, usage = x.served, x.usage
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "http.response.status_code": x.status,
            "gateway.request_id": x.request_id,
            "gateway.outcome": x.outcome[:MAX_OUTCOME_CHARS],
            "gateway.stream": x.stream,
        }
        if served is not None and served.deployment != "-":
            kind = self._deployments.get(served.deployment, ("-", ""))[0]
            attributes["gen_ai.provider.name"] = attributes["gen_ai.system"] = kind
            attributes["gen_ai.response.model"] = served.model[:MAX_MODEL_CHARS]
            attributes["gateway.deployment"] = served.deployment
            attributes["gateway.attempts"] = served.attempts
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if x.cache is not None:
            attributes["gateway.cache"] = x.cache
        error = x.error
        if error is not None:
            attributes["error.type"] = error.code or error.type
        elif x.outcome.startswith("error"):  # failed after the first token: status stayed 200
            attributes["error.type"] = x.outcome[:MAX_OUTCOME_CHARS]
        span.set_attributes(attributes)
        # Server-span rule: a 4xx is the client's doing, not a failure of this service.
        if x.status >= 500 or (x.status < 400 and "error.type" in attributes):
            span.set_status(Status(StatusCode.ERROR))
        if served is not None and served.tried:
            context = trace.set_span_in_context(span)
            for deployment, outcome, started, ended in served.tried:
                kind, upstream = self._deployments.get(deployment, ("-", ""))
                upstream = upstream or model
                attributes = {
                    "gen_ai.operation.name": operation,
                    "gen_ai.provider.name": kind,
                    "gen_ai.system": kind,
                    "gen_ai.request.model": upstream,
                    "gateway.deployment": deployment,
                    "gateway.outcome": outcome[:MAX_OUTCOME_CHARS],
                }
                if outcome != "ok":
                    attributes["error.type"] = outcome[:MAX_OUTCOME_CHARS]
                child = self._tracer.start_span(f"{operation} {upstream}", context=context, kind=SpanKind.CLIENT,
                                                attributes=attributes, start_time=self._ns(started))
                if outcome != "ok":
                    child.set_status(Status(StatusCode.ERROR))
                child.end(end_time=self._ns(ended))
        span.end(end_time=end_ns)

    def _ns(self, perf: float) -> int:
        return int(perf * 1e9) + self._offset_ns

    async def aclose(self) -> None:
        """At shutdown: the spans still queued are exported (on a thread: the export blocks)."""
        import trio

        await trio.to_thread.run_sync(self.provider.shutdown)
