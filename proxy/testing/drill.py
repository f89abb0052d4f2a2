"""`python -m proxy drill`: revoke the primary provider's key under load and watch the SLO.

Default: two fake providers and a gateway in this process, model `gpt-4o` split 9:1 between
`primary` and `secondary` (the canonical setup). With `--config`, the gateway comes from that file
and the drill targets `--model` (default: the first exact model name); its first deployment is
the primary.

Timeline (fractions of --duration): load starts; at 1/3 the primary's key is revoked; at 2/3 it
is restored. Revocation: a built-in fake provider answers 401 from then on; with `--config`, the
gateway's own key for that provider is swapped for a bogus one, so a real provider refuses it the
way it would refuse a revoked key. The report gives, per phase, requests, success rate and
p50/p95 latency, the time from revocation until the primary's breaker opened (failover), and from
restoration until the primary served again (recovery); the exit code is 0 only if every phase
held the SLO (default 99.5 % success, p95 <= 2.5 s) and both failover and recovery were seen
within the run (a recovery the run was too short to see is a failed drill, not a held SLO).
Quiet: only the report, unless -v (the gateway's log lines, one per request).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import orjson
import trio

from proxy.server.app import Gateway
from proxy.config import Config, ConfigError, load_config, parse_config
from proxy.testing.fake import FakeProvider, FakeSettings
from proxy.formats import make_adapter
from proxy.server.serve import serve

PHASES = ("before", "during", "after")


@dataclass
class Sample:
    started: float
    latency: float
    ok: bool
    deployment: str
    phase: str


@dataclass
class Timeline:
    start: float = 0.0
    revoked_at: float | None = None
    restored_at: float | None = None
    breaker_opened_at: float | None = None
    primary_back_at: float | None = None

    def phase(self, started: float, done: float) -> str:
        """"during" holds only requests whose whole life fell between the revocation taking effect
        and the restoration beginning: one that started before the restoration but reached the
        provider after it may well be served by the primary (that made the config-mode test flaky)."""
        if self.revoked_at is None or started < self.revoked_at:
            return "before"
        if self.restored_at is None or done < self.restored_at:
            return "during"
        return "after"


@dataclass
class Drill:
    gateway: Gateway
    url: str
    model: str
    primary: str           # deployment name
    revoke: Any            # async () -> None
    restore: Any           # async () -> None
    concurrency: int
    duration: float
    samples: list[Sample] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)

    async def run(self) -> None:
        self.timeline.start = trio.current_time()
        end = self.timeline.start + self.duration
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=self._auth()) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._script, end)
                nursery.start_soon(self._watch_breaker, end)
                for _ in range(self.concurrency):
                    nursery.start_soon(self._worker, client, end)

    def _auth(self) -> dict[str, str]:
        key = self.gateway._master_key
        return {"authorization": f"Bearer {key}"} if key else {}

    async def _script(self, end: float) -> None:
        t0 = self.timeline.start
        # "during" holds only requests that started while the key was surely revoked: it begins
        # once the revocation took effect and ends as the restoration begins. (Stamped after the
        # restore, a half-open probe sent in between was counted "during" though the primary
        # served it — with a 1 s cooldown the probe often lands right at that boundary.)
        await trio.sleep_until(t0 + self.duration / 3)
        await self.revoke()
        self.timeline.revoked_at = trio.current_time()
        await trio.sleep_until(t0 + 2 * self.duration / 3)
        self.timeline.restored_at = trio.current_time()
        await self.restore()

    async def _watch_breaker(self, end: float) -> None:
        state = self.gateway.router.states[self.primary]
        while trio.current_time() < end:
            if self.timeline.revoked_at is not None and self.timeline.breaker_opened_at is None \
                    and state.breaker.state == "open":
                self.timeline.breaker_opened_at = trio.current_time()
            await trio.sleep(0.005)

    async def _worker(self, client: httpx.AsyncClient, end: float) -> None:
        body = orjson.dumps({"model": self.model, "stream": True,
                             "messages": [{"role": "user", "content": "drill"}]})
        while (started := trio.current_time()) < end:
            ok, deployment = False, "-"
            try:
                async with client.stream("POST", self.url + "/v1/chat/completions", content=body,
                                         headers={"content-type": "application/json"}) as response:
                    data = await response.aread()
                    deployment = response.headers.get("x-gateway-deployment", "-")
                    ok = response.status_code == 200 and data.rstrip().endswith(b"data: [DONE]")
            except httpx.HTTPError:
                pass
            done = trio.current_time()
            if ok and deployment == self.primary and self.timeline.restored_at is not None \
                    and started >= self.timeline.restored_at and self.timeline.primary_back_at is None:
                self.timeline.primary_back_at = done
            self.samples.append(Sample(started, done - started, ok, deployment,
                                       self.timeline.phase(started, done)))
            if not ok:
                await trio.sleep(0.01)  # a failing gateway must not turn the drill into a busy loop


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def report(drill: Drill, slo_success: float, slo_p95: float) -> dict[str, Any]:
    t = drill.timeline
    phases = {}
    held = True
    for phase in PHASES:
        samples = [s for s in drill.samples if s.phase == phase]
        ok = sum(s.ok for s in samples)
        rate = 100.0 * ok / len(samples) if samples else 0.0
        p95 = _pct([s.latency for s in samples], 0.95)
        phase_held = bool(samples) and rate >= slo_success and p95 is not None and p95 <= slo_p95
        held &= phase_held
        phases[phase] = {
            "requests": len(samples), "ok": ok, "success_pct": round(rate, 3),
            "p50_s": _round(_pct([s.latency for s in samples], 0.5)), "p95_s": _round(p95),
            "served_by": {d: sum(s.deployment == d for s in samples) for d in
                          sorted({s.deployment for s in samples})},
            "slo_held": phase_held,
        }
    failover = None if t.breaker_opened_at is None or t.revoked_at is None \
        else t.breaker_opened_at - t.revoked_at
    recovery = None if t.primary_back_at is None or t.restored_at is None \
        else t.primary_back_at - t.restored_at
    return {
        "model": drill.model, "primary": drill.primary, "duration_s": drill.duration,
        "concurrency": drill.concurrency,
        "slo": {"success_pct": slo_success, "p95_s": slo_p95,
                "held": held and failover is not None and recovery is not None},
        "phases": phases,
        "failover_s": _round(failover),
        "recovery_s": _round(recovery),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"drill: model {r['model']}, primary {r['primary']}, {r['duration_s']} s, "
             f"{r['concurrency']} concurrent streams; key revoked at 1/3, restored at 2/3",
             "",
             "| phase | requests | success | p50 | p95 | served by | SLO |",
             "|---|---|---|---|---|---|---|"]
    for name, p in r["phases"].items():
        served = ", ".join(f"{d} {n}" for d, n in p["served_by"].items())
        lines.append(f"| {name} | {p['requests']} | {p['success_pct']:.2f} % | {_ms(p['p50_s'])} | "
                     f"{_ms(p['p95_s'])} | {served} | {'held' if p['slo_held'] else 'MISSED'} |")
    unseen = "NOT OBSERVED within the run"
    lines += ["",
              "time to fail over (revocation -> primary breaker open): "
              f"{unseen if r['failover_s'] is None else _ms(r['failover_s'])}",
              "time to recover (restoration -> primary serving again): "
              f"{unseen if r['recovery_s'] is None else _ms(r['recovery_s'])}"]
    if r["recovery_s"] is None:
        lines.append("the primary did not serve again before the run ended: run longer than "
                     "3 x (breaker_cooldown + a few requests), or check the restoration")
    lines.append(f"SLO ({r['slo']['success_pct']} % success, p95 <= {r['slo']['p95_s']} s, failover "
                 f"and recovery seen): {'HELD' if r['slo']['held'] else 'MISSED'}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


async def _revocation(gateway: Gateway, provider: Any) -> tuple[Any, Any]:
    """How to revoke the primary's key from the outside.

    Our fake provider has a control for it (`POST /_fake/control {"revoke_key": true}`); any
    other provider gets a bogus key from the gateway instead, which it refuses as it would refuse
    a revoked key."""
    root = provider.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            probe = await client.post(root + "/_fake/control", json={"reset": True})
            is_fake = probe.status_code == 200
        except httpx.HTTPError:
            is_fake = False
    if is_fake:
        async def control(**settings: Any) -> None:
            async with httpx.AsyncClient(timeout=5) as client:
                (await client.post(root + "/_fake/control", json=settings)).raise_for_status()

        return (lambda: control(revoke_key=True)), (lambda: control(reset=True))
    original = gateway.adapters[provider.name]
    bogus = make_adapter(provider, "sk-drill-revoked-key")

    async def swap(adapter: Any) -> None:
        gateway.adapters[provider.name] = adapter

    return (lambda: swap(bogus)), (lambda: swap(original))


def default_config(primary_port: int, secondary_port: int, cooldown: float) -> Config:
    return parse_config({
        "server": {"port": 0},
        "auth": {"master_key_env": "PROXY_DRILL_NO_KEY"},
        "router": {"breaker_cooldown": cooldown, "backoff_initial": 0.05, "backoff_max": 0.5},
        "providers": {
            "primary": {"kind": "openai", "base_url": f"http://127.0.0.1:{primary_port}/v1"},
            "secondary": {"kind": "openai", "base_url": f"http://127.0.0.1:{secondary_port}/v1"},
        },
        "models": {"gpt-4o": {"deployments": [{"provider": "primary", "weight": 9},
                                              {"provider": "secondary", "weight": 1}]}},
    })


async def run_drill(args: argparse.Namespace) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        if args.config:
            config = load_config(args.config)
            gateway = Gateway(config)
            model = args.model or next(r.name for r in config.models if not r.is_glob)
            route = gateway.router.check_model(model)
            primary = route.deployments[0]
            provider = config.providers[primary.provider]
            revoke, restore = await _revocation(gateway, provider)
        else:
            settings = FakeSettings(ttft=0.05, itl=0.01, tokens=10)
            fakes = [FakeProvider(settings) for _ in range(2)]
            ports = [await nursery.start(partial(f.serve, "127.0.0.1", 0)) for f in fakes]
            config = default_config(*ports, cooldown=args.cooldown)
            gateway = Gateway(config, environ={})
            model, primary = "gpt-4o", gateway.router.check_model("gpt-4o").deployments[0]

            async def revoke() -> None:
                fakes[0].settings = dataclasses.replace(settings, status=401)

            async def restore() -> None:
                fakes[0].settings = settings
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, port=0,
                                                                        host="127.0.0.1"))
        binds = await nursery.start(partial(serve, config, gateway, shutdown_trigger=trio.sleep_forever))
        drill = Drill(gateway, binds[0], model, primary.name, revoke, restore,
                      concurrency=args.concurrency, duration=args.duration)
        await drill.run()
        nursery.cancel_scope.cancel()
    return report(drill, args.slo_success, args.slo_p95)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy drill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent streams (default 20)")
    parser.add_argument("--config", help="run the gateway from this config instead of built-in fakes")
    parser.add_argument("--model", help="with --config: the model to drill (default: first exact name)")
    parser.add_argument("--cooldown", type=float, default=2.0,
                        help="built-in setup: breaker_cooldown in seconds (default 2)")
    parser.add_argument("--slo-success", type=float, default=99.5, help="percent (default 99.5)")
    parser.add_argument("--slo-p95", type=float, default=2.5, help="seconds (default 2.5)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the gateway's log (one line per request) before the report")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1:
        parser.error("--duration must be > 0 and --concurrency >= 1")
    if not args.verbose:
        # Thousands of requests, each logged, buried the report; errors still show.
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    try:
        result = trio.run(run_drill, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0 if result["slo"]["held"] else 1
