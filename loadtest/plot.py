"""`--plot PATH`: one PNG of a run: the TTFT CDF, and the target's RSS with open streams over time.

matplotlib is imported here only (an optional dependency, in the `test` extra), with the
non-interactive Agg backend: no display needed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import RunResult


def plot_run(result: "RunResult", path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import origin

    open_loop = result.settings.shape.open_loop
    ttft = sorted((s.first_token - origin(s, open_loop)) * 1000 for s in result.samples
                  if not math.isnan(s.first_token))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if ttft:
        left.plot(ttft, [i / len(ttft) for i in range(len(ttft))])
    left.set(title="TTFT CDF", xlabel="TTFT ms", ylabel="fraction of requests")
    left.grid(True, alpha=0.3)
    t0 = result.started_at
    if result.memory:
        t = [m.at - t0 for m in result.memory]
        right.plot(t, [m.rss_kb / 1024 for m in result.memory], color="tab:blue", label="target RSS MB")
        right.set(xlabel="seconds", ylabel="target RSS MB", title="target RSS and open streams")
        streams = right.twinx()
        streams.plot(t, [m.open_streams for m in result.memory], color="tab:orange", label="open streams")
        streams.set_ylabel("open streams")
    else:
        # No --target-pid: open streams from the request timelines instead.
        events = sorted([(s.sent - t0, 1) for s in result.samples if not math.isnan(s.sent)] +
                        [(s.ended - t0, -1) for s in result.samples if not math.isnan(s.sent)])
        level, xs, ys = 0, [], []
        for at, step in events:
            level += step
            xs.append(at)
            ys.append(level)
        right.step(xs, ys, where="post")
        right.set(xlabel="seconds", ylabel="open streams", title="open streams (no --target-pid)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
