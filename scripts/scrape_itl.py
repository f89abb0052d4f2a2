"""Do scrapes stall streams? N open streams through a gateway with 100 models x 10 deployments
(every series populated), measured by loadtest without scrapes and then with GET /metrics every
250 ms.

    .venv/bin/python scripts/scrape_itl.py [--streams 2000] [--itl 1.0] [--tokens 30]

The provider's max_concurrency is raised to 5,000 (its default, 1,000, would queue half of 2,000
streams). Prints loadtest's TTFT/ITL percentiles for both runs and the scrape times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
import metrics_bench as mb  # noqa: E402 - the 1,000-deployment config and process starter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--itl", type=float, default=1.0, help="seconds between a stream's tokens")
    parser.add_argument("--tokens", type=int, default=30)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores (shared), load average {os.getloadavg()[0]:.1f} at start")
    fake, line = mb.start([sys.executable, "-m", "proxy", "fake-provider", "--port", "0"])
    port = int(line.rsplit(":", 1)[1].split()[0].split("/")[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.toml")
        with open(path, "w") as f:
            f.write('[server]\nport = 0\n[auth]\nmaster_key_env = "UNSET_FOR_BENCH"\n[providers.fake]\n'
                    f'kind = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\nmax_concurrency = 5000\n')
            for name, model in mb.big_config(port)["models"].items():
                deployments = ", ".join(f'{{ provider = "fake", name = "{d["name"]}", model = "{d["model"]}" }}'
                                        for d in model["deployments"])
                f.write(f'[models."{name}"]\nallow_deployment_header = true\ndeployments = [{deployments}]\n')
        gateway, line = mb.start([sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--config", path])
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        try:
            with httpx.Client(timeout=60) as client:  # every deployment once: the series of a busy day
                for m in range(mb.MODELS):
                    for d in range(mb.DEPLOYMENTS):
                        client.post(url + "/v1/chat/completions", headers={"x-gateway-deployment": f"d{m}-{d}"},
                                    json={"model": f"model-{m}", "messages": [{"role": "user", "content": "hi"}]})
                print(f"scrape: {len(client.get(url + '/metrics').content):,} bytes")
            print("\n| run | TTFT p50 / p99 ms | ITL p50 / p99 / max ms | scrapes: n, median / max ms |\n|---|---|---|---|")
            for scraping in (False, True):
                out = os.path.join(tmp, f"run-{scraping}.json")
                load = subprocess.Popen(
                    [sys.executable, "-m", "loadtest", "--url", url + "/v1", "--model", "model-1", "--prompt",
                     f'fake: {{"tokens": {args.tokens}, "itl": {args.itl}, "ttft": 0.1}}',
                     "--concurrency", str(args.streams), "--requests", str(args.streams), "--json", out],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                scrapes: list[float] = []
                if scraping:
                    time.sleep(min(8.0, args.tokens * args.itl / 3))  # the streams are open
                    with httpx.Client(timeout=60) as client:
                        while load.poll() is None and len(scrapes) < 60:
                            started = time.perf_counter()
                            client.get(url + "/metrics")
                            scrapes.append((time.perf_counter() - started) * 1000)
                            time.sleep(0.25)
                load.wait()
                with open(out) as f:
                    result = json.load(f)
                step = result["steps"][0] if "steps" in result else result
                ttft, itl = step["ttft_ms"], step["itl_ms"]
                print(f"| {args.streams} streams, {'scrape every 250 ms' if scraping else 'no scrape'} "
                      f"({step['ok']} ok) | {ttft['p50']:.0f} / {ttft['p99']:.0f} | "
                      f"{itl['p50']:.0f} / {itl['p99']:.0f} / {itl['max']:.0f} | "
                      + (f"{len(scrapes)}, {statistics.median(scrapes):.1f} / {max(scrapes):.1f}" if scrapes else "—")
                      + " |")
        finally:
            gateway.terminate()
            gateway.wait()
            fake.terminate()
            fake.wait()


if __name__ == "__main__":
    main()
