"""Failover: one canonical request to providers, with retries, failover and a TTFT deadline.

The seam between endpoints (which speak a client format: OpenAI chat, Anthropic messages) and
everything behind them. Endpoints hand over a `ChatRequest` and get canonical chunks through
`emit` (streaming) or a canonical completion; `Served` says who answered (logs, headers).

The loop (rules in `policy.py`, selection in `router.py`):
    for the model, then each of its fallbacks:
        pick a deployment (priority, weight, breaker), admit it (max_concurrency), attempt;
        RETRY errors back off (full jitter, or the provider's Retry-After up to
        retry_after_max; a longer one fails over at once) up to `retries` times, then the next
        model; UNUSABLE (401/403) opens the breaker and moves on; FATAL goes to the client.
    all of it inside `request_timeout`: a deadline handed to every wait (admission, backoff) and
    to the attempt, whose upstream timer carries it (no cancel scope held here for as long as a
    stream lasts); when it runs out, 504 upstream_timeout naming it.
A stream is *committed* once its first token is handed to the client: until then chunks are held
back (only the role chunk, a few bytes) so a failover stays invisible; after, there is no silent
switch — a failure ends the stream with an error event, as the relay does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import trio

from proxy.core.errors import GatewayError, NoHealthyDeployment, RequestTimeout, clip
from proxy.core.events import Chunk
from proxy.core.request import ChatRequest
from proxy.formats import ProviderAdapter
from proxy.routing.policy import Action, backoff, classify, retry_after_seconds
from proxy.routing.router import DeploymentState, Router
from proxy.transport.upstream import Upstream

Emit = Callable[[list[Chunk]], Awaitable[None]]
T = TypeVar("T")
# attempt(state, model_name, ttft_timeout, deadline): one try; `deadline` is the request's own.
Attempt = Callable[[DeploymentState, str, float | None, float], Awaitable[T]]


@dataclass(slots=True)
class Served:
    requested: str | None = None  # the x-gateway-deployment request header, if any
    provider: str = "-"
    model: str = "-"
    deployment: str = "-"
    attempts: int = 0
    fallback: bool = False
    committed: bool = False       # the first token went to the client: no more failover
    # Every attempt as (deployment, outcome, started, ended): outcome "ok", the error's code or
    # type, or "cancelled"; started/ended are time.perf_counter() (admission wait included).
    # Read after the request (metrics, traces); the failover loop itself never looks at it.
    tried: list[tuple[str, str, float, float]] = field(default_factory=list)
    # Seconds spent waiting for a deployment's max_concurrency slot (None: no attempt had one).
    queue_wait: float | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-gateway-deployment", self.deployment.encode()),
                (b"x-gateway-attempts", str(self.attempts).encode()),
                (b"x-gateway-fallback", b"true" if self.fallback else b"false")]


class Failover:
    """Calls providers for the endpoints under the routing rules: the router decides where, the
    upstream carries the bytes, the adapters translate. Nothing else of the server is reached."""

    def __init__(self, router: Router, upstream: Upstream, adapters: Mapping[str, ProviderAdapter],
                 max_event_bytes: int):
        self.router = router
        self.upstream = upstream
        self.adapters = adapters
        self.max_event_bytes = max_event_bytes

    def stream(self, request: ChatRequest, emit: Emit, served: Served) -> Awaitable[None]:
        """Stream the answer as canonical chunks into `emit`; raise GatewayError on failure.
        Returns the failover loop's coroutine to await (no frame of its own for the stream's life)."""
        return self.run(request.model, served, _StreamAttempt(self, request, emit, served))


    async def complete(self, request: ChatRequest, served: Served) -> dict[str, Any]:
        """The whole answer as a canonical (OpenAI chat.completion) dict; raise GatewayError on failure."""

        async def attempt(state: DeploymentState, model: str, ttft: float | None,
                          deadline: float) -> dict[str, Any]:
            adapter = self.adapters[state.deployment.provider]
            raw = await self.upstream.request(adapter, adapter.chat_request(request, model), deadline=deadline)
            return adapter.parse_completion(raw, request)

        return await self.run(request.model, served, attempt)


    async def embeddings(self, body: dict[str, Any], served: Served) -> dict[str, Any]:
        """An embeddings request (already validated) in OpenAI's list shape."""

        async def attempt(state: DeploymentState, model: str, ttft: float | None,
                          deadline: float) -> dict[str, Any]:
            adapter = self.adapters[state.deployment.provider]
            wire = adapter.embeddings_request(body, model)  # 400 for a kind without embeddings
            return adapter.parse_embeddings(await self.upstream.request(adapter, wire, deadline=deadline))

        return await self.run(body["model"], served, attempt)

    def run(self, model: str, served: Served, attempt: Attempt[T]) -> Awaitable[T]:
        """Any call to `model`'s deployments under the routing rules: `attempt(state, model_name,
        ttft_timeout, deadline)` makes one try; this decides which deployments, how often, and
        when, all within `request_timeout` (bypassed and pinned requests too).
        Returns the coroutine to await: it picks one, and keeps no frame of its own while a
        stream runs (each frame of the await chain lives as long as the stream)."""
        router = self.router
        route = router.check_model(model)
        pinned = router.pinned(route, served.requested)
        deadline = trio.current_time() + router.settings.request_timeout
        if router.bypass:  # straight to the first deployment: nothing of the router in the way
            state = router.states[route.deployments[0].name]
            return self._once(model, served, state, route, attempt, deadline, gate=False, track=False)
        if pinned is not None:  # latency-critical: one deployment, one attempt, health still recorded
            return self._once(model, served, pinned, route, attempt, deadline, gate=False)
        return self._with_failover(model, served, route, attempt, deadline)


    async def _with_failover(self, requested: str, served: Served, route: Any,
                             attempt: Attempt[T], deadline: float) -> T:
        router = self.router
        settings = router.settings
        # No cancel scope here: the deadline goes to every wait (admission, backoff, the attempt's
        # upstream timer), so this frame holds none for as long as a stream lasts.
        models = [route] + [router.check_model(name) for name in route.fallbacks]
        last_error: GatewayError | None = None
        index = 0
        while index < len(models):
            group = models[index]
            # Deployment names; lists, not sets: a few names at most, and these live as long
            # as a stream does (an empty set is 216 bytes).
            excluded: list[str] = []
            tried: list[str] = []
            retries = 0
            while (state := router.choose(group, trio.current_time(), excluded=excluded, tried=tried)) is not None:
                tried.append(state.name)
                served.fallback = index > 0
                try:
                    return await self._once(requested, served, state, group, attempt, deadline)
                except GatewayError as error:
                    if served.committed or isinstance(error, RequestTimeout):
                        raise
                    last_error = error
                    action = classify(error)
                    if action is Action.FATAL:
                        raise
                    if action is Action.CONTEXT:
                        if not group.context_window_fallback:
                            raise
                        models[index + 1:index + 1] = [router.check_model(group.context_window_fallback)]
                        break
                    if action in (Action.UNUSABLE, Action.SKIP):
                        excluded.append(state.name)
                        continue
                    if retries >= settings.retries:
                        break  # this model's retries are spent: its fallbacks next
                    wait = retry_after_seconds(error)
                    if wait is not None and wait > settings.retry_after_max:
                        state.breaker.cool(trio.current_time(), wait)  # fail over instead of waiting
                        excluded.append(state.name)
                        continue
                    retries += 1
                    if action is Action.RETRY:
                        if wait is None:
                            wait = backoff(retries - 1, settings.backoff_initial, settings.backoff_max, router.rng)
                        await trio.sleep_until(min(trio.current_time() + wait, deadline))
                        if trio.current_time() >= deadline:
                            raise self._timed_out(served) from None
            index += 1
        if last_error is not None:
            raise last_error
        wait, cooling_only = router.unavailable_for(models, trio.current_time())
        # The model the client asked for, not the route's glob: "gpt-4o", not "*".
        raise NoHealthyDeployment(f"no deployment of model '{clip(requested)}' (or its fallbacks) is available: "
                                  + ("rate limited by the provider" if cooling_only else "circuit breakers open"),
                                  retry_after=wait, rate_limited=cooling_only)

    def _timed_out(self, served: Served) -> RequestTimeout:
        return RequestTimeout(f"request_timeout of {self.router.settings.request_timeout} s exceeded "
                              f"after {served.attempts} attempts")


    async def _once(self, requested: str, served: Served, state: DeploymentState,
                    route: Any, attempt: Attempt[T], deadline: float, *, gate: bool = True,
                    track: bool = True) -> T:
        """One attempt on one deployment, with admission control and breaker bookkeeping.

        gate: the breaker may refuse (half-open admits one probe); track: outcomes feed the breaker.
        The request's own deadline running out is no verdict on the deployment (RequestTimeout).
        """
        router = self.router
        model = state.deployment.model or requested
        served.attempts += 1
        served.provider, served.model, served.deployment = state.deployment.provider, model, state.name
        started = waited_from = time.perf_counter()
        try:
            await router.admit(state, deadline)
        except RequestTimeout:
            raise self._timed_out(served) from None
        finally:
            if state.limiter is not None:  # how long the wait was is a metric (gateway_queue_wait_seconds)
                served.queue_wait = (served.queue_wait or 0.0) + time.perf_counter() - waited_from
        state.requests += 1
        if gate and not state.breaker.acquire(trio.current_time()):
            router.release(state)
            raise NoHealthyDeployment(f"deployment {state.name} is not available (circuit open)")
        outcome = False
        try:
            result = await attempt(state, model, router.ttft_timeout(route, state.deployment), deadline)
            outcome = True
            served.tried.append((state.name, "ok", started, time.perf_counter()))
            state.successes += 1
            if track:
                state.breaker.success(trio.current_time())
            return result
        except RequestTimeout:
            outcome = True
            served.tried.append((state.name, RequestTimeout.code, started, time.perf_counter()))
            if track:
                state.breaker.release()
            raise self._timed_out(served) from None
        except GatewayError as error:
            outcome = True
            served.tried.append((state.name, error.code or error.type, started, time.perf_counter()))
            state.failures += 1
            state.last_error = f"{error.code or error.type}: {error.message}"[:300]
            action = classify(error)
            if track and action in (Action.RETRY, Action.FAILOVER, Action.UNUSABLE):
                state.breaker.failure(trio.current_time(), fatal=action is Action.UNUSABLE,
                                      reason=state.last_error)
            elif track:
                state.breaker.release()
            raise
        finally:
            if not outcome:
                served.tried.append((state.name, "cancelled", started, time.perf_counter()))
                if track:
                    state.breaker.release()  # cancelled (client left): no verdict on the deployment
            router.release(state)


