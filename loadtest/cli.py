"""Command line: `python -m loadtest --url http://127.0.0.1:8080/v1 --concurrency 100 --requests 1000`.

Thin on purpose: parse arguments into `loadtest.settings` (a bad value fails before any socket
opens), run, print the table, write the files asked for.
"""

from __future__ import annotations

import argparse

import trio

from . import apis
from .report import table, write_csv, write_json
from .runner import run
from .settings import Behaviour, RunSettings, Sampling, SettingsError, Shape, Target


EXAMPLES = """\
examples:
  # 100 streaming clients back to back, 1,000 requests, gateway RSS sampled
  python -m loadtest --url http://127.0.0.1:8080/v1 --api-key $KEY --concurrency 100 \\
      --requests 1000 --target-pid $(pgrep -f 'proxy serve') --json out.json --plot out.png
  # open loop: 50 Poisson arrivals/s for 60 s (latency from each scheduled start)
  python -m loadtest --url http://127.0.0.1:8080/v1 --rate 50 --poisson --duration 60
  # 1,000 slow readers (2 KB/s) held for 30 s
  python -m loadtest --url http://127.0.0.1:8080/v1 --concurrency 1000 --requests 1000 \\
      --read-rate 2000 --duration 30 --ramp-up 2
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load-test an OpenAI-compatible (or Anthropic) streaming API: TTFT, inter-token "
                    "latency, throughput, and the target's memory per open stream.")
    t = p.add_argument_group("target")
    t.add_argument("--url", action="append", required=True,
                   help="base URL ending in /v1; repeat to spread requests round-robin")
    t.add_argument("--api-key", default=None)
    t.add_argument("--model", default="gpt-4o-mini")
    t.add_argument("--api", choices=(apis.OPENAI, apis.ANTHROPIC), default=apis.OPENAI)
    prompt = t.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None)
    prompt.add_argument("--prompt-file", default=None)
    prompt.add_argument("--prompt-tokens", type=int, default=None, help="a synthetic prompt of ~N tokens")
    t.add_argument("--max-tokens", type=int, default=None)
    t.add_argument("--no-stream", action="store_true")
    t.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                   help="an extra request header (repeatable)")
    s = p.add_argument_group("load shape")
    mode = s.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="closed loop: N clients back to back")
    mode.add_argument("--rate", type=float, help="open loop: arrivals per second")
    s.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals")
    s.add_argument("--requests", type=int, default=None)
    s.add_argument("--duration", type=float, default=None, help="seconds; cuts in-flight requests")
    s.add_argument("--ramp-up", type=float, default=0.0)
    s.add_argument("--max-in-flight", type=int, default=20_000)
    s.add_argument("--new-connection", action="store_true", help="closed loop: no keep-alive")
    s.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    b = p.add_argument_group("client behaviour")
    b.add_argument("--read-rate", type=float, default=None, metavar="BYTES_PER_S")
    b.add_argument("--stall-after", type=int, default=None, metavar="K")
    b.add_argument("--hold", type=float, default=30.0, help="seconds a stalled client holds its socket")
    b.add_argument("--abort-after", type=int, default=None, metavar="K")
    m = p.add_argument_group("target memory")
    m.add_argument("--target-pid", type=int, action="append", default=[])
    m.add_argument("--sample-interval", type=float, default=0.1)
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH")
    o.add_argument("--csv", default=None, metavar="PATH")
    o.add_argument("--plot", default=None, metavar="PATH", help="PNG (needs matplotlib)")
    o.add_argument("--quiet", action="store_true", help="no progress line")
    o.add_argument("--seed", type=int, default=None, help="Poisson arrivals seed")
    return p


def settings_from(args: argparse.Namespace) -> RunSettings:
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    elif args.prompt_tokens is not None:
        prompt = apis.synthetic_prompt(args.prompt_tokens)
    else:
        prompt = args.prompt if args.prompt is not None else "Hello"
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise SettingsError(f"header = {h!r}: expected NAME:VALUE")
        headers.append((name.strip(), value.strip()))
    return RunSettings(
        target=Target(urls=tuple(args.url), model=args.model, api=args.api, api_key=args.api_key,
                      prompt=prompt, max_tokens=args.max_tokens, stream=not args.no_stream,
                      extra_headers=tuple(headers)),
        shape=Shape(concurrency=args.concurrency, rate=args.rate, poisson=args.poisson,
                    requests=args.requests, duration=args.duration, ramp_up=args.ramp_up,
                    max_in_flight=args.max_in_flight, new_connection=args.new_connection,
                    timeout=args.timeout),
        behaviour=Behaviour(read_rate=args.read_rate, stall_after=args.stall_after, hold=args.hold,
                            abort_after=args.abort_after),
        sampling=Sampling(target_pids=tuple(args.target_pid), interval=args.sample_interval),
        progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        settings = settings_from(args)
    except (SettingsError, OSError) as exc:
        p.error(str(exc))
    result = trio.run(lambda: run(settings, seed=args.seed))
    print(table(result.summary))
    if args.json:
        write_json(args.json, result.summary)
    if args.csv:
        write_csv(args.csv, result)
    if args.plot:
        from .plot import plot_run
        plot_run(result, args.plot)
    return 0 if result.summary.ok else 1
