"""Service-level objectives per request, and goodput: the requests/s that met them.

Rules:
- `--slo ttft_ms=500,itl_ms=50,e2e_ms=10000`, any subset. A request meets the SLO when it ended
  "ok" and each bound given holds for that request: its TTFT, its mean inter-token gap
  ((last token - first token) / (tokens - 1); a one-token answer has no gap and passes), its
  end-to-end time, all from the run's latency origin (see `loadtest.stats`).
- Attainment is over the step's measured requests (warm-up excluded); requests cut by the end of
  a --duration run count as not meeting it (they did not finish in time). Goodput is the
  requests meeting it divided by the step's duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .client import Sample
from .settings import SettingsError

KEYS = ("ttft_ms", "itl_ms", "e2e_ms")


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> "SLO":
        expected = f"KEY=MS pairs separated by commas, keys {', '.join(KEYS)} (e.g. ttft_ms=500,itl_ms=50)"
        bounds: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            key = key.strip()
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not sep or key not in KEYS or not (number > 0 and math.isfinite(number)) or key in bounds:
                raise SettingsError(f"slo = {text!r}: {part.strip()!r}: expected {expected}")
            bounds[key] = number
        return cls(**bounds)

    def to_json(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KEYS if getattr(self, k) is not None}

    def __str__(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.to_json().items())

    def met(self, s: Sample, origin: float) -> bool:
        if s.outcome != "ok":
            return False
        if self.ttft_ms is not None and not (s.first_token - origin) * 1000 <= self.ttft_ms:
            return False  # NaN (no token) fails too
        if self.itl_ms is not None and s.tokens > 1:
            if (s.last_token - s.first_token) / (s.tokens - 1) * 1000 > self.itl_ms:
                return False
        if self.e2e_ms is not None and (s.ended - origin) * 1000 > self.e2e_ms:
            return False
        return True