class _StreamAttempt:
    """`Failover.stream`'s attempt: one try on one deployment, its chunks into `emit`. An object with
    slots rather than a closure, whose function, cells and closure tuple would live as long as
    the stream (~0.5 KB of every held stream)."""

    __slots__ = ("_failover", "_request", "_emit", "_served")

    def __init__(self, failover: Failover, request: ChatRequest, emit: Emit, served: Served):
        self._failover, self._request, self._emit, self._served = failover, request, emit, served

    async def __call__(self, state: DeploymentState, model: str, ttft: float | None, deadline: float) -> None:
        failover, request, emit = self._failover, self._request, self._emit
        adapter = failover.adapters[state.deployment.provider]
        # The TTFT deadline covers connecting, the response headers and the wait for the first
        # token — and nothing after. It shares the upstream's one timer (no scope of our own),
        # as the request's own deadline does.
        # The wire request is no local of this frame: the upstream drops it once sent, and it
        # is not kept (body bytes, headers) for as long as the stream lasts.
        async with failover.upstream.stream(adapter, adapter.chat_request(request, model),
                                            ttft_deadline=trio.current_time() + ttft if ttft else math.inf,
                                            deadline=deadline) as body:
            parser = adapter.stream_parser(failover.max_event_bytes, request)
            held: list[Chunk] = []
            ended = False
            while not ended and not any(chunk.visible for chunk in held):
                data = await body.next()
                ended = not data
                held += parser.close() if ended else parser.feed(data)
                del data  # parsed: not kept while the next read waits (a held stream's whole wait)
                if parser.failed is not None:
                    raise parser.failed
            self._served.committed = True  # chunks are held back until here: failover stays invisible
            body.first_output()
            if held:
                await emit(held)
            del held
            data = b"" if ended else b"-"
            while data:
                data = await body.next()
                chunks = parser.feed(data) if data else parser.close()
                if chunks:
                    await emit(chunks)
                if parser.failed is not None:
                    raise parser.failed
