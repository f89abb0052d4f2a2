"""GET /dashboard: one self-contained page (no CDN, no build) kept live by GET /dashboard/events.

Rules:
- The page and its events need the master key when one is set (Bearer, or `?key=` which the page
  takes out of the address bar and keeps in memory for the events and the bypass switch; query
  strings are never logged). Without a master key (the demo) they are open, like every endpoint.
- Events: one JSON snapshot a second (SSE), built once a second for every viewer from the whole
  server's metrics (all workers), the SLO report and this worker's router. At most MAX_VIEWERS
  event streams per worker (more get 503); each ends when its client leaves or the gateway drains.
- TTFT p50/p95 and the request rate are over the last WINDOW seconds (snapshots kept: WINDOW + 1).
"""

from __future__ import annotations

import collections
import math
import time
from typing import TYPE_CHECKING, Any

import orjson
import trio

from proxy.core.errors import AuthenticationFailed, Saturated
from proxy.observability.exposition import STEP, Merged, Steps, parse_key
from proxy.observability.metrics import stepped
from proxy.observability.page import PAGE
from proxy.server.exchange import Exchange

if TYPE_CHECKING:
    from proxy.observability.metrics import Metrics
    from proxy.observability.slo import SLOs
    from proxy.server.app import Gateway

MAX_VIEWERS = 16
WINDOW = 60       # seconds of history for rates and TTFT quantiles
MAX_ROWS = 50     # rows per table (models, deployments, keys): the busiest
BREAKER = {0: "closed", 1: "half_open", 2: "open"}


def quantile(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """histogram_quantile's linear interpolation within the bucket that holds the q-th observation."""
    total = cumulative[-1] if cumulative else 0
    if not total:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative):
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def summarize(merged: Merged) -> Steps:
    """Per model, deployment and key totals, and TTFT buckets per model, from the merged metrics
    (in steps, like a scrape: about STEP samples between checkpoints)."""
    models: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    deployments: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    keys: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    ttft: dict[str, dict[float, float]] = collections.defaultdict(dict)
    open_streams = 0.0

    def samples(name: str):
        entry = merged.get(name)
        return () if entry is None else ((*parse_key(key), value) for key, value in entry[2].items())

    def add(name: str, labels: dict[str, str], value: float) -> None:
        nonlocal open_streams
        if name == "gateway_requests_total":
            if labels.get("endpoint", "-") == "-":
                return
            row = models[labels["model"]]
            row["requests"] += value
            status = int(labels["status"])
            if status >= 500 or (status < 400 and labels["outcome"] == "error"):
                row["errors"] += value
            elif status >= 400:
                row["refused"] += value
        elif name == "gateway_tokens_total":
            models[labels["model"]]["tokens_" + labels["direction"]] += value
        elif name == "gateway_cost_usd_total":
            models[labels["model"]]["cost_usd"] += value
        elif name == "gateway_ttft_seconds_bucket":
            le = labels["le"]
            ttft[labels["model"]][math.inf if le == "+Inf" else float(le)] = value
        elif name == "gateway_upstream_attempts_total":
            row = deployments[labels["deployment"]]
            row["attempts"] += value
            if labels["outcome"] not in ("ok", "cancelled"):
                row["failures"] += value
        elif name == "gateway_breaker_state":
            deployments[labels["deployment"]]["breaker"] = value
        elif name == "gateway_key_requests_total":
            keys[(labels["key"], labels["team"])]["requests"] += value
        elif name == "gateway_key_cost_usd_total":
            keys[(labels["key"], labels["team"])]["cost_usd"] += value
        elif name == "gateway_open_streams":
            open_streams += value

    n = 0
    for family in ("gateway_requests", "gateway_tokens", "gateway_cost_usd", "gateway_ttft_seconds",
                   "gateway_upstream_attempts", "gateway_breaker_state", "gateway_key_requests",
                   "gateway_key_cost_usd", "gateway_open_streams"):
        for name, labels, value in samples(family):
            n += 1
            if n % STEP == 0:
                yield
            add(name, labels, value)
    return {"models": models, "deployments": deployments, "keys": keys, "ttft": ttft, "open_streams": open_streams}


