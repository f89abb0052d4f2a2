"""Observability: Prometheus metrics, structured logs with request ids, SLOs, the live dashboard
and (optional) OpenTelemetry traces.

Everything here watches the gateway from the per-request seam (`proxy.server.exchange`): one
`settle(x)` per request, nothing per token. `install(gateway)` registers the policies and routes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.server.app import Gateway

log = logging.getLogger("proxy.observability")


def install(gateway: "Gateway") -> None:
    """Metrics, SLOs and the dashboard, each as its config says (app.py calls this once)."""
    from proxy.observability.dashboard import Dashboard
    from proxy.observability.metrics import Metrics
    from proxy.observability.slo import SLOs

    config = gateway.config
    metrics = Metrics(config, gateway.router, gateway.streams) if config.metrics.enabled else None
    slos = SLOs(config) if config.slo.enabled else None
    for policy in (metrics, slos):
        if policy is not None:
            gateway.policies.add(policy, gateway.policies.METRICS)
            policy.routes(gateway)
    Dashboard(gateway, metrics, slos).routes(gateway)
    if config.tracing.enabled:  # off by default: then the OpenTelemetry SDK is not even imported
        from proxy.observability.tracing import Tracing

        tracing = Tracing(config)
        gateway.policies.add(tracing, gateway.policies.METRICS - 1)
        gateway.on_shutdown.append(tracing.aclose)
        log.info("traces: OTLP to %s, sample ratio %g", config.tracing.endpoint, config.tracing.sample_ratio)
    deployments = len(gateway.router.states)
    log.info("config loaded: %d providers, %d models, %d deployments; /metrics %s; SLOs %s",
             len(config.providers), len(config.models), deployments,
             "off" if metrics is None else "behind the master key" if config.metrics.require_key else "open",
             "off" if slos is None else "kept in " + slos.store.path if slos.store else "kept in memory")
    if gateway.router.bypass:
        log.warning("router bypass ON at start (BYPASS_ROUTER): no retries, fallbacks or breakers")
