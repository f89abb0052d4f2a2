"""A fake LLM provider: the upstream for demos, end-to-end tests and benchmarks.

It speaks three wire formats with deterministic text, tunable timing (time to first token,
inter-token latency) and injectable faults (error statuses, hangs, dropped and stalled streams,
error events mid-stream, an upstream echoing the key it was sent); each can answer with tool
calls and reports usage with cached tokens in its own fields. Run it alone with
`python -m proxy fake-provider`, or in-process:
    fake = FakeProvider(FakeSettings(ttft=0.2, itl=0.05)); port = await nursery.start(fake.serve)

Modules, each looking only down this list:
    settings   FakeSettings, FakeControl, the `fake:` directives, planning a request (`Chat`)
    content    the deterministic words, fragments and vectors; SSE framing
    openai, anthropic, ollama    each format's bodies, stream scripts, errors (pure)
    exchange   one response on the wire: RequestRecord, pacing, faults, the peer watcher
    server     FakeProvider: the h11 server loop, routes, run-time control, records
    cli        `python -m proxy fake-provider`

Rules:
- Test and demo code: nothing on the gateway's serving path imports it.
- Deterministic: the same request always yields the same text and token counts.
"""

from proxy.testing.fake.cli import main
from proxy.testing.fake.exchange import RequestRecord
from proxy.testing.fake.server import FakeProvider
from proxy.testing.fake.settings import MODEL_ID, FakeControl, FakeSettings

__all__ = ["MODEL_ID", "FakeControl", "FakeProvider", "FakeSettings", "RequestRecord", "main"]
