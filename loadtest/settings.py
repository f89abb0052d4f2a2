"""What one load test run is asked to do, parsed once into frozen, validated records.

`Target` says where and what to send, `Shape` how many and when, `Behaviour` how each client
reads. A bad value fails at construction with the field, the value and what was expected, before
any socket is opened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .apis import ANTHROPIC, OPENAI

if TYPE_CHECKING:
    from .prompts import PromptSet
    from .slo import SLO


class SettingsError(ValueError):
    pass


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{name} = {value!r}: expected {expected}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    base_path: bytes  # e.g. b"/v1"

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        parts = urlsplit(url)
        _check(parts.scheme == "http" and bool(parts.hostname), "url", url,
               "an http:// base URL ending in /v1 (TLS is not supported)")
        return cls(parts.hostname, parts.port or 80, parts.path.rstrip("/").encode())


@dataclass(frozen=True, kw_only=True)
class Target:
    urls: tuple[str, ...]  # several: requests go round-robin (e.g. one per gateway process)
    model: str = "gpt-4o-mini"
    api: str = OPENAI
    api_key: str | None = None
    prompt: str = "Hello"
    max_tokens: int | None = None
    stream: bool = True
    extra_headers: tuple[tuple[str, str], ...] = ()
    prompts: "PromptSet | None" = None  # several prompts / a dataset; None: `prompt`, `max_tokens`
    tokenizer: str | None = None  # loadtest.tokens.TOKENIZERS; None: by the model's name
    stream_usage: bool = False  # OpenAI streams: ask for the usage chunk (stream_options)
    endpoints: tuple[Endpoint, ...] = field(init=False)

    def __post_init__(self) -> None:
        from .tokens import TOKENIZERS, default_tokenizer

        _check(len(self.urls) > 0, "url", self.urls, "at least one URL")
        _check(self.api in (OPENAI, ANTHROPIC), "api", self.api, "openai or anthropic")
        _check(self.max_tokens is None or self.max_tokens > 0, "max_tokens", self.max_tokens, "> 0")
        if self.tokenizer is None:
            object.__setattr__(self, "tokenizer", default_tokenizer(self.model))
        _check(self.tokenizer in TOKENIZERS, "tokenizer", self.tokenizer, " or ".join(TOKENIZERS))
        object.__setattr__(self, "endpoints", tuple(Endpoint.parse(u) for u in self.urls))


@dataclass(frozen=True, kw_only=True)
class Shape:
    """Closed loop (`concurrency` clients back to back) or open loop (`rate` arrivals per second)."""

    concurrency: int | None = None
    rate: float | None = None
    poisson: bool = False  # open loop: exponential gaps instead of constant ones
    requests: int | None = None  # stop after this many started requests...
    duration: float | None = None  # ...or after this many seconds (in-flight requests are cut)
    ramp_up: float = 0.0  # closed loop: clients start evenly over this; open loop: rate ramps
    max_in_flight: int = 20_000  # open loop: arrivals beyond this fail as "client_limit"
    new_connection: bool = False  # closed loop: a fresh connection per request (else keep-alive)
    timeout: float = 300.0  # per request, from its start to its end
    warmup: float = 0.0  # seconds of load first whose requests are not measured
    cooldown: float = 0.0  # after the measured window: seconds in-flight requests may still finish

    def __post_init__(self) -> None:
        _check((self.concurrency is None) != (self.rate is None), "concurrency/rate",
               (self.concurrency, self.rate), "exactly one of --concurrency or --rate")
        _check(self.concurrency is None or self.concurrency > 0, "concurrency", self.concurrency, "> 0")
        _check(self.rate is None or (self.rate > 0 and math.isfinite(self.rate)), "rate", self.rate, "> 0")
        _check(self.requests is not None or self.duration is not None, "requests/duration",
               (self.requests, self.duration), "--requests or --duration (or both)")
        _check(self.requests is None or self.requests > 0, "requests", self.requests, "> 0")
        _check(self.duration is None or self.duration > 0, "duration", self.duration, "> 0")
        _check(self.ramp_up >= 0, "ramp_up", self.ramp_up, ">= 0")
        _check(self.max_in_flight > 0, "max_in_flight", self.max_in_flight, "> 0")
        _check(self.timeout > 0, "timeout", self.timeout, "> 0")
        _check(self.warmup >= 0 and math.isfinite(self.warmup), "warmup", self.warmup, ">= 0")
        _check(self.cooldown >= 0 and math.isfinite(self.cooldown), "cooldown", self.cooldown, ">= 0")

    @property
    def load(self) -> dict[str, Any]:
        """What this shape offers: the x of a sweep's charts."""
        return {"concurrency": self.concurrency} if self.rate is None else {"rate": self.rate}

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


@dataclass(frozen=True, kw_only=True)
class Behaviour:
    read_rate: float | None = None  # bytes/s: a slow reader
    stall_after: int | None = None  # SSE events, then stop reading and hold the socket...
    hold: float = 30.0  # ...for this long (or until the run ends)
    abort_after: int | None = None  # SSE events, then close the connection

    def __post_init__(self) -> None:
        _check(self.read_rate is None or self.read_rate > 0, "read_rate", self.read_rate, "> 0")
        _check(self.stall_after is None or self.stall_after >= 0, "stall_after", self.stall_after, ">= 0")
        _check(self.abort_after is None or self.abort_after >= 0, "abort_after", self.abort_after, ">= 0")
        _check(self.hold >= 0, "hold", self.hold, ">= 0")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    target_pids: tuple[int, ...] = ()  # RSS/CPU of these processes and their children
    interval: float = 0.1  # seconds between samples
    idle_wait: float = 0.3  # seconds of samples before the load starts: the idle RSS

    def __post_init__(self) -> None:
        _check(self.interval > 0, "interval", self.interval, "> 0")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    target: Target
    shape: Shape
    behaviour: Behaviour = Behaviour()
    sampling: Sampling = Sampling()
    progress: bool = True
    slo: "SLO | None" = None
    stop_on_error_rate: float | None = None  # stop once this share of >= 20 responses failed

    def __post_init__(self) -> None:
        rate = self.stop_on_error_rate
        _check(rate is None or 0 < rate <= 1, "stop_on_error_rate", rate, "a share in (0, 1]")
