"""`python -m proxy fake-provider`: run the fake provider alone until SIGINT or SIGTERM.

Rules:
- Only the server-wide timing and size settings are options; faults are asked for per request
  (`fake:` directives) or at run time (POST /_fake/control).
- Bad values fail at start, with the setting, the value and what was expected.
- The one line on stdout is the base URL, printed once the port is bound (port 0 picks one).
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys

import trio

from proxy.testing.fake.server import FakeProvider
from proxy.testing.fake.settings import FakeSettings

_DESCRIPTION = """\
Run a fake LLM provider for demos, tests and benchmarks. It answers the OpenAI
(/v1/chat/completions, /v1/embeddings), Anthropic (/v1/messages) and Ollama
(/api/chat, /api/embed) APIs with deterministic text at the pace you set."""
_EPILOG = """\
Every default can be changed per request by a line in any message:
  fake: {"ttft": 0.2, "tokens": 50, "status": 429, "drop_after": 5}
and faults can be set for all requests at run time:
  curl -d '{"revoke_key": true}' http://127.0.0.1:9000/_fake/control
What each request got: GET /_fake/requests."""


async def _run(provider: FakeProvider, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(provider.serve, host, port)
            shown = f"[{host}]" if ":" in host else host
            print(f"fake provider listening on http://{shown}:{bound}/v1", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy fake-provider",
        description=_DESCRIPTION,
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9000,
                        help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--ttft", type=float, default=0.0, metavar="SECONDS",
                        help="delay before the first token (default: 0)")
    parser.add_argument("--itl", type=float, default=0.0, metavar="SECONDS",
                        help="delay between tokens (default: 0)")
    parser.add_argument("--tokens", type=int, default=16, metavar="N",
                        help="tokens per completion, capped by the request's max_tokens "
                             "(default: %(default)s)")
    parser.add_argument("--token-bytes", type=int, default=0, metavar="N",
                        help="make every token exactly N bytes; 0 answers with English words "
                             "(default: 0)")
    args = parser.parse_args(argv)
    try:
        settings = FakeSettings(ttft=args.ttft, itl=args.itl, tokens=args.tokens,
                                token_bytes=args.token_bytes)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        trio.run(_run, FakeProvider(settings), args.host, args.port)
    except BaseException as exc:  # trio wraps the bind error in a group
        if not _in_use(exc):
            raise
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"error: {shown}:{args.port} is in use", file=sys.stderr)
        return 2
    return 0


def _in_use(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_in_use(e) for e in exc.exceptions)
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
