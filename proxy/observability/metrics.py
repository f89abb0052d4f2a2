"""Prometheus metrics: one policy that observes each request once, at settle, and GET /metrics.

Rules:
- Nothing per token. A stream's inter-token latency is its mean gap, observed once at settle:
  (end - first token) / (output tokens - 1). Per-token observation would cost a histogram update
  per relayed token (2.6 µs in multiprocess mode, measured: bench.md) for a figure the mean and
  the TTFT already describe; the gaps' tail is the relay's business (its write deadline).
- Gateway overhead is what the seam can see without per-token work: arrival -> every policy
  admitted (body read, parse, auth, keys, cache lookup, tiers; metrics admit last). The routing
  pick and the request encoding before the upstream write are not in it (microseconds), nor the
  per-chunk relay after the first upstream byte (bench.md: the pump's cost per event).
- Label sets are bounded whatever clients send: endpoint and deployment come from code and config;
  a model is its route's exact name, or a name matched by a glob route while fewer than
  MAX_MODEL_LABELS such names were seen (then "other"); error codes past MAX_CODE_LABELS are
  "other"; key/team ids only with `[metrics] per_key = true`. No secret is ever a label.
- Several workers (`--workers N`): prometheus-client's multiprocess mode. The server makes a fresh
  PROMETHEUS_MULTIPROC_DIR before forking (`share_across_workers`); each worker writes its values
  there and any worker's scrape merges them all. State gauges cannot be read at scrape time from
  another process, so in that mode they are updated when they change: open streams (livesum, at
  admit and settle of a stream), breaker state (livemax: the worst worker's, at each transition).
  With one worker open streams are read at scrape time (len of the open-stream set).
- A scrape reads and renders on the event loop in steps of about a millisecond with a checkpoint
  between them, one scrape at a time (proxy/observability/exposition.py: a few µs per sample where
  prometheus-client's renderer takes ~10): streams keep flowing while it runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable

import trio
from prometheus_client import Counter, Gauge, Histogram, values

from proxy.observability import exposition

from proxy.config import Config
from proxy.routing.breaker import CLOSED, HALF_OPEN, OPEN
from proxy.server.exchange import Exchange

if TYPE_CHECKING:
    from proxy.routing.router import Router
    from proxy.server.app import Gateway
    from proxy.server.streams import Streams

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_MODEL_LABELS = 200   # names matched by glob routes that get their own label value, per process
MAX_CODE_LABELS = 50     # distinct error codes (attempt outcomes) per process
MAX_LABEL_CHARS = 100    # a longer name is never a label value
# Seconds; 1 ms resolution at the low end, and the default SLO threshold (2.5 s) is a bound.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # queue_timeout: 1 s default
BREAKER_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
DROP_REASONS = {"client_stalled": "write_deadline"}


def share_across_workers() -> str:
    """Before forking workers: a fresh directory every worker writes its values to, so that one
    scrape shows the whole server. Returns it (the caller removes it when the workers are gone)."""
    path = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ[MULTIPROC_ENV] = path
    # prometheus-client picks its value store when first imported; this process imported it
    # already (building the gateway), so switch it the way its own multiprocess setup does.
    values.ValueClass = values.get_value_class()
    return path


def remove_shared(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == path:
        del os.environ[MULTIPROC_ENV]


def outcome_class(outcome: str) -> str:
    """The relay's and the app's outcomes in four values: ok, error, client_disconnected, client_stalled."""
    if outcome.startswith("error"):
        return "error"
    return outcome if outcome in ("ok", "client_disconnected", "client_stalled") else "ok"


async def stepped(steps: exposition.Steps) -> Any:
    """Run a scrape's steps with a checkpoint between them (the event loop keeps relaying)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await trio.lowlevel.checkpoint()


class LabelBound:
    """Label values as given until `limit` distinct ones were seen, then `other` (bounded series)."""

    def __init__(self, limit: int, other: str = "other"):
        self._seen: set[str] = set()
        self._limit = limit
        self._other = other

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit or len(value) > MAX_LABEL_CHARS:
            return self._other
        self._seen.add(value)
        return value


class ModelLabels:
    """A requested model name -> its label: exact route names as they are, glob-matched names while
    the budget lasts (then "other"), names no route knows "unknown"."""

    def __init__(self, config: Config):
        self._config = config
        self._exact = {r.name for r in config.models if not r.is_glob}
        self._globbed = LabelBound(MAX_MODEL_LABELS)

    def __call__(self, model: str) -> str:
        if model in self._exact or model == "-":
            return model
        if len(model) > MAX_LABEL_CHARS or self._config.route(model) is None:
            return "unknown"
        return self._globbed(model)