class Dashboard:
    def __init__(self, gateway: "Gateway", metrics: "Metrics | None", slos: "SLOs | None"):
        self._gateway = gateway
        self._metrics = metrics
        self._slos = slos
        self._viewers = 0
        self._history: collections.deque[tuple[float, dict[str, Any]]] = collections.deque(maxlen=WINDOW + 1)
        self._snapshot: bytes = b""
        self._snapshot_at = -math.inf
        self._lock = trio.Lock()

    def routes(self, gateway: "Gateway") -> None:
        from proxy.server.app import Route

        gateway.add_route("/dashboard", Route({"GET": self._page}, auth="none", body=False))
        gateway.add_route("/dashboard/events", Route({"GET": self._events}, auth="none", body=False))

    def _check(self, x: Exchange, headers: dict[bytes, bytes], query: bytes) -> None:
        if not self._gateway.auth_enabled:
            return
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and self._gateway.is_master_key(token.strip()):
            return
        for part in query.split(b"&"):
            name, _, value = part.partition(b"=")
            if name == b"key" and self._gateway.is_master_key(_unquote(value)):
                return
        raise AuthenticationFailed("the dashboard needs the master key: open /dashboard?key=<master key>")

    async def _page(self, x: Exchange, body: bytes, headers: dict[bytes, bytes], receive: Any, send: Any) -> None:
        self._check(x, headers, _query(x))
        data = PAGE.encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
            (b"content-security-policy", b"default-src 'self'; style-src 'unsafe-inline'; "
                                         b"script-src 'unsafe-inline'; img-src 'self' data:")]
            + x.response_headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _events(self, x: Exchange, body: bytes, headers: dict[bytes, bytes], receive: Any, send: Any) -> None:
        self._check(x, headers, _query(x))
        if self._viewers >= MAX_VIEWERS:
            raise Saturated(f"at most {MAX_VIEWERS} dashboard viewers per worker")
        self._viewers += 1
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")] + x.response_headers})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                while not self._gateway.draining:
                    data = await self.snapshot()
                    await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})
                    await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
            x.outcome = "ok"
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._viewers -= 1

    async def snapshot(self) -> bytes:
        """The JSON every viewer gets this second (built once a second, whoever asks)."""
        async with self._lock:
            now = time.monotonic()
            if now - self._snapshot_at >= 0.9:
                self._snapshot = orjson.dumps(await self._build(now))
                self._snapshot_at = now
            return self._snapshot

    async def _build(self, now: float) -> dict[str, Any]:
        gateway = self._gateway
        router = gateway.router
        summary = await stepped(summarize(await self._metrics.collect())) if self._metrics is not None else None
        out: dict[str, Any] = {"time": time.time(), "bypass": router.bypass, "open_streams": len(gateway.streams),
                               "metrics": summary is not None, "window_s": WINDOW,
                               "slo": await self._slos.report() if self._slos is not None else None}
        breaker_states = {name: state.breaker.state for name, state in router.states.items()}
        if summary is None:
            out["deployments"] = [{"name": n, "breaker": s} for n, s in list(breaker_states.items())[:MAX_ROWS]]
            return out
        self._history.append((now, summary))
        old_at, old = self._history[0]
        span = max(now - old_at, 1e-9)
        out["open_streams"] = summary["open_streams"]
        total = sum(m["requests"] for m in summary["models"].values())
        total_old = sum(m["requests"] for m in old["models"].values())
        out["requests_total"] = total
        out["requests_per_s"] = round((total - total_old) / span, 2) if old is not summary else 0.0
        errors = sum(m["errors"] for m in summary["models"].values())
        out["errors_per_s"] = round((errors - sum(m["errors"] for m in old["models"].values())) / span, 2) \
            if old is not summary else 0.0
        models = []
        for name, row in summary["models"].items():
            buckets = summary["ttft"].get(name, {})
            previous = old["ttft"].get(name, {})
            bounds = sorted(buckets)
            recent = [buckets[b] - previous.get(b, 0.0) for b in bounds]
            use = recent if recent and recent[-1] > 0 else [buckets[b] for b in bounds]
            p50, p95 = quantile(0.5, bounds, use), quantile(0.95, bounds, use)
            before = old["models"].get(name, {})
            models.append({"model": name, "requests": row["requests"], "errors": row["errors"],
                           "refused": row["refused"],
                           "per_s": round((row["requests"] - before.get("requests", 0.0)) / span, 2),
                           "ttft_p50_ms": None if p50 is None else round(p50 * 1000, 1),
                           "ttft_p95_ms": None if p95 is None else round(p95 * 1000, 1),
                           "tokens_in": row["tokens_input"], "tokens_out": row["tokens_output"],
                           "cost_usd": round(row["cost_usd"], 6)})
        models.sort(key=lambda m: -m["requests"])
        out["models"] = models[:MAX_ROWS]
        deployments = []
        for name, row in summary["deployments"].items():
            state = BREAKER.get(int(row.get("breaker", 0)), "closed")
            deployments.append({"name": name, "breaker": state, "attempts": row["attempts"],
                                "failures": row["failures"]})
        deployments.sort(key=lambda d: (d["breaker"] == "closed", -d["failures"], -d["attempts"]))
        out["deployments"] = deployments[:MAX_ROWS]
        keys = [{"key": k, "team": t, "requests": row["requests"], "cost_usd": round(row["cost_usd"], 6)}
                for (k, t), row in summary["keys"].items()]
        keys.sort(key=lambda k: -k["cost_usd"])
        out["keys"] = keys[:MAX_ROWS]
        out["spend_usd"] = round(sum(m["cost_usd"] for m in summary["models"].values()), 6)
        return out


async def _until_disconnect(receive: Any, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _query(x: Exchange) -> bytes:
    return x.notes.get("query", b"")


def _unquote(value: bytes) -> bytes:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(value.replace(b"+", b" "))
