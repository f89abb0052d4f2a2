"""A sweep: one run per load step (each with its own warm-up and cool-down), and the knee.

Rules:
- Steps run in the order given, each a full `loadtest.runner.run` on a quiet target: the
  previous step's requests finished (or were cut) before the next one starts.
- `--sweep auto`: open-loop rates starting at `--rate` (default 1/s), doubling each step, until a
  step is saturated. At most `AUTO_MAX_STEPS` steps. Then one step halfway between the last
  sustained rate and the saturated one narrows the knee.
- Saturated: over 10 % of the step's requests failed or did not finish, or (open loop) the target
  delivered under `SATURATED` (90 %) of the offered rate, delivered meaning completions/s between
  the first and the last completion (`delivered_rps`: long answers do not look like saturation).
  Sweep steps wait for in-flight requests by default (`cooldown` = the request timeout), so a
  saturated step's queue drains at the rate the target can serve.
- The knee: open loop, the highest offered rate sustained below the first saturated step; closed
  loop, the first concurrency after which more concurrency adds under 10 % of requests/s. None
  when no step saturated ("not reached") or the first one already did.
- A fail-fast stop (`loadtest.guard`) ends the sweep: no further step runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .runner import RunResult, run
from .settings import RunSettings, Shape

SATURATED = 0.9
UNFINISHED = 0.1
GAIN = 1.1
AUTO_MAX_STEPS = 12

EXIT_OK, EXIT_NOTHING_OK, EXIT_USAGE, EXIT_SLO, EXIT_STOPPED = 0, 1, 2, 3, 4


@dataclass
class Sweep:
    steps: list[RunResult] = field(default_factory=list)
    knee: dict[str, Any] | None = None
    knee_note: str = ""

    @property
    def stopped(self) -> str | None:
        return next((r.stopped for r in self.steps if r.stopped), None)


def saturated(result: RunResult) -> bool:
    s = result.summary
    if s.requests == 0 or s.ok < (1 - UNFINISHED) * s.requests:
        return True
    rate = s.load.get("rate")
    return rate is not None and (s.delivered_rps or 0.0) < SATURATED * rate


def knee(steps: list[RunResult]) -> tuple[dict[str, Any] | None, str]:
    if not steps:
        return None, "no step ran"
    ordered = sorted(steps, key=lambda r: next(iter(r.summary.load.values()), 0))
    if "rate" in ordered[0].summary.load:
        sustained = None
        for r in ordered:
            if saturated(r):
                if sustained is None:
                    return None, "saturated at the lowest rate"
                return _point(sustained), "highest rate sustained before saturation"
            sustained = r
        return None, "not reached: every rate was sustained"
    for r, nxt in zip(ordered, ordered[1:]):
        if nxt.summary.requests_per_s < GAIN * r.summary.requests_per_s:
            return _point(r), "more concurrency added under 10 % requests/s"
    return None, "not reached: throughput still grew at the highest concurrency"


def _point(r: RunResult) -> dict[str, Any]:
    s = r.summary
    return {**s.load, "requests_per_s": s.requests_per_s, "delivered_rps": s.delivered_rps,
            "output_tokens_per_s": s.output_tokens_per_s,
            "ttft_p50_ms": s.ttft_ms["p50"], "goodput_rps": s.goodput_rps}


Runner = Callable[[RunSettings, int | None], Awaitable[RunResult]]


async def _default_runner(settings: RunSettings, seed: int | None) -> RunResult:
    return await run(settings, seed=seed)


async def sweep(settings: RunSettings, shapes: list[Shape] | None, *, seed: int | None = None,
                auto_start: float = 1.0, on_step: Callable[[RunResult], None] | None = None,
                runner: Runner = _default_runner) -> Sweep:
    """`shapes` in order, or None for an automatic rate sweep from `auto_start` (the settings'
    shape gives everything but the rate)."""
    out = Sweep()

    async def step(shape: Shape) -> RunResult:
        step_seed = None if seed is None else seed + len(out.steps)
        result = await runner(dataclasses.replace(settings, shape=shape), step_seed)
        out.steps.append(result)
        if on_step is not None:
            on_step(result)
        return result

    if shapes is not None:
        for shape in shapes:
            if (await step(shape)).stopped:
                break
    else:
        base = dataclasses.replace(settings.shape, concurrency=None)
        rate, last_ok = auto_start, None
        for _ in range(AUTO_MAX_STEPS):
            result = await step(dataclasses.replace(base, rate=rate))
            if result.stopped:
                break
            if saturated(result):
                if last_ok is not None and rate / last_ok > 1.2:
                    middle = round((last_ok + rate) / 2, 3)
                    mid = await step(dataclasses.replace(base, rate=middle))
                    out.steps.sort(key=lambda r: r.summary.load["rate"])
                    if mid.stopped:
                        break
                break
            last_ok, rate = rate, rate * 2
    out.knee, out.knee_note = knee(out.steps)
    return out


def exit_code(result: Sweep, min_attainment: float | None) -> int:
    """0 fine; 1 a step where nothing succeeded; 3 a step short of --min-attainment; 4 stopped
    early (fail fast). 2 (bad arguments) comes from the argument parser before any run."""
    if result.stopped:
        return EXIT_STOPPED
    if any(r.summary.ok == 0 for r in result.steps):
        return EXIT_NOTHING_OK
    if min_attainment is not None and any(
            (r.summary.slo_attainment or 0.0) < min_attainment for r in result.steps):
        return EXIT_SLO
    return EXIT_OK
