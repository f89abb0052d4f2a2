"""Command line: `llm-gateway serve --config PATH | --demo`, `fake-provider --port P`, `drill`.

Thin on purpose: parse arguments, load config (failing before any port is bound), run. A start
that cannot happen (bad config, port in use) is one `error:` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from proxy.observability.logs import configure as configure_logging
from proxy.server.app import Gateway
from proxy.config import (Config, ConfigError, Deployment, ModelRoute, ProviderConfig, RouterConfig,
                          ServerConfig, load_config, with_server_overrides)

DEMO_KEY_HINT = "no key needed in demo mode"

DESCRIPTION = """\
A streaming LLM API gateway: one OpenAI-compatible (and Anthropic-compatible) endpoint in
front of OpenAI, Anthropic, Ollama and OpenAI-compatible servers, with retries, failover and
backpressure."""
EPILOG = """\
examples:
  llm-gateway serve --demo                     try it: built-in fake provider, no keys
  llm-gateway serve --config gateway.toml      the real thing (see README: Configuration)
  llm-gateway fake-provider --port 9000        a fake OpenAI/Anthropic/Ollama provider
  llm-gateway drill --duration 30              fail over under load and check the SLO
Each command has its own --help."""


# Listed by /v1/models in demo mode; any other name is served too (the "*" route).
DEMO_MODELS = ("demo", "gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "llama3.1")


def demo_config(provider_port: int, host: str, port: int) -> Config:
    """The embedded default: every model name goes to the built-in fake provider.

    A fault directive in one request (proxy/testing/fake) fails only that request, but its failures
    still count against the one deployment's breaker: the cooldown is 3 s, not 30, so trying a
    fault does not leave the demo refusing everyone for half a minute."""
    fake = Deployment(name="fake/*", provider="fake", model="")
    return Config(
        server=ServerConfig(host=host, port=port),
        router=RouterConfig(breaker_cooldown=3.0),
        providers={"fake": ProviderConfig(name="fake", kind="openai",
                                          base_url=f"http://127.0.0.1:{provider_port}/v1")},
        models=tuple(ModelRoute(name=name, deployments=(fake,)) for name in DEMO_MODELS)
        + (ModelRoute(name="*", deployments=(fake,)),),
    )


async def _run_demo(host: str, port: int, pid_file: str | None) -> None:
    from proxy.testing.fake import FakeProvider, FakeSettings
    from proxy.server.serve import make_socket, serve, write_pid_file

    fake = FakeProvider(FakeSettings(ttft=0.2, itl=0.05, tokens=40))
    sock = make_socket(host, port, ServerConfig().write_timeout)  # a port in use fails here, plainly
    async with trio.open_nursery() as nursery:
        provider_port = await nursery.start(fake.serve)
        config = demo_config(provider_port, host, port)
        # The demo has no master key whatever the environment says: it is a local toy.
        gateway = Gateway(config, environ={}, demo=True)

        async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED) -> None:
            await serve(config, gateway, sock=sock, task_status=task_status)
            nursery.cancel_scope.cancel()  # the gateway drained and stopped: stop the provider too

        url = (await nursery.start(serve_then_stop))[0]
        if pid_file:
            write_pid_file(pid_file)
        print(f"gateway (demo) on {url}, fake provider on http://127.0.0.1:{provider_port}/v1 "
              f"(pid {os.getpid()}, {DEMO_KEY_HINT}). Try:\n"
              f"  curl -N {url}/v1/chat/completions -H 'content-type: application/json' "
              "-d '{\"model\": \"demo\", \"stream\": true, "
              "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'", flush=True)


def _serve(args: argparse.Namespace) -> int:
    from proxy.server.serve import ListenError, remove_pid_file, run

    if args.demo:
        try:
            trio.run(_run_demo, args.host or "127.0.0.1", args.port if args.port is not None else 8080,
                     args.pid_file)
        except KeyboardInterrupt:
            pass
        except ListenError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            if args.pid_file:
                remove_pid_file(args.pid_file)
        return 0
    try:
        config = load_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers))
                     if v is not None}
        if overrides:
            config = with_server_overrides(config, overrides)
        gateway = Gateway(config)
        return run(config, gateway, pid_file=args.pid_file)
    except (ConfigError, ListenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the gateway", description="Run the gateway in the "
                           "foreground until SIGTERM or Ctrl-C, then drain open streams and exit.")
    mode = serve.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", metavar="PATH", help="TOML config file (README: Configuration reference)")
    mode.add_argument("--demo", action="store_true",
                      help="no config, no keys: every model name goes to a built-in fake provider")
    serve.add_argument("--host", default=None, help="listen on this address instead of [server] host")
    serve.add_argument("--port", type=int, default=None, help="listen on this port instead of [server] port")
    serve.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run N worker processes instead of [server] workers")
    serve.add_argument("--pid-file", metavar="PATH", default=None,
                       help="write the server's PID here once listening; removed on exit")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="text lines or one JSON object a line; both carry the request id")
    sub.add_parser("fake-provider", help="run a fake OpenAI/Anthropic/Ollama provider (demos, tests)",
                   add_help=False)
    sub.add_parser("drill", help="revoke the primary provider's key under load; check the SLO",
                   add_help=False)
    sub.add_parser("keys", help="virtual keys on the [state] store: create, list, revoke, rotate, spend",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    configure_logging(getattr(args, "log_format", "text"), args.log_level)  # request ids, bounded lines
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request: ours says more
    if args.command == "keys":
        from proxy.keys.cli import main as keys_main
        return keys_main(rest)
    if args.command == "drill":
        from proxy.testing.drill import main as drill_main
        return drill_main(rest)
    if args.command == "fake-provider":
        from proxy.testing.fake import main as fake_main
        return fake_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _serve(args)
