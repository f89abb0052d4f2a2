"""Command line: `python -m loadtest --url http://127.0.0.1:8080/v1 --concurrency 100 --requests 1000`.

Thin on purpose: parse arguments into `loadtest.settings` (a bad value fails before any socket
opens, and so does a missing matplotlib for --plot), run the steps, print the table, write the
files asked for. Exit codes: see `EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

import trio

from . import apis
from .prompts import Length, build as build_prompts
from .report import knee_text, sweep_table, write_csv, write_sweep_json
from .settings import Behaviour, RunSettings, Sampling, SettingsError, Shape, Target
from .slo import SLO
from .sweep import exit_code, sweep
from .tokens import TOKENIZERS, TokenCounter, default_tokenizer

EXIT_CODES = """\
exit codes:
  0  every step ran and had successful requests (and met --min-attainment, if given)
  1  a step where no request succeeded
  2  bad arguments or settings (nothing was sent)
  3  a step's SLO attainment fell short of --min-attainment
  4  stopped early: 20 responses in a row with the same 4xx, or --stop-on-error-rate
"""
PLOT_INSTALL = "pip install 'trio-llm-gateway[plot]'  (or: pip install matplotlib)"


EXAMPLES = """\
examples:
  # 100 streaming clients back to back, 1,000 requests, the gateway's RSS and CPU sampled
  python -m proxy serve --demo --pid-file gateway.pid &
  python -m loadtest --url http://127.0.0.1:8080/v1 --api-key $KEY --concurrency 100 \\
      --requests 1000 --target-pid "$(cat gateway.pid)" --json out.json --plot out.png
  # a sweep with goodput against an SLO, an HTML report, exit code 3 under 99 % attainment
  python -m loadtest --url http://127.0.0.1:8080/v1 --concurrency 1,10,50,100 --duration 20 \\
      --warmup 3 --slo ttft_ms=500,itl_ms=50 --min-attainment 0.99 --html report.html
  # rates doubling up to saturation; the knee is named
  python -m loadtest --url http://127.0.0.1:8080/v1 --sweep auto --rate 5 --duration 15
  # a ShareGPT file, sampled with a seed, answers of ~N(300, 50) tokens
  python -m loadtest --url http://127.0.0.1:8080/v1 --dataset sharegpt.json --seed 1 \\
      --max-tokens normal:300,50 --concurrency 20 --duration 60
  # open loop: 50 Poisson arrivals/s for 60 s (latency from each scheduled start)
  python -m loadtest --url http://127.0.0.1:8080/v1 --rate 50 --poisson --duration 60
  # 1,000 slow readers (2 KB/s) held for 30 s
  python -m loadtest --url http://127.0.0.1:8080/v1 --concurrency 1000 --requests 1000 \\
      --read-rate 2000 --duration 30 --ramp-up 2
