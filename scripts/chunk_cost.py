"""Per-chunk CPU cost of the OpenAI -> OpenAI stream path: adapter parse + client encode.

What one relayed token costs the gateway between the upstream read and the client write,
without sockets: `OpenAIStreamParser.feed` (SSE decode, the byte checks, the event it makes) and
`ChatStreamEncoder.encode` (SSE encode, usage taken out). Two realistic transcripts, each a role
chunk, N content chunks, a finish chunk, the usage chunk and [DONE]:

- `openai`: chunks as api.openai.com writes them with include_usage (id, service_tier,
  system_fingerprint, `"usage":null` and `"obfuscation"` on every chunk, logprobs);
- `compact`: the minimal shape (vLLM-like, and our fake provider's): no usage key until the end.

Read sizes: one event per read (what a token-by-token provider gives) and 16 events per read
(a fast provider, or a slow reader). The figure is the best of `--repeat` runs (min: the
least-disturbed run on a shared machine), in nanoseconds per chunk.

    python scripts/chunk_cost.py [--tokens 200] [--repeat 25] [--loops 20]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from importlib.metadata import version

import orjson

from proxy.config import ProviderConfig
from proxy.core.request import ChatRequest
from proxy.core.usage import Usage
from proxy.formats import make_adapter
from proxy.formats.chat_api import ChatStreamEncoder

WORDS = "The quick brown fox jumps over the lazy dog while the gateway relays every token".split()


def transcript(shape: str, tokens: int) -> list[bytes]:
    """One SSE event per item, as the provider writes them."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if shape == "openai":
            body = {"id": "chatcmpl-BXkQ5m2f9aZ7", "object": "chat.completion.chunk", "created": 1747000000,
                    "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
                    "system_fingerprint": "fp_0392822090",
                    "choices": [dict(choice, logprobs=None)], "usage": None, "obfuscation": "a1B2c3", **extra}
        else:
            body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1747000000, "model": "m",
                    "choices": [choice], **extra}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    role = {"role": "assistant", "content": ""} | ({"refusal": None} if shape == "openai" else {})
    events = [chunk(role)]
    events += [chunk({"content": " " + WORDS[i % len(WORDS)]}) for i in range(tokens)]
    events.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 25, "completion_tokens": tokens, "total_tokens": 25 + tokens}
    last = orjson.loads(chunk({})[6:])
    last["choices"], last["usage"] = [], usage
    events.append(b"data: " + orjson.dumps(last) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def reads(events: list[bytes], per_read: int) -> list[bytes]:
    return [b"".join(events[i:i + per_read]) for i in range(0, len(events), per_read)]


def run_once(adapter, request: ChatRequest, pieces: list[bytes]) -> int:
    parser = adapter.stream_parser(1 << 20, request)
    encoder = ChatStreamEncoder(request, Usage())
    n = 0
    for piece in pieces:
        chunks = parser.feed(piece)
        n += len(chunks)
        encoder.encode(chunks)
    chunks = parser.close()
    encoder.encode(chunks)
    assert parser.failed is None
    return n + len(chunks)


def measure(adapter, request: ChatRequest, pieces: list[bytes], repeat: int, loops: int) -> float:
    chunks = run_once(adapter, request, pieces)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(loops):
            run_once(adapter, request, pieces)
        best = min(best, (time.perf_counter_ns() - start) / loops / chunks)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--loops", type=int, default=20)
    args = ap.parse_args()
    adapter = make_adapter(ProviderConfig(name="p", kind="openai", base_url="https://api.example/v1"), None)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    request = ChatRequest(model="m", stream=True, include_usage=False, body=body)
    try:
        head = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=False).stdout.strip()
    except OSError:
        head = "?"
    print(f"machine: {platform.machine()} {platform.processor() or ''} {platform.system()} "
          f"{platform.release()}; python {platform.python_version()}; orjson {version('orjson')}; "
          f"git {head}")
    print(f"command: python {' '.join(sys.argv)}")
    print()
    print("| transcript | events/read | ns/chunk (parse + encode) |")
    print("|---|---:|---:|")
    for shape in ("openai", "compact"):
        events = transcript(shape, args.tokens)
        for per_read in (1, 16):
            ns = measure(adapter, request, reads(events, per_read), args.repeat, args.loops)
            print(f"| {shape} | {per_read} | {ns:,.0f} |")


if __name__ == "__main__":
    main()
