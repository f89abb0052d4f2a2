"""Configuration: TOML parsed once, at start, into frozen dataclasses.

Rules: every key is known (a typo is an error, not a silent default); every value is checked for
type and range; an error names the dotted key, the value and what was expected, and is raised
before the server binds a port. Secrets are never stored here: only the *names* of the environment
variables that hold them, read when the app is built (`proxy/server/app.py`).
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from proxy.core.errors import ConfigError

# openai: OpenAI itself; openai-compatible: any server speaking Chat Completions (vLLM, Together,
# Groq, Azure OpenAI with api_key_header/api_version); anthropic: the Messages API; ollama: /api/chat.
PROVIDER_KINDS = ("openai", "openai-compatible", "anthropic", "ollama")
TOOL_ARGUMENTS = ("pass", "validate")
CONTEXT_STRATEGIES = ("reject", "sliding_window")
# How prompts are counted for a model: OpenAI's own tokenizers, or cl100k_base times a margin for
# models whose tokenizer is not shipped (Anthropic, Ollama's open-weight models).
MODEL_ENCODINGS = ("o200k_base", "cl100k_base", "approximate")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Seconds one write to a client may stay pending before the stream is dropped.
    write_timeout: float = 10.0
    # Chunks buffered between the upstream reader and the client writer (the relay's only queue).
    stream_buffer: int = 16
    max_body_bytes: int = 10 * 1024 * 1024
    # SSE comment sent while no event has arrived for this long (slow first token).
    keepalive_interval: float = 15.0
    # Largest single SSE event accepted from a provider; bounds one channel slot.
    max_event_bytes: int = 1024 * 1024
    # On SIGTERM/SIGINT: open streams may finish for this long, then they are cancelled.
    drain_timeout: float = 30.0
    # Processes sharing the listening socket (each a trio loop); 1 = no fork.
    workers: int = 1
    # A request head must be complete this long after the connection opened (or after the first
    # byte of a next request on a keep-alive connection); then 408 and close.
    header_timeout: float = 10.0
    # A request body may take body_timeout + 1 s per min_body_rate bytes received; slower is cut.
    body_timeout: float = 10.0
    min_body_rate: int = 16384
    # Open client connections per worker; one more gets 503 at once. Lowered at start to what the
    # open-file limit allows ((limit - 100) / 2: a stream holds a client and an upstream socket).
    max_connections: int = 10000
    certfile: str | None = None
    keyfile: str | None = None


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    master_key_env: str | None = "PROXY_MASTER_KEY"
    # The master key may also call the model endpoints (false: only virtual keys may, see [state]).
    master_key_traffic: bool = True


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str
    api_key_env: str | None = None
    max_concurrency: int = 1000
    connect_timeout: float = 5.0
    # LLMs think before they speak: the first output may take long, later gaps are shorter.
    first_byte_timeout: float = 300.0  # request sent -> first output (first token of a stream)
    read_timeout: float = 120.0        # every later gap between body reads
    # A non-streaming answer (chat, embeddings) larger than this is a 502, never buffered whole.
    max_response_bytes: int = 32 * 1024 * 1024
    # Extra request headers (e.g. an OpenAI-Organization, a vLLM router's tenant header).
    headers: tuple[tuple[str, str], ...] = ()
    # The header that carries the key, sent as-is (Azure: "api-key"); unset = the kind's own
    # (Bearer for openai kinds, x-api-key for anthropic).
    api_key_header: str | None = None
    # openai kinds: the `api-version` query parameter (Azure); anthropic: `anthropic-version`.
    api_version: str | None = None
    # anthropic: max_tokens is required there; used when the client did not set one.
    max_tokens: int = 4096
    # anthropic: mark the system prompt and tool definitions with cache_control (from OpenAI format).
    auto_prompt_cache: bool = False
    # "validate": a finished tool call whose arguments do not fit the tool's schema is an error.
    tool_arguments: str = "pass"


@dataclass(frozen=True, kw_only=True)
class Deployment:
    name: str  # unique; default "provider/model" (breaker state and metrics are keyed by it)
    provider: str
    model: str  # "" = forward the requested name (a glob route's deployment without `model`)
    weight: float = 1.0
    priority: int = 0  # lower is tried first; the next priority only when these are exhausted
    max_concurrency: int | None = None  # admission control for this deployment alone
    ttft_timeout: float | None = None   # overrides the model's and the router's


@dataclass(frozen=True, kw_only=True)
class ModelRoute:
    name: str  # exact name or glob pattern
    deployments: tuple[Deployment, ...]
    fallbacks: tuple[str, ...] = ()       # other model names tried, in order, when this group is exhausted
    context_window_fallback: str | None = None  # model for a provider's context-length error
    ttft_timeout: float | None = None
    pin: str | None = None                # a deployment name: only it serves, one attempt, no fallbacks
    allow_deployment_header: bool = False  # clients may ask for one deployment (x-gateway-deployment)
    # A prompt + max_tokens over the context window: "reject" (400 context_length_exceeded) or
    # "sliding_window" (oldest turns dropped, system prompt kept: proxy/accounting/context.py).
    context_strategy: str = "reject"

    @property
    def is_glob(self) -> bool:
        return any(c in self.name for c in "*?[")


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    retries: int = 1                 # retries within a model's deployments before its fallbacks
    backoff_initial: float = 0.25    # full jitter: uniform(0, min(backoff_max, initial * 2**n))
    backoff_max: float = 4.0
    retry_after_max: float = 5.0     # a longer provider Retry-After means fail over, not wait
    request_timeout: float = 600.0   # one request's whole time, retries included
    ttft_timeout: float | None = None  # no first token in time -> cancel and fail over
    queue_timeout: float = 1.0       # wait for a saturated deployment at most this, then move on / 429
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0
    breaker_failure_rate: float = 0.5
    breaker_window: float = 60.0
    breaker_min_requests: int = 20


# -- the per-request policies' sections (proxy/server/exchange.py); each parsed by its own function --

@dataclass(frozen=True, kw_only=True)
class StateConfig:
    """[state]: where keys, spend and limits live (SQLite file embedded; Redis for several instances).

    Virtual keys, budgets and rate limits are on when the config has a [state] table."""
    enabled: bool = False
    backend: str = "sqlite"
    path: str = "gateway.db"
    url: str | None = None
    # Store unreachable: false = refuse with 503 (nothing served unaccounted), true = serve the
    # keys already known without limits or budgets, and log it.
    fail_open: bool = False
    # Seconds between looks at the keys' version (revocation reaches every worker within this + a bit).
    refresh_interval: float = 0.5
    # A process that has not been seen for this long is gone: its reservations are released.
    stale_after: float = 10.0


@dataclass(frozen=True, kw_only=True)
class BudgetsConfig:
    """[budgets]: the global monthly budget and the kill switch for every budget."""
    kill_at: float = 0.9              # share of a budget at which new requests are refused
    monthly_usd: float | None = None  # the gateway's whole monthly budget (None = no global budget)
    on_budget: str = "reject"         # "reject" (429 budget_exceeded) or "downgrade" (to `downgrade`'s model)
    # on_budget = "downgrade": model -> cheaper model, used once a budget refuses the first one
    downgrade: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TeamConfig:
    """[teams.NAME]: a team's (tenant's) budget, shared by every key with that team."""
    name: str
    budget_usd: float | None = None
    budget_period: str = "month"


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """[metrics]: the Prometheus /metrics endpoint."""
    enabled: bool = True       # false: no /metrics route and nothing observed per request
    require_key: bool = False  # true: /metrics wants the master key as Bearer
    per_key: bool = False      # true: request and cost counters per virtual key and team too


@dataclass(frozen=True, kw_only=True)
class SLOConfig:
    """[slo]: objectives measured at the edge, their error budgets and burn rates
    (proxy/observability/slo.py). Counts are kept per minute in [state] path when [state] is on."""
    enabled: bool = True
    window_days: int = 30
    availability: float = 0.995      # share of requests not failed by the gateway or its providers
    latency_objective: float = 0.95  # share of requests whose latency is within latency_threshold
    latency_threshold: float = 2.5   # seconds: TTFT for streams, the whole answer otherwise
    cost_per_request: float = 0.015  # mean USD per priced request


@dataclass(frozen=True, kw_only=True)
class TracingConfig:
    """[tracing]: OpenTelemetry traces (proxy/observability/tracing.py), off by default; needs the
    `otel` extra. Spans are exported over OTLP/HTTP by the SDK's own thread, in batches; at most
    queue_size finished spans wait for it (more are dropped by the SDK)."""
    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # the OTLP/HTTP traces endpoint of a collector
    service_name: str = "llm-gateway"
    sample_ratio: float = 1.0        # share of new traces kept; a sampled incoming traceparent is kept
    queue_size: int = 2048           # finished spans waiting for the exporter thread


CACHE_BACKENDS = ("sqlite", "redis", "memory")
CACHE_MODES = ("deterministic", "all")
CACHE_REPLAYS = ("fast", "original")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """[cache]: the response cache (proxy/cache/). Bounds: max_entries and max_bytes for the whole
    store (least recently used entries go first), max_entry_bytes for one answer (larger ones are
    not cached), write_queue for the writes waiting for the store (more are dropped and counted;
    at most write_queue x max_entry_bytes held)."""
    enabled: bool = False
    backend: str = "sqlite"
    path: str = "gateway-cache.db"      # sqlite: the file
    url: str | None = None              # redis: redis://host:port/db
    ttl: float = 3600.0                 # seconds an entry is served fresh
    stale_if_error: float = 86400.0     # seconds after ttl it may still serve when every provider failed
    mode: str = "deterministic"         # "deterministic": temperature 0 or a seed; "all": every request
    max_entries: int = 10000
    max_bytes: int = 256 * 1024 * 1024
    max_entry_bytes: int = 1024 * 1024
    write_queue: int = 256
    key_prefix: str = "gwcache:"        # redis: the keys' prefix (several gateways share it)
    replay: str = "fast"                # "original": streams are replayed with the provider's gaps


@dataclass(frozen=True, kw_only=True)
class Tier:
    """One tier of a cost-tier alias: a model group and the limits a request must fit to go there
    (None = no limit). The last tier of an alias takes whatever the others did not."""
    name: str
    model: str
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    tools: bool = True                  # False: a request with tools goes to a later tier
    json_schema: bool = True            # False: response_format json_schema goes to a later tier
    images: bool = True                 # False: an image part goes to a later tier
    keywords: tuple[str, ...] = ()      # whole words in the last user turn (any case) that escalate
    patterns: tuple[str, ...] = ()      # regular expressions on the last user turn that escalate


@dataclass(frozen=True, kw_only=True)
class TierAlias:
    """[tiers."NAME"]: requests for model NAME are classified into its tiers (proxy/routing/tiers.py)."""
    name: str
    tiers: tuple[Tier, ...]
    encoding: str = "o200k_base"
    # A key whose remaining budget is below this goes to the first tier, whatever it asks.
    budget_floor_usd: float | None = None


@dataclass(frozen=True, kw_only=True)
class ModelInfoConfig:
    """[model_info."<upstream model name or glob>"]: prices and limits of an upstream model, over
    the shipped table (proxy/accounting/model_info.py); None = the shipped value (or none)."""
    pattern: str
    input_usd_per_mtok: float | None = None
    output_usd_per_mtok: float | None = None
    cached_input_usd_per_mtok: float | None = None
    cache_write_usd_per_mtok: float | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None
    encoding: str | None = None       # one of MODEL_ENCODINGS
    token_margin: float | None = None  # counts are multiplied by this (default 1.2 for "approximate")


@dataclass(frozen=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    models: tuple[ModelRoute, ...] = ()
    state: StateConfig = field(default_factory=StateConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    teams: dict[str, TeamConfig] = field(default_factory=dict)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    tiers: dict[str, TierAlias] = field(default_factory=dict)
    model_info: tuple[ModelInfoConfig, ...] = ()

    def route(self, model: str) -> ModelRoute | None:
        """Exact names win over globs; otherwise the first matching glob in file order."""
        for route in self.models:
            if not route.is_glob and route.name == model:
                return route
        for route in self.models:
            if route.is_glob and fnmatch.fnmatchcase(model, route.name):
                return route
        return None


# -- checking helpers: each returns the value or raises ConfigError naming key/value/expected --

def _table(raw: Any, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(key, raw, "a table")
    return raw


def _known(raw: dict[str, Any], key: str, allowed: set[str]) -> None:
    for k in raw:
        if k not in allowed:
            where = f"{key}.{k}" if key else k
            raise ConfigError(where, raw[k], f"no such key (known: {', '.join(sorted(allowed))})")


def _number(key: str, value: Any, *, minimum: float, integer: bool = False) -> Any:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ConfigError(key, value, f"{what} >= {minimum}")
    if value < minimum:
        raise ConfigError(key, value, f"{what} >= {minimum}")
    return value


def _string(key: str, value: Any, *, check: Callable[[str], bool] = bool,
            expected: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not check(value):
        raise ConfigError(key, value, expected)
    return value


def _fields(raw: dict[str, Any], prefix: str, spec: dict[str, Callable[[str, Any], Any]]) -> dict:
    _known(raw, prefix, set(spec))
    return {k: spec[k](f"{prefix}.{k}", v) for k, v in raw.items()}


def _positive(key: str, v: Any) -> float:
    return _number(key, v, minimum=0.001)


def _count(key: str, v: Any) -> int:
    return _number(key, v, minimum=1, integer=True)


def _port(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise ConfigError(key, v, "an integer port 0..65535 (0 picks a free one)")
    return v


def _url(key: str, v: Any) -> str:
    return _string(key, v, check=lambda s: s.startswith(("http://", "https://")),
                   expected="an http:// or https:// URL").rstrip("/")


def _env_name(key: str, v: Any) -> str:
    return _string(key, v, check=lambda s: s.replace("_", "").isalnum(),
                   expected="the name of an environment variable")


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, v, "true or false")
    return v


def _header_name(key: str, v: Any) -> str:
    return _string(key, v, check=lambda s: s.replace("-", "").isalnum() and s.isascii(),
                   expected="an HTTP header name (letters, digits, '-')").lower()


def _headers(key: str, v: Any) -> tuple[tuple[str, str], ...]:
    table = _table(v, key)
    out = []
    for name, value in table.items():
        _header_name(f"{key}.{name}", name)
        _string(f"{key}.{name}", value, check=lambda s: s.isprintable() and s.isascii(),
                expected="a printable ASCII string")
        out.append((name.lower(), value))
    return tuple(out)


def _path(key: str, v: Any) -> str:
    _string(key, v)
    if not os.path.isfile(v):
        raise ConfigError(key, v, "a path to a readable file")
    return v


_SERVER_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "host": lambda k, v: _string(k, v),
    "port": _port,
    "write_timeout": _positive,
    "stream_buffer": _count,
    "max_body_bytes": _count,
    "keepalive_interval": _positive,
    "max_event_bytes": lambda k, v: _number(k, v, minimum=1024, integer=True),
    "drain_timeout": lambda k, v: _number(k, v, minimum=0),
    "workers": lambda k, v: _number(k, v, minimum=1, integer=True),
    "header_timeout": _positive,
    "body_timeout": _positive,
    "min_body_rate": lambda k, v: _number(k, v, minimum=1, integer=True),
    "max_connections": _count,
    "certfile": _path,
    "keyfile": _path,
}

_PROVIDER_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "kind": lambda k, v: _string(k, v, check=lambda s: s in PROVIDER_KINDS,
                                 expected=f"one of {', '.join(PROVIDER_KINDS)}"),
    "base_url": _url,
    "api_key_env": _env_name,
    "max_concurrency": _count,
    "connect_timeout": _positive,
    "first_byte_timeout": _positive,
    "read_timeout": _positive,
    "max_response_bytes": lambda k, v: _number(k, v, minimum=1024, integer=True),
    "headers": _headers,
    "api_key_header": _header_name,
    "api_version": lambda k, v: _string(k, v, check=lambda s: s.isprintable() and " " not in s,
                                        expected="a version string without spaces"),
    "max_tokens": _count,
    "auto_prompt_cache": _bool,
    "tool_arguments": lambda k, v: _string(k, v, check=lambda s: s in TOOL_ARGUMENTS,
                                           expected=f"one of {', '.join(TOOL_ARGUMENTS)}"),
}


def _provider(name: str, raw: Any) -> ProviderConfig:
    key = f"providers.{name}"
    values = _fields(_table(raw, key), key, _PROVIDER_SPEC)
    for required in ("kind", "base_url"):
        if required not in values:
            raise ConfigError(f"{key}.{required}", None, "a value (this key is required)")
    if values.get("auto_prompt_cache") and values["kind"] != "anthropic":
        raise ConfigError(f"{key}.auto_prompt_cache", True, 'false unless kind = "anthropic"')
    return ProviderConfig(name=name, **values)


def _deployment(key: str, raw: Any, model_name: str, providers: dict[str, ProviderConfig]) -> Deployment:
    raw = _table(raw, key)
    _known(raw, key, {"provider", "model", "weight", "priority", "max_concurrency", "ttft_timeout", "name"})
    provider = raw.get("provider")
    if provider not in providers:
        raise ConfigError(f"{key}.provider", provider,
                          f"the name of a [providers.*] table ({', '.join(providers) or 'none defined'})")
    model = raw.get("model", model_name)
    if "model" not in raw and any(c in model_name for c in "*?["):
        model = ""  # a glob route forwards the requested name (see router)
    elif not isinstance(model, str) or not model:
        raise ConfigError(f"{key}.model", model, "a non-empty string")
    weight = _number(f"{key}.weight", raw.get("weight", 1), minimum=0)
    priority = _number(f"{key}.priority", raw.get("priority", 0), minimum=0, integer=True)
    limit = raw.get("max_concurrency")
    ttft = raw.get("ttft_timeout")
    name = _string(f"{key}.name", raw.get("name", f"{provider}/{model or '*'}"))
    return Deployment(name=name, provider=provider, model=model, weight=weight, priority=priority,
                      max_concurrency=None if limit is None else _count(f"{key}.max_concurrency", limit),
                      ttft_timeout=None if ttft is None else _positive(f"{key}.ttft_timeout", ttft))


def _model(name: str, raw: Any, providers: dict[str, ProviderConfig]) -> ModelRoute:
    key = f'models."{name}"'
    raw = _table(raw, key)
    _known(raw, key, {"deployments", "fallbacks", "context_window_fallback", "ttft_timeout", "pin",
                      "allow_deployment_header", "context_strategy"})
    deployments = raw.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise ConfigError(f"{key}.deployments", deployments, "a non-empty list of {provider=..., model=...}")
    parsed = tuple(_deployment(f"{key}.deployments[{i}]", d, name, providers)
                   for i, d in enumerate(deployments))
    if sum(d.weight for d in parsed) <= 0:
        raise ConfigError(f"{key}.deployments", deployments, "at least one deployment with weight > 0")
    fallbacks = raw.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) and f for f in fallbacks):
        raise ConfigError(f"{key}.fallbacks", fallbacks, "a list of model names")
    context = raw.get("context_window_fallback")
    if context is not None:
        _string(f"{key}.context_window_fallback", context)
    pin = raw.get("pin")
    if pin is not None and pin not in {d.name for d in parsed}:
        raise ConfigError(f"{key}.pin", pin, f"the name of one of its deployments ({', '.join(d.name for d in parsed)})")
    header = raw.get("allow_deployment_header", False)
    if not isinstance(header, bool):
        raise ConfigError(f"{key}.allow_deployment_header", header, "true or false")
    ttft = raw.get("ttft_timeout")
    strategy = _string(f"{key}.context_strategy", raw.get("context_strategy", "reject"),
                       check=lambda s: s in CONTEXT_STRATEGIES,
                       expected=" or ".join(f'"{s}"' for s in CONTEXT_STRATEGIES))
    return ModelRoute(name=name, deployments=parsed, fallbacks=tuple(fallbacks),
                      context_window_fallback=context, pin=pin, allow_deployment_header=header,
                      context_strategy=strategy,
                      ttft_timeout=None if ttft is None else _positive(f"{key}.ttft_timeout", ttft))


_ROUTER_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "retries": lambda k, v: _number(k, v, minimum=0, integer=True),
    "backoff_initial": lambda k, v: _number(k, v, minimum=0),
    "backoff_max": lambda k, v: _number(k, v, minimum=0),
    "retry_after_max": lambda k, v: _number(k, v, minimum=0),
    "request_timeout": _positive,
    "ttft_timeout": _positive,
    "queue_timeout": lambda k, v: _number(k, v, minimum=0),
    "breaker_failures": _count,
    "breaker_cooldown": lambda k, v: _number(k, v, minimum=0),
    "breaker_failure_rate": lambda k, v: _number(k, v, minimum=0.01) if v <= 1 else
    _fail(k, v, "a share between 0.01 and 1"),
    "breaker_window": _positive,
    "breaker_min_requests": _count,
}


def _fail(key: str, value: Any, expected: str) -> Any:
    raise ConfigError(key, value, expected)


def _check_references(models: tuple[ModelRoute, ...], config: "Config") -> None:
    """Fallback names must resolve to a route; deployment names must mean one upstream."""
    seen: dict[str, tuple[str, str]] = {}
    for route in models:
        key = f'models."{route.name}"'
        for i, name in enumerate(route.fallbacks):
            if config.route(name) is None:
                raise ConfigError(f"{key}.fallbacks[{i}]", name, "a model name defined under [models]")
        if route.context_window_fallback and config.route(route.context_window_fallback) is None:
            raise ConfigError(f"{key}.context_window_fallback", route.context_window_fallback,
                              "a model name defined under [models]")
        for d in route.deployments:
            if seen.setdefault(d.name, (d.provider, d.model)) != (d.provider, d.model):
                raise ConfigError(f"{key}.deployments.name", d.name,
                                  "a name used by no other provider/model pair")


# -- [state] (keys, spend, limits) --

def _state(raw: Any) -> StateConfig:
    values = _fields(_table(raw, "state"), "state", {
        "enabled": _bool,
        "backend": lambda k, v: _string(k, v, check=lambda s: s in ("sqlite", "redis"),
                                        expected='"sqlite" or "redis"'),
        "path": lambda k, v: _string(k, v),
        "url": lambda k, v: _string(k, v, check=lambda s: s.startswith(("redis://", "rediss://", "unix://")),
                                    expected="a redis:// URL"),
        "fail_open": _bool,
        "refresh_interval": lambda k, v: _number(k, v, minimum=0.05) if v <= 1 else
        _fail(k, v, "a number of seconds between 0.05 and 1 (revocation must show within 1 s)"),
        "stale_after": lambda k, v: _number(k, v, minimum=2),
    })
    values.setdefault("enabled", True)  # the table is there: keys are on unless it says otherwise
    if values.get("backend") == "redis" and not values.get("url"):
        raise ConfigError("state.url", None, 'a redis:// URL (backend = "redis")')
    return StateConfig(**values)


# -- [budgets], [teams.NAME] (proxy/keys) --

def _period(key: str, v: Any) -> str:
    return _string(key, v, check=lambda s: s in ("day", "month", "total"), expected='"day", "month" or "total"')


def _budgets(raw: Any) -> BudgetsConfig:
    budgets = BudgetsConfig(**_fields(_table(raw, "budgets"), "budgets", {
        "kill_at": lambda k, v: _number(k, v, minimum=0.01) if v <= 1 else _fail(k, v, "a share between 0.01 and 1"),
        "monthly_usd": lambda k, v: _number(k, v, minimum=0),
        "on_budget": lambda k, v: _string(k, v, check=lambda s: s in ("reject", "downgrade"),
                                          expected='"reject" or "downgrade"'),
        "downgrade": lambda k, v: {name: _string(f"{k}.{name}", to) for name, to in _table(v, k).items()},
    }))
    if budgets.on_budget == "downgrade" and not budgets.downgrade:
        raise ConfigError("budgets.downgrade", {}, 'a table model = "cheaper model" (on_budget = "downgrade")')
    return budgets


def _teams(raw: Any) -> dict[str, TeamConfig]:
    return {name: TeamConfig(name=name, **_fields(_table(team, f"teams.{name}"), f"teams.{name}", {
        "budget_usd": lambda k, v: _number(k, v, minimum=0),
        "budget_period": _period,
    })) for name, team in _table(raw, "teams").items()}


# -- [metrics] --

def _metrics(raw: Any) -> MetricsConfig:
    return MetricsConfig(**_fields(_table(raw, "metrics"), "metrics",
                                   {"enabled": _bool, "require_key": _bool, "per_key": _bool}))


# -- [slo] --

def _share(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ConfigError(key, v, "a share between 0 and 1 (exclusive), e.g. 0.995")
    return float(v)


def _slo(raw: Any) -> SLOConfig:
    return SLOConfig(**_fields(_table(raw, "slo"), "slo", {
        "enabled": _bool,
        "window_days": lambda k, v: _number(k, v, minimum=1, integer=True),
        "availability": _share, "latency_objective": _share,
        "latency_threshold": _positive, "cost_per_request": _positive}))


# -- [tracing] --

OTEL_INSTALL = "pip install 'trio-llm-gateway[otel]'"


def _ratio(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ConfigError(key, v, "a share between 0 and 1 (inclusive)")
    return float(v)


def _tracing(raw: Any) -> TracingConfig:
    tracing = TracingConfig(**_fields(_table(raw, "tracing"), "tracing", {
        "enabled": _bool,
        "endpoint": _url,
        "service_name": lambda k, v: _string(k, v),
        "sample_ratio": _ratio,
        "queue_size": _count,
    }))
    if tracing.enabled:
        try:  # checked here, before the server binds a port, not at the first request
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError as e:
            raise ConfigError("tracing.enabled", True,
                              f"the OpenTelemetry packages installed ({OTEL_INSTALL}; {e})") from None
    return tracing


# -- [cache] --

def _cache(raw: Any) -> CacheConfig:
    cache = CacheConfig(**_fields(_table(raw, "cache"), "cache", {
        "enabled": _bool,
        "backend": lambda k, v: _string(k, v, check=lambda s: s in CACHE_BACKENDS,
                                        expected=f"one of {', '.join(CACHE_BACKENDS)}"),
        "path": lambda k, v: _string(k, v),
        "url": lambda k, v: _string(k, v, check=lambda s: s.startswith(("redis://", "rediss://", "unix://")),
                                    expected="a redis:// URL"),
        "ttl": _positive,
        "stale_if_error": lambda k, v: _number(k, v, minimum=0),
        "mode": lambda k, v: _string(k, v, check=lambda s: s in CACHE_MODES,
                                     expected=f"one of {', '.join(CACHE_MODES)}"),
        "max_entries": _count,
        "max_bytes": lambda k, v: _number(k, v, minimum=1024, integer=True),
        "max_entry_bytes": lambda k, v: _number(k, v, minimum=256, integer=True),
        "write_queue": _count,
        "key_prefix": lambda k, v: _string(k, v),
        "replay": lambda k, v: _string(k, v, check=lambda s: s in CACHE_REPLAYS,
                                       expected=f"one of {', '.join(CACHE_REPLAYS)}"),
    }))
    if cache.backend == "redis" and cache.url is None:
        raise ConfigError("cache.url", None, 'a redis:// URL (backend = "redis")')
    if cache.max_entry_bytes > cache.max_bytes:
        raise ConfigError("cache.max_entry_bytes", cache.max_entry_bytes,
                          f"at most cache.max_bytes ({cache.max_bytes})")
    return cache


# -- [tiers."NAME"] (cost-aware routing: proxy/routing/tiers.py) --

def _words(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(w, str) and w.strip() for w in v):
        raise ConfigError(key, v, "a list of non-empty strings")
    return tuple(v)


def _patterns(key: str, v: Any) -> tuple[str, ...]:
    for i, pattern in enumerate(_words(key, v)):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{key}[{i}]", pattern, f"a regular expression ({e})") from None
    return tuple(v)


_TIER_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "name": lambda k, v: _string(k, v, check=lambda s: s.replace("-", "").replace("_", "").isalnum(),
                                 expected="a name of letters, digits, '-' and '_'"),
    "model": lambda k, v: _string(k, v),
    "max_prompt_tokens": _count,
    "max_tokens": _count,
    "tools": _bool,
    "json_schema": _bool,
    "images": _bool,
    "keywords": _words,
    "patterns": _patterns,
}
_LIMITS = ("max_prompt_tokens", "max_tokens", "keywords", "patterns")


def _tier_alias(name: str, raw: Any) -> TierAlias:
    key = f'tiers."{name}"'
    raw = dict(_table(raw, key))
    preset = raw.pop("preset", None)
    renames = raw.pop("models", {})
    if preset is not None:
        from proxy.routing.tiers import PRESETS  # the shipped rule sets

        if preset not in PRESETS:
            raise ConfigError(f"{key}.preset", preset, f"one of {', '.join(PRESETS)}")
        if "tiers" in raw:
            raise ConfigError(f"{key}.tiers", raw["tiers"], "no tiers when a preset is named")
        raw["tiers"] = [dict(t) for t in PRESETS[preset]]
    values = _fields(raw, key, {"tiers": lambda k, v: v, "encoding": lambda k, v: _string(k, v),
                                "budget_floor_usd": lambda k, v: _number(k, v, minimum=0)})
    tiers = values.pop("tiers", None)
    if not isinstance(tiers, list) or len(tiers) < 2:
        raise ConfigError(f"{key}.tiers", tiers, "a list of at least two tiers ({name=..., model=...})")
    renames = _table(renames, f"{key}.models")
    parsed = []
    for i, t in enumerate(tiers):
        tkey = f"{key}.tiers[{i}]"
        fields = _fields(_table(t, tkey), tkey, _TIER_SPEC)
        for required in ("name", "model"):
            if required not in fields:
                raise ConfigError(f"{tkey}.{required}", None, "a value (this key is required)")
        if fields["name"] in renames:
            fields["model"] = _string(f"{key}.models.{fields['name']}", renames[fields["name"]])
        parsed.append(Tier(**fields))
    names = [t.name for t in parsed]
    for tier_name in renames:
        if tier_name not in names:
            raise ConfigError(f"{key}.models.{tier_name}", renames[tier_name], f"a tier name ({', '.join(names)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}.tiers", names, "tiers with different names")
    last = parsed[-1]
    if any(getattr(last, f) for f in _LIMITS) or not (last.tools and last.json_schema and last.images):
        raise ConfigError(f"{key}.tiers[{len(parsed) - 1}]", last.name,
                          "a last tier without limits (it takes whatever the others did not)")
    return TierAlias(name=name, tiers=tuple(parsed), **values)


def _tiers(raw: Any) -> dict[str, TierAlias]:
    return {name: _tier_alias(name, alias) for name, alias in _table(raw, "tiers").items()}


# -- [model_info."<model or glob>"] (prices, context windows, encodings) --

_MODEL_INFO_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "input_usd_per_mtok": lambda k, v: _number(k, v, minimum=0),
    "output_usd_per_mtok": lambda k, v: _number(k, v, minimum=0),
    "cached_input_usd_per_mtok": lambda k, v: _number(k, v, minimum=0),
    "cache_write_usd_per_mtok": lambda k, v: _number(k, v, minimum=0),
    "context_window": lambda k, v: _number(k, v, minimum=16, integer=True),
    "max_output_tokens": _count,
    "encoding": lambda k, v: _string(k, v, check=lambda s: s in MODEL_ENCODINGS,
                                     expected=" or ".join(f'"{e}"' for e in MODEL_ENCODINGS)),
    "token_margin": lambda k, v: _number(k, v, minimum=1),
}


def _model_info(raw: Any) -> tuple[ModelInfoConfig, ...]:
    out = []
    for pattern, entry in _table(raw, "model_info").items():
        key = f'model_info."{pattern}"'
        values = _fields(_table(entry, key), key, _MODEL_INFO_SPEC)
        window, cap = values.get("context_window"), values.get("max_output_tokens")
        if window is not None and cap is not None and cap >= window:
            raise ConfigError(f"{key}.max_output_tokens", cap, f"less than context_window ({window})")
        out.append(ModelInfoConfig(pattern=pattern, **values))
    return tuple(out)


# Top-level tables and their parsers, beyond the core ones parsed in parse_config.
_SECTIONS: dict[str, Callable[[Any], Any]] = {"state": _state, "metrics": _metrics, "cache": _cache,
                                              "tiers": _tiers}
_SECTIONS.update(budgets=_budgets, teams=_teams)
_SECTIONS.update(slo=_slo)
_SECTIONS.update(model_info=_model_info)
_SECTIONS.update(tracing=_tracing)


def parse_config(raw: dict[str, Any]) -> Config:
    _known(raw, "", {"server", "auth", "router", "providers", "models", *_SECTIONS})
    server = ServerConfig(**_fields(_table(raw.get("server", {}), "server"), "server", _SERVER_SPEC))
    if (server.certfile is None) != (server.keyfile is None):
        raise ConfigError("server.certfile", server.certfile, "certfile and keyfile set together")
    auth_raw = _table(raw.get("auth", {}), "auth")
    auth = AuthConfig(**_fields(auth_raw, "auth", {"master_key_env": _env_name, "master_key_traffic": _bool}))
    providers = {name: _provider(name, p)
                 for name, p in _table(raw.get("providers", {}), "providers").items()}
    models = tuple(_model(name, m, providers)
                   for name, m in _table(raw.get("models", {}), "models").items())
    if not models:
        raise ConfigError("models", {}, "at least one [models.NAME] table")
    router = RouterConfig(**_fields(_table(raw.get("router", {}), "router"), "router", _ROUTER_SPEC))
    sections = {name: parse(raw[name]) for name, parse in _SECTIONS.items() if name in raw}
    config = Config(server=server, auth=auth, router=router, providers=providers, models=models, **sections)
    _check_references(models, config)
    for name, to in config.budgets.downgrade.items():
        if config.route(to) is None:
            raise ConfigError(f"budgets.downgrade.{name}", to, "a model name defined under [models]")
    return config


def with_server_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Command-line overrides of [server] keys (--host, --port, --workers), checked like the file's."""
    checked = {k: _SERVER_SPEC[k](f"--{k}", v) for k, v in overrides.items()}
    return replace(config, server=replace(config.server, **checked))


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError("--config", path, f"a readable TOML file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", path, f"valid TOML ({e})") from None
    return parse_config(raw)


def check_environment(config: Config, environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Fail at start when a provider's key variable is named but not set."""
    for p in config.providers.values():
        if p.api_key_env is not None and not environ.get(p.api_key_env):
            raise ConfigError(f"providers.{p.name}.api_key_env", p.api_key_env,
                              "the name of an environment variable that is set")