class Families:
    """The metric families of one process (built after the fork: see module docstring). One process:
    `exposition.Store` families; several workers: prometheus-client's, over its multiprocess files."""

    def __init__(self, config: Config, multiprocess_mode: bool):
        self.multiprocess = multiprocess_mode
        self.store = None if multiprocess_mode else exposition.Store()
        self.reader = exposition.MultiprocessReader(os.environ[MULTIPROC_ENV]) if multiprocess_mode else None
        latency = tuple(sorted(set(LATENCY_BUCKETS) | {config.slo.latency_threshold}))
        counter, histogram, gauge = self._maker("counter"), self._maker("histogram"), self._maker("gauge")
        self.requests = counter("gateway_requests", "Requests by endpoint, model, HTTP status and outcome "
                                "(outcome error with status 200: a stream that failed after its first byte)",
                                ["endpoint", "model", "status", "outcome"])
        self.duration = histogram("gateway_request_duration_seconds", "Arrival to the last byte sent "
                                  "(requests served: status < 400, outcome ok)", ["model", "stream"], latency)
        self.ttft = histogram("gateway_ttft_seconds", "Arrival to the first visible token relayed (streams)",
                              ["model"], latency)
        self.itl = histogram("gateway_inter_token_latency_seconds",
                             "Per stream: mean gap between tokens, (end - first token) / (output tokens - 1)",
                             ["model"], ITL_BUCKETS)
        self.overhead = histogram("gateway_overhead_seconds", "Time in the gateway before routing: arrival "
                                  "to every policy admitted (body, parse, auth, keys, cache lookup)",
                                  ["endpoint"], OVERHEAD_BUCKETS)
        self.tokens = counter("gateway_tokens", "Tokens by model and direction (input includes cached)",
                              ["model", "direction"])
        self.cost = counter("gateway_cost_usd", "Spend in USD by model (as priced by the keys feature)", ["model"])
        self.attempts = counter("gateway_upstream_attempts", "Upstream attempts by deployment and outcome "
                                "(ok, an error code, cancelled)", ["deployment", "outcome"])
        self.retries = counter("gateway_retries", "Attempts that tried the same deployment again", ["model"])
        self.failovers = counter("gateway_failovers", "Attempts that moved to another deployment", ["model"])
        self.fallbacks = counter("gateway_fallbacks", "Requests answered by a fallback model", ["model"])
        self.queue_wait = histogram("gateway_queue_wait_seconds", "Time a request waited for a deployment's "
                                    "max_concurrency slot (requests that met admission control only)",
                                    ["model"], QUEUE_BUCKETS)
        self.dropped = counter("gateway_clients_dropped", "Clients dropped by the gateway (write_deadline: "
                               "a write stayed pending for write_timeout)", ["reason"])
        self.cache = counter("gateway_cache_requests", "Requests the response cache looked at, by result",
                             ["model", "result"])
        self.tiers = counter("gateway_tier_requests", "Requests routed by a cost tier", ["tier"])
        self.per_key = config.metrics.per_key
        if self.per_key:
            self.key_requests = counter("gateway_key_requests", "Requests per virtual key", ["key", "team"])
            self.key_cost = counter("gateway_key_cost_usd", "Spend in USD per virtual key", ["key", "team"])
            self.key_budget = gauge("gateway_key_budget_remaining_usd", "Budget left per virtual key after its "
                                    "last request (several workers: the lowest)", ["key", "team"], mode="livemin")
        self.open_streams = gauge("gateway_open_streams", "Streams being relayed now", [], mode="livesum")
        self.breaker = gauge("gateway_breaker_state", "Circuit breaker per deployment: 0 closed, 1 half-open, "
                             "2 open (several workers: the worst)", ["deployment"], mode="livemax")
        self.clients_dropped_write_deadline = self.dropped.labels("write_deadline")

    def _maker(self, kind: str) -> Callable[..., Any]:
        def make(name: str, help_text: str, labelnames: list[str], buckets: tuple = (), mode: str = "") -> Any:
            if self.store is not None:
                return self.store.add(exposition.Family(kind, name, help_text, labelnames, buckets))
            if kind == "histogram":
                return Histogram(name, help_text, labelnames, buckets=buckets, registry=None)
            if kind == "gauge":
                return Gauge(name, help_text, labelnames, multiprocess_mode=mode, registry=None)
            return Counter(name, help_text, labelnames, registry=None)
        return make

    def collect(self) -> exposition.Steps:
        """Every value of the server now, in steps (exposition.Steps)."""
        return self.reader.collect() if self.reader is not None else self.store.collect()