"""


def _list(kind, name: str):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{name} = {text!r}: expected a positive number or a "
                                             f"comma-separated list of them (e.g. 1,10,50)")
        return values
    return parse


def _length(name: str):
    def parse(text: str) -> Length:
        try:
            return Length.parse(name, text)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _slo(text: str) -> SLO:
    try:
        return SLO.parse(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _share(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{name} = {text!r}: expected a share in (0, 1], e.g. 0.99")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest", epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load-test an OpenAI-compatible (or Anthropic) streaming API: TTFT, inter-token "
                    "latency, throughput, goodput against SLOs, and the target's memory per open stream.")
    t = p.add_argument_group("target")
    t.add_argument("--url", action="append", required=True,
                   help="base URL ending in /v1; repeat to spread requests round-robin")
    t.add_argument("--api-key", default=None)
    t.add_argument("--model", default="gpt-4o-mini")
    t.add_argument("--api", choices=(apis.OPENAI, apis.ANTHROPIC), default=apis.OPENAI)
    t.add_argument("--no-stream", action="store_true")
    t.add_argument("--no-stream-usage", action="store_true",
                   help="do not ask for the usage chunk (stream_options.include_usage) in OpenAI streams")
    t.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="an extra request header (repeatable)")
    w = p.add_argument_group("prompts and tokens")
    prompt = w.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None)
    prompt.add_argument("--prompt-file", default=None)
    prompt.add_argument("--prompt-tokens", type=_length("prompt_tokens"), default=None, metavar="LENGTH",
                        help="synthetic prompts of N tokens, or normal:MEAN,SD / uniform:LOW,HIGH")
    prompt.add_argument("--dataset", default=None, metavar="FILE",
                        help='JSONL ({"prompt": ...} or {"messages": [...]} per line) or ShareGPT JSON; '
                             "sampled with --seed; multi-turn conversations sent turn by turn")
    w.add_argument("--max-tokens", type=_length("max_tokens"), default=None, metavar="LENGTH",
                   help="N, normal:MEAN,SD or uniform:LOW,HIGH")
    w.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                   help="count tokens with tiktoken (offline) or one per content event; "
                        "default by --model: cl100k_base for gpt-4/gpt-3.5, else o200k_base")
    s = p.add_argument_group("load shape")
    s.add_argument("--concurrency", type=_list(int, "concurrency"), metavar="N[,N...]",
                   help="closed loop: N clients back to back; a list is a sweep, one step each")
    s.add_argument("--rate", type=_list(float, "rate"), metavar="R[,R...]",
                   help="open loop: arrivals per second; a list is a sweep; with --sweep auto, the first rate")
    s.add_argument("--sweep", choices=("auto",), default=None,
                   help="auto: open-loop rates doubling from --rate (default 1/s) up to saturation")
    s.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals")
    s.add_argument("--requests", type=int, default=None, help="per step")
    s.add_argument("--duration", type=float, default=None,
                   help="seconds measured per step (after the warm-up); cuts in-flight requests")
    s.add_argument("--warmup", type=float, default=0.0, metavar="S",
                   help="seconds of load before each step's measured window (not counted)")
    s.add_argument("--cooldown", type=float, default=None, metavar="S",
                   help="after each step's window, seconds in-flight requests may finish (default: "
                        "0 for one step, then they are cut; up to --timeout between sweep steps)")
    s.add_argument("--ramp-up", type=float, default=0.0)
    s.add_argument("--max-in-flight", type=int, default=20_000)
    s.add_argument("--new-connection", action="store_true", help="closed loop: no keep-alive")
    s.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    g = p.add_argument_group("objectives and stopping")
    g.add_argument("--slo", type=_slo, default=None, metavar="ttft_ms=500,itl_ms=50,e2e_ms=10000",
                   help="per-request bounds (any subset); reports SLO attainment and goodput per step")
    g.add_argument("--min-attainment", type=_share("min_attainment"), default=None, metavar="SHARE",
                   help="exit code 3 when a step's SLO attainment is below this (needs --slo)")
    g.add_argument("--stop-on-error-rate", type=_share("stop_on_error_rate"), default=None,
                   metavar="SHARE", help="stop once this share of at least 20 responses failed")
    b = p.add_argument_group("client behaviour")
    b.add_argument("--read-rate", type=float, default=None, metavar="BYTES_PER_S")
    b.add_argument("--stall-after", type=int, default=None, metavar="K")
    b.add_argument("--hold", type=float, default=30.0, help="seconds a stalled client holds its socket")
    b.add_argument("--abort-after", type=int, default=None, metavar="K")
    m = p.add_argument_group("target memory")
    m.add_argument("--target-pid", type=int, action="append", default=[],
                   help="sample RSS and CPU of this process and its children (e.g. \"$(cat gateway.pid)\" "
                        "after `python -m proxy serve --pid-file gateway.pid`)")
    m.add_argument("--sample-interval", type=float, default=0.1)
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH")
    o.add_argument("--csv", default=None, metavar="PATH")
    o.add_argument("--html", default=None, metavar="PATH",
                   help="one self-contained HTML report (inline SVG charts; no matplotlib needed)")
    o.add_argument("--plot", default=None, metavar="PATH",
                   help=f"PNG (needs matplotlib: {PLOT_INSTALL})")
    o.add_argument("--quiet", action="store_true", help="no progress line")
    o.add_argument("--seed", type=int, default=None, help="seeds Poisson arrivals and prompt sampling")
    return p


def shapes_from(args: argparse.Namespace) -> list[Shape]:
    """The steps' shapes; with --sweep auto only the first (the sweep makes the rest as it goes)."""
    modes = [m for m in ("concurrency", "rate") if getattr(args, m) is not None]
    if args.sweep == "auto":
        if args.concurrency is not None or (args.rate is not None and len(args.rate) > 1):
            raise SettingsError("sweep = 'auto': expected at most one --rate (the first step), "
                                "no --concurrency")
        if args.duration is None:
            raise SettingsError("sweep = 'auto': expected --duration (seconds per step)")
    elif len(modes) != 1:
        raise SettingsError("concurrency/rate = "
                            f"{(args.concurrency, args.rate)!r}: expected exactly one of --concurrency, "
                            "--rate or --sweep auto")
    steps = 1 if args.sweep is None and len(getattr(args, modes[0])) == 1 else 2
    cooldown = args.cooldown if args.cooldown is not None else (0.0 if steps == 1 else args.timeout)
    common = dict(poisson=args.poisson, requests=args.requests, duration=args.duration,
                  ramp_up=args.ramp_up, max_in_flight=args.max_in_flight,
                  new_connection=args.new_connection, timeout=args.timeout, warmup=args.warmup,
                  cooldown=cooldown)
    if args.sweep == "auto":
        return [Shape(rate=(args.rate or [1.0])[0], **common)]
    if args.concurrency is not None:
        return [Shape(concurrency=n, **common) for n in args.concurrency]
    return [Shape(rate=r, **common) for r in args.rate]


