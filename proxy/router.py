"""Model name -> deployment: exact names first, then globs in file order, then weighted choice.

Round-1 routing is deliberately small: one pick per request, weight-proportional. Retries,
priorities, fallbacks and breakers build on `pick` without changing its contract.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .config import Config, Deployment, ModelRoute
from .errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Target:
    deployment: Deployment
    model: str  # the name sent upstream


class Router:
    def __init__(self, config: Config, rng: random.Random | None = None):
        self._config = config
        self._rng = rng or random.Random()

    def check_model(self, model: str) -> ModelRoute:
        route = self._config.route(model)
        if route is None:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                                param="model")
        return route

    def pick(self, model: str) -> Target:
        route = self.check_model(model)
        candidates = [d for d in route.deployments if d.weight > 0]
        deployment = self._rng.choices(candidates, weights=[d.weight for d in candidates])[0]
        return Target(deployment, deployment.model or model)

    def model_names(self) -> list[str]:
        """Names a client can list: the exact (non-glob) model names, in file order."""
        return [r.name for r in self._config.models if not r.is_glob]
