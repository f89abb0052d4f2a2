"""One request on its way through the gateway, and the per-request policies that see it.

Keys, limits, budgets, the response cache, cost tiers and metrics are *policies*: they sit beside
routing, never inside the relay. Each one is called twice per request and never per token:

    admit(x, request)   before any provider is paid. It may refuse (raise a GatewayError: 401,
                        403, 429, 400 context_length_exceeded ...), rewrite the request (a tier's
                        model), add response headers (x-ratelimit-*, x-gateway-cache), or answer
                        from elsewhere (x.answer: a cache hit; x.stale: served if every provider
                        fails).
    settle(x)           once at the end, whatever happened (served, refused, failed, cut, client
                        gone): spend, limits released, cache written, metrics observed. It must
                        not raise and must not block (hand I/O to a task or a thread).

Policies run in the order the gateway lists them; `settle` runs for every policy, in the same
order (accounting settles the cost before metrics read it), also for requests refused before a
policy's `admit` ran (metrics count those): a policy finds its own state in `x.notes` or nothing.
The one thing a policy may do per upstream read is a *tap* (x.taps): it sees the canonical chunks
of a stream as they are relayed (the cache records a stream this way). Taps cost a call per read,
so a policy adds one only for the requests it needs it for.
"""

from __future__ import annotations

import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol

from proxy.core.errors import GatewayError
from proxy.core.events import Chunk
from proxy.core.usage import Usage
from proxy.routing.failover import Served

log = logging.getLogger("proxy.server.exchange")

Emit = Callable[[list[Chunk]], Awaitable[None]]
Tap = Callable[[list[Chunk]], None]

# The request id of the request this task serves; the log formatter reads it (every log line of a
# request carries its id). Set once per request by the app.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

MAX_REQUEST_ID = 128
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/+=")


def request_id(given: bytes | None) -> str:
    """The client's x-request-id if it is sane (≤ 128 chars of [A-Za-z0-9-_.:/+=]), else a new one."""
    if given and len(given) <= MAX_REQUEST_ID and _ID_CHARS.issuperset(given):
        return given.decode("ascii")
    return "req_" + os.urandom(12).hex()


@dataclass(slots=True)
class Principal:
    """Who is calling. kind: "master" (the master key), "key" (a virtual key), "open" (no auth)."""

    kind: str
    key_id: str | None = None
    team: str | None = None
    record: Any = None  # the virtual key's record, for the policies that need its limits


OPEN = Principal("open")
MASTER = Principal("master")


class Answer(Protocol):
    """An answer that does not come from a provider (a cache entry): streamed or whole."""

    async def stream(self, emit: Emit) -> None: ...

    def completion(self) -> dict[str, Any]: ...


@dataclass(slots=True, eq=False)
class Exchange:
    request_id: str
    path: str
    principal: Principal
    started: float                  # time.perf_counter() at arrival
    endpoint: str = "-"             # "chat", "messages", "embeddings", "admin", ...
    headers: Mapping[bytes, bytes] = field(default_factory=dict)  # the request's (lower-case names)
    model: str = "-"                # the model the client asked for (before any tier rewrite)
    stream: bool = False
    # Sent on every response of this request, errors included (x-request-id first).
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    served: Served | None = None
    usage: Usage | None = None
    status: int = 200
    outcome: str = "-"              # "ok", "error", "client_disconnected", the relay's outcomes ...
    error: GatewayError | None = None
    first_token_at: float | None = None  # perf_counter when the first visible chunk was relayed
    answer: Answer | None = None    # set by a policy's admit: serve this, call no provider
    stale: Answer | None = None     # served when every provider failed (stale-if-error)
    cache: str | None = None        # "hit" | "miss" | "stale" (x-gateway-cache), None = no cache
    cost_usd: float | None = None   # set by accounting in settle; $0 for answers not from a provider
    taps: list[Tap] = field(default_factory=list)
    completion: dict[str, Any] | None = None  # the canonical completion of a plain answer
    notes: dict[str, Any] = field(default_factory=dict)  # per-policy state, keyed by policy name
    settled: bool = False


class Policy(Protocol):
    async def admit(self, x: Exchange, request: Any) -> None: ...

    def settle(self, x: Exchange) -> None: ...


class Policies:
    """The gateway's policies, in order; empty = nothing per request beyond routing."""

    # The order: cost tiers rewrite the model first, keys then check, limit and reserve on the
    # routed model, the cache answers before any provider, metrics observe everything last.
    TIERS, KEYS, CACHE, METRICS = 10, 20, 30, 90

    def __init__(self) -> None:
        self.list: list[Policy] = []
        self._order: list[tuple[int, int]] = []

    def add(self, policy: Policy, order: int = 50) -> None:
        self._order.append((order, len(self._order)))
        ranked = sorted(zip(self._order, self.list + [policy]), key=lambda pair: pair[0])
        self._order = [rank for rank, _ in ranked]
        self.list = [p for _, p in ranked]

    async def admit(self, x: Exchange, request: Any) -> None:
        for policy in self.list:
            await policy.admit(x, request)

    def settle(self, x: Exchange) -> None:
        """Once per request (a second call does nothing): the endpoint settles before its log line,
        the app settles what ended before or outside an endpoint (refused, not found, failed)."""
        if x.settled:
            return
        x.settled = True
        for policy in self.list:
            try:
                policy.settle(x)
            except Exception:  # one policy's bug must not lose the others' settlement
                log.exception("settle failed in %s", type(policy).__name__)