def settings_from(args: argparse.Namespace, shape: Shape) -> RunSettings:
    tokenizer = args.tokenizer or default_tokenizer(args.model)
    counter = TokenCounter(tokenizer)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = args.prompt
    prompts = build_prompts(counter, prompt=text, prompt_tokens=args.prompt_tokens, dataset=args.dataset,
                            max_tokens=args.max_tokens, seed=args.seed)
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise SettingsError(f"header = {h!r}: expected NAME:VALUE")
        headers.append((name.strip(), value.strip()))
    first = prompts.conversations[0][0]
    return RunSettings(
        target=Target(urls=tuple(args.url), model=args.model, api=args.api, api_key=args.api_key,
                      prompt=str(first.messages[-1]["content"]), max_tokens=first.max_tokens,
                      stream=not args.no_stream, extra_headers=tuple(headers), prompts=prompts,
                      tokenizer=tokenizer, stream_usage=not args.no_stream_usage),
        shape=shape,
        behaviour=Behaviour(read_rate=args.read_rate, stall_after=args.stall_after, hold=args.hold,
                            abort_after=args.abort_after),
        sampling=Sampling(target_pids=tuple(args.target_pid), interval=args.sample_interval),
        progress=not args.quiet,
        slo=args.slo,
        stop_on_error_rate=args.stop_on_error_rate,
    )


def parameters(args: argparse.Namespace, settings: RunSettings) -> dict[str, Any]:
    """The run's parameters for the JSON and the HTML report: never the key or header values."""
    out = {k: v for k, v in vars(args).items() if k not in ("api_key", "header") and v not in (None, [], False)}
    out["api_key"] = "(given)" if args.api_key else None
    out["header"] = [h.partition(":")[0] for h in args.header]
    out["prompts"] = settings.target.prompts.source if settings.target.prompts else "prompt"
    out["tokenizer"] = settings.target.tokenizer
    for key in ("prompt_tokens", "max_tokens", "slo"):
        if out.get(key) is not None:
            out[key] = str(out[key])
    return out


def check_plot_dependency() -> str | None:
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # in sys.modules as None: deliberately unimportable
        found = False
    if not found:
        return f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.plot and (problem := check_plot_dependency()):
        p.error(problem)
    if args.min_attainment is not None and args.slo is None:
        p.error("min_attainment: expected --slo too (attainment of which objectives?)")
    try:
        shapes = shapes_from(args)
        settings = settings_from(args, shapes[0])
    except (SettingsError, OSError, ValueError) as exc:
        p.error(str(exc))

    def on_step(result) -> None:
        if settings.progress:
            s = result.summary
            print(f"step {s.load}: {s.ok}/{s.requests} ok, {s.requests_per_s} requests/s, "
                  f"TTFT p50 {s.ttft_ms['p50']} ms", file=sys.stderr, flush=True)

    auto = args.sweep == "auto"
    result = trio.run(lambda: sweep(settings, None if auto else shapes, seed=args.seed,
                                    auto_start=shapes[0].rate or 1.0, on_step=on_step))
    code = exit_code(result, args.min_attainment)
    print(sweep_table(result))
    if len(result.steps) == 1 and (auto or len(shapes) > 1):
        print(knee_text(result))
    if result.stopped:
        print(f"error: {result.stopped}", file=sys.stderr)
    params = parameters(args, settings)
    if args.json:
        write_sweep_json(args.json, result, params, code)
    if args.csv:
        write_csv(args.csv, result.steps)
    if args.html:
        from .html import write_html
        write_html(args.html, result, params)
    if args.plot:
        from .plot import plot_sweep
        plot_sweep(result, args.plot, params)
    return code
