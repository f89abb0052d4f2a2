"""Command line: `llm-gateway serve --config PATH | --demo`, `fake-provider --port P`, `drill`.

Thin on purpose: parse arguments, load config (failing before any port is bound), run.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from proxy.server.app import Gateway
from proxy.config import (Config, ConfigError, Deployment, ModelRoute, ProviderConfig, ServerConfig,
                     load_config, with_server_overrides)

DEMO_KEY_HINT = "no key needed in demo mode"


def demo_config(provider_port: int, host: str, port: int) -> Config:
    """The embedded default: every model name goes to the built-in fake provider."""
    return Config(
        server=ServerConfig(host=host, port=port),
        providers={"fake": ProviderConfig(name="fake", kind="openai",
                                          base_url=f"http://127.0.0.1:{provider_port}/v1")},
        models=(ModelRoute(name="*", deployments=(Deployment(name="fake/*", provider="fake", model=""),)),),
    )


async def _run_demo(host: str, port: int) -> None:
    from proxy.testing.fake import FakeProvider, FakeSettings
    from proxy.server.serve import serve

    fake = FakeProvider(FakeSettings(ttft=0.2, itl=0.05, tokens=40))
    async with trio.open_nursery() as nursery:
        provider_port = await nursery.start(fake.serve)
        config = demo_config(provider_port, host, port)
        # The demo has no master key whatever the environment says: it is a local toy.
        gateway = Gateway(config, environ={})

        async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED) -> None:
            await serve(config, gateway, task_status=task_status)
            nursery.cancel_scope.cancel()  # the gateway drained and stopped: stop the provider too

        url = (await nursery.start(serve_then_stop))[0]
        print(f"gateway (demo) on {url}, fake provider on http://127.0.0.1:{provider_port}/v1 "
              f"({DEMO_KEY_HINT}). Try:\n"
              f"  curl -N {url}/v1/chat/completions -H 'content-type: application/json' "
              "-d '{\"model\": \"demo\", \"stream\": true, "
              "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'", flush=True)


def _serve(args: argparse.Namespace) -> int:
    from proxy.server.serve import run

    if args.demo:
        try:
            trio.run(_run_demo, args.host or "127.0.0.1", args.port if args.port is not None else 8080)
        except KeyboardInterrupt:
            pass
        return 0
    try:
        config = load_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers))
                     if v is not None}
        if overrides:
            config = with_server_overrides(config, overrides)
        gateway = Gateway(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(config, gateway)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    mode = serve.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", metavar="PATH", help="TOML config file")
    mode.add_argument("--demo", action="store_true", help="no config, no keys: built-in fake provider")
    serve.add_argument("--host", default=None, help="override [server] host")
    serve.add_argument("--port", type=int, default=None, help="override [server] port")
    serve.add_argument("--workers", type=int, default=None, help="override [server] workers")
    sub.add_parser("fake-provider", help="run the fake OpenAI-compatible provider alone", add_help=False)
    sub.add_parser("drill", help="revoke the primary's key under load; report the SLO", add_help=False)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request: ours says more
    if args.command == "drill":
        from proxy.testing.drill import main as drill_main
        return drill_main(rest)
    if args.command == "fake-provider":
        from proxy.testing.fake import main as fake_main
        return fake_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _serve(args)
