"""`python -m loadtest.bench.external [--install] [--runs N]`: loadtest next to aiperf, same truth.

Both load testers, alternately (so both see the same machine), measure one fake provider in its
own process whose TTFT (200 ms) and inter-token gap (10 ms) are known: 100 streams back to back,
300 requests of 5 tokens. Printed: each tool's TTFT and ITL p50/p99 and its CPU seconds for the
run (user + system, children included: aiperf runs several processes and most of its CPU is
start-up, so the CPU column compares whole runs, not events).

aiperf 0.13 runs offline here with a local tokenizer directory (`--tokenizer DIR`; a hub name or
`builtin` tries to download): `--install` puts aiperf in its own venv under .cache/peers/aiperf
and trains a small byte-level BPE tokenizer into .cache/peers/tokenizer (seconds, no download).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AIPERF_PIP = ["aiperf==0.13.0"]
TRUTH_TTFT_MS, TRUTH_ITL_MS = 200.0, 10.0
TOKENIZER_SCRIPT = """
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
import sys
text = " The quick brown fox jumps over the lazy dog. Hello alpha delta echo golf hotel india"
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([text] * 200, trainers.BpeTrainer(
    vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                        eos_token="</s>").save_pretrained(sys.argv[1])
"""


def aiperf_bin(cache: Path) -> Path:
    return cache / "aiperf" / "venv" / "bin" / "aiperf"


def install(cache: Path) -> str | None:
    """None on success, else why not."""
    venv = cache / "aiperf" / "venv"
    try:
        if not aiperf_bin(cache).exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *AIPERF_PIP], check=True,
                           capture_output=True, timeout=1800)
        subprocess.run([str(venv / "bin" / "python"), "-c", TOKENIZER_SCRIPT, str(cache / "tokenizer")],
                       check=True, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return f"aiperf install failed: {exc}"
    return None


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(argv: list[str]) -> tuple[float, float]:
    cpu, wall = _children_cpu(), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return _children_cpu() - cpu, time.perf_counter() - wall


def run_loadtest(base: str, out: Path) -> dict:
    cpu, wall = _timed([sys.executable, "-m", "loadtest", "--url", base + "/v1", "--model", "gpt-4o",
                        "--concurrency", "100", "--requests", "300", "--ramp-up", "0.5", "--quiet",
                        "--json", str(out)])
    d = json.loads(out.read_text())
    return {"tool": "loadtest", "ttft_p50": d["ttft_ms"]["p50"], "ttft_p99": d["ttft_ms"]["p99"],
            "itl_p50": d["itl_ms"]["p50"], "itl_p99": d["itl_ms"]["p99"], "cpu_s": cpu, "wall_s": wall}


def run_aiperf(cache: Path, base: str, out: Path) -> dict:
    cpu, wall = _timed([str(aiperf_bin(cache)), "profile", "--model", "gpt-4o", "--url", base,
                        "--endpoint-type", "chat", "--streaming", "--concurrency", "100",
                        "--request-count", "300", "--concurrency-ramp-duration", "0.5",
                        "--tokenizer", str(cache / "tokenizer"), "--ui-type", "none",
                        "--artifact-dir", str(out), "--synthetic-input-tokens-mean", "10"])
    d = json.loads((out / "profile_export_aiperf.json").read_text())
    t, i = d["time_to_first_token"], d["inter_token_latency"]
    return {"tool": "aiperf 0.13", "ttft_p50": t["p50"], "ttft_p99": t["p99"], "itl_p50": i["p50"],
            "itl_p99": i["p99"], "cpu_s": cpu, "wall_s": wall}


def markdown(rows: list[dict]) -> str:
    lines = ["| run | tool | TTFT p50 ms (truth 200) | TTFT p99 ms | ITL p50 ms (truth 10) | ITL p99 ms "
             "| CPU s per run | wall s | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['tool']} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                     f"{r['itl_p50']:.2f} | {r['itl_p99']:.2f} | {r['cpu_s']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['load']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.external", description=__doc__.split("\n")[0])
    p.add_argument("--install", action="store_true", help="install aiperf and the tokenizer first")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cache", default=".cache/peers")
    args = p.parse_args(argv)
    cache = Path(args.cache).resolve()
    if args.install and (problem := install(cache)):
        print(problem, file=sys.stderr)
        return 1
    if not aiperf_bin(cache).exists() or not (cache / "tokenizer").exists():
        print(f"aiperf is not installed under {cache}: run with --install", file=sys.stderr)
        return 1
    provider = subprocess.Popen([sys.executable, "-m", "proxy", "fake-provider", "--port", "0", "--ttft",
                                 str(TRUTH_TTFT_MS / 1000), "--itl", str(TRUTH_ITL_MS / 1000), "--tokens", "5"],
                                stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        base = "http://" + provider.stdout.readline().split("http://", 1)[1].strip().removesuffix("/v1")
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(1, args.runs + 1):
                for tool in ("loadtest", "aiperf"):
                    load = os.getloadavg()[0]
                    row = (run_loadtest(base, Path(tmp) / f"lt{n}.json") if tool == "loadtest"
                           else run_aiperf(cache, base, Path(tmp) / f"ap{n}"))
                    rows.append({**row, "run": n, "load": load})
                    print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        provider.terminate()
        provider.wait(5)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
