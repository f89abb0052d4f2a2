"""Model name -> the deployment to try next: priorities, weights, breakers, admission control.

Rules:
- Exact model names win over globs; otherwise the first matching glob in file order (config).
- Among a model's deployments, the lowest `priority` number with an available deployment not yet
  tried in this request is used; within it the pick is weight-proportional. A deployment is
  available when its breaker allows it (`proxy/routing/breaker.py`).
- State (breaker, in-flight limiter, counters) is per deployment *name*, shared by every model
  that lists it: one upstream, one health.
- Admission: a deployment with `max_concurrency` admits at most that many requests; a request
  waits at most `queue_timeout` for a slot, then gets `Saturated` (the retry loop moves on, and
  the client gets 429 with Retry-After if nothing else can serve). Nothing queues without bound.
- Bypass (`BYPASS_ROUTER=true`, or POST /admin/bypass): every request goes to its model's first
  deployment, once: no retries, no fallbacks, no breaker — the rollback if the router misbehaves.

The retry loop that drives this lives in `proxy/routing/failover.py`.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Collection, Mapping

import trio

from proxy.routing.breaker import Breaker, BreakerSettings
from proxy.config import Config, Deployment, ModelRoute
from proxy.core.errors import InvalidRequest, ModelNotFound, clip
from proxy.core.errors import RequestTimeout, Saturated

TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(eq=False)
class DeploymentState:
    deployment: Deployment
    breaker: Breaker
    limiter: trio.CapacityLimiter | None
    in_flight: int = 0  # admitted and not yet released, whether or not max_concurrency is set
    requests: int = 0
    successes: int = 0
    failures: int = 0
    last_error: str | None = field(default=None)

    @property
    def name(self) -> str:
        return self.deployment.name

    def snapshot(self, now: float) -> dict:
        return {
            "name": self.name,
            "provider": self.deployment.provider,
            "model": self.deployment.model or "*",
            "weight": self.deployment.weight,
            "priority": self.deployment.priority,
            "in_flight": self.in_flight,
            "max_concurrency": self.deployment.max_concurrency,
            "requests": self.requests,
            "successes": self.successes,
            "failures": self.failures,
            "last_error": self.last_error,
            **self.breaker.snapshot(now),
        }


class Router:
    def __init__(self, config: Config, rng: random.Random | None = None,
                 environ: Mapping[str, str] = os.environ):
        self._config = config
        self.settings = config.router
        self.rng = rng or random.Random()
        self.bypass = environ.get("BYPASS_ROUTER", "").strip().lower() in TRUE
        r = config.router
        breaker = BreakerSettings(failures=r.breaker_failures, cooldown=r.breaker_cooldown,
                                  failure_rate=r.breaker_failure_rate, window=r.breaker_window,
                                  min_requests=r.breaker_min_requests)
        self.states: dict[str, DeploymentState] = {}
        for route in config.models:
            for d in route.deployments:
                if d.name not in self.states:
                    limiter = trio.CapacityLimiter(d.max_concurrency) if d.max_concurrency else None
                    self.states[d.name] = DeploymentState(d, Breaker(breaker, d.name), limiter)

    def check_model(self, model: str) -> ModelRoute:
        route = self._config.route(model)
        if route is None:
            raise ModelNotFound(f"The model '{clip(model)}' does not exist or you do not have access to it.",
                                param="model")
        return route

    def model_names(self) -> list[str]:
        """Names a client can list: the exact (non-glob) model names, in file order."""
        return [r.name for r in self._config.models if not r.is_glob]

    def ttft_timeout(self, route: ModelRoute, deployment: Deployment) -> float | None:
        for value in (deployment.ttft_timeout, route.ttft_timeout, self.settings.ttft_timeout):
            if value is not None:
                return value
        return None

    def choose(self, route: ModelRoute, now: float, *, excluded: Collection[str], tried: Collection[str]
               ) -> DeploymentState | None:
        """The next deployment to try, or None when the model has nothing available.

        A priority group counts as exhausted for this request once each of its available
        deployments has been tried: a retry then moves to the next priority (primary, then
        secondary). Only when every group is exhausted does a retry go back to one already tried.
        """
        groups = []
        for priority in sorted({d.priority for d in route.deployments}):
            group = [self.states[d.name] for d in route.deployments
                     if d.priority == priority and d.weight > 0 and d.name not in excluded
                     and self.states[d.name].breaker.available(now)]
            if group:
                groups.append(group)
        for group in groups:
            if fresh := [s for s in group if s.name not in tried]:
                return self._weighted(fresh)
        return self._weighted(groups[0]) if groups else None

    def _weighted(self, pool: list[DeploymentState]) -> DeploymentState:
        return self.rng.choices(pool, weights=[s.deployment.weight for s in pool])[0]

    def unavailable_for(self, routes: list[ModelRoute], now: float) -> tuple[float | None, bool]:
        """Seconds until some deployment may be tried again, and whether all are merely cooling
        (provider Retry-After) rather than open breakers."""
        waits, cooling_only = [], True
        for route in routes:
            for d in route.deployments:
                b = self.states[d.name].breaker
                if b.opened_at is not None:
                    waits.append(b.opened_at + self.settings.breaker_cooldown - now)
                    cooling_only = False
                if b.cooling_until > now:
                    waits.append(b.cooling_until - now)
        return (max(0.0, min(waits)) if waits else None), cooling_only

    def pinned(self, route: ModelRoute, requested: str | None) -> DeploymentState | None:
        """The one deployment a pinned model, or an allowed request header, asks for."""
        name = route.pin
        if requested and route.allow_deployment_header:
            name = requested
        if name is None:
            return None
        for d in route.deployments:
            if d.name == name:
                return self.states[name]
        raise InvalidRequest(f"model '{route.name}' has no deployment named '{clip(name)}' "
                             f"(x-gateway-deployment); it has: {', '.join(d.name for d in route.deployments)}",
                             param="x-gateway-deployment")

    async def admit(self, state: DeploymentState, deadline: float = math.inf) -> None:
        """Take a slot of the deployment's max_concurrency, waiting at most queue_timeout and never
        past `deadline` (the request's own: then RequestTimeout)."""
        if state.limiter is None:
            state.in_flight += 1
            return
        with trio.CancelScope(deadline=min(trio.current_time() + self.settings.queue_timeout, deadline)):
            await state.limiter.acquire()
            state.in_flight += 1
            return
        if trio.current_time() >= deadline:
            raise RequestTimeout(f"request_timeout ran out waiting for deployment {state.name}")
        raise Saturated(f"deployment {state.name} is at its max_concurrency "
                        f"({state.deployment.max_concurrency}); retry shortly")

    def release(self, state: DeploymentState) -> None:
        state.in_flight -= 1
        if state.limiter is not None:
            state.limiter.release()

    def snapshot(self, now: float) -> dict:
        return {
            "bypass": self.bypass,
            "deployments": [s.snapshot(now) for s in self.states.values()],
            "models": [{"name": r.name, "deployments": [d.name for d in r.deployments],
                        "fallbacks": list(r.fallbacks), "context_window_fallback": r.context_window_fallback,
                        "pin": r.pin} for r in self._config.models],
        }