class Metrics:
    """The metrics policy (runs last: it reads what the others settled) and the /metrics route."""

    def __init__(self, config: Config, router: "Router", streams: "Streams"):
        self._config = config
        self._router = router
        self._streams = streams
        self._models = ModelLabels(config)
        self._codes = LabelBound(MAX_CODE_LABELS)
        self._families: Families | None = None
        self._pid = 0
        self._children: dict[tuple, Any] = {}  # (family, labels) -> child: one dict lookup per update
        self._scrape_lock = trio.Lock()
        for state in router.states.values():
            state.breaker.on_change = self._breaker_changed

    # -- per process: built on first use, after any fork --

    def families(self) -> Families:
        f = self._families
        if f is None or self._pid != os.getpid():
            f = self._families = Families(self._config, MULTIPROC_ENV in os.environ)
            self._pid = os.getpid()
            self._children = {}
            for name, state in self._router.states.items():
                f.breaker.labels(name).set(BREAKER_VALUE[state.breaker.state])
            if not f.multiprocess:
                f.open_streams.set_function(lambda: len(self._streams))
        return f

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def _breaker_changed(self, deployment: str, state: str) -> None:
        self.families().breaker.labels(deployment).set(BREAKER_VALUE[state])

    # -- the policy --

    async def admit(self, x: Exchange, request: Any) -> None:
        x.notes["metrics"] = time.perf_counter()  # every earlier policy has admitted: overhead ends here
        if x.stream:
            f = self.families()
            if f.multiprocess:
                f.open_streams.inc()

    def settle(self, x: Exchange) -> None:
        now = time.perf_counter()
        f = self.families()
        child = self._child
        model = self._models(x.model)
        endpoint = x.endpoint
        child(f.requests, endpoint, model, str(x.status), outcome_class(x.outcome)).inc()
        admitted = x.notes.get("metrics")
        if admitted is not None:
            child(f.overhead, endpoint).observe(admitted - x.started)
            if x.stream and f.multiprocess:
                f.open_streams.dec()
        if x.outcome == "client_stalled":
            f.clients_dropped_write_deadline.inc()
        if x.model == "-":  # not a model request (admin, health, unknown path): nothing more to see
            return
        if x.status < 400 and x.outcome == "ok":
            child(f.duration, model, "true" if x.stream else "false").observe(now - x.started)
        if x.first_token_at is not None:
            child(f.ttft, model).observe(x.first_token_at - x.started)
            usage = x.usage
            tokens = (usage.completion_tokens or usage.streamed_chunks) if usage is not None else 0
            if tokens > 1:
                child(f.itl, model).observe((now - x.first_token_at) / (tokens - 1))
        usage = x.usage
        if usage is not None:
            if usage.prompt_tokens:
                child(f.tokens, model, "input").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                child(f.tokens, model, "output").inc(usage.completion_tokens)
            if usage.cached_tokens:
                child(f.tokens, model, "cached").inc(usage.cached_tokens)
        if x.cost_usd:
            child(f.cost, model).inc(x.cost_usd)
        served = x.served
        if served is not None and served.tried:
            previous = None
            for deployment, outcome, _, _ in served.tried:
                child(f.attempts, deployment, self._codes(outcome)).inc()
                if previous is not None:
                    child(f.retries if deployment == previous else f.failovers, model).inc()
                previous = deployment
            if served.fallback:
                child(f.fallbacks, model).inc()
        if served is not None and served.queue_wait is not None:
            child(f.queue_wait, model).observe(served.queue_wait)
        if x.cache is not None:
            child(f.cache, model, x.cache).inc()
        tier = x.notes.get("tier")
        if tier is not None:
            child(f.tiers, self._codes(str(tier))).inc()
        if f.per_key and x.principal.kind == "key" and x.principal.key_id is not None:
            labels = (str(x.principal.key_id)[:MAX_LABEL_CHARS], str(x.principal.team or "-")[:MAX_LABEL_CHARS])
            child(f.key_requests, *labels).inc()
            if x.cost_usd:
                child(f.key_cost, *labels).inc(x.cost_usd)
            remaining = (x.notes.get("keys") or {}).get("budget_remaining_usd")
            if remaining is not None:
                child(f.key_budget, *labels).set(remaining)

    # -- GET /metrics --

    def routes(self, gateway: "Gateway") -> None:
        from proxy.server.app import Route

        auth = "admin" if self._config.metrics.require_key else "none"
        gateway.add_route("/metrics", Route({"GET": self._scrape}, auth=auth, body=False))

    async def collect(self) -> exposition.Merged:
        """The whole server's values, one reader at a time, on the event loop in steps of about a
        millisecond with a checkpoint between them: streams keep flowing during a scrape. (Not a
        thread: a CPU-bound thread can take the GIL for up to 5 ms each time the loop lets go of
        it for a syscall; steps bound the stall by construction.)"""
        async with self._scrape_lock:
            return await stepped(self.families().collect())

    async def render(self) -> bytes:
        async with self._scrape_lock:
            return await stepped(exposition.render_steps(await stepped(self.families().collect())))

    async def _scrape(self, x: Exchange, body: bytes, headers: Any, receive: Callable, send: Callable) -> None:
        data = await self.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                                (b"content-length", str(len(data)).encode())] + x.response_headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})
