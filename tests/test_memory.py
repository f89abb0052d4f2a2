"""Memory that lives as long as a stream: checked with tracemalloc (deterministic, not timing)."""

import tracemalloc

import orjson

from proxy.formats import WireRequest


def test_a_request_body_does_not_pin_orjsons_working_buffer():
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [WireRequest("POST", "http://x/v1/chat/completions", [], orjson.dumps(body))
                for _ in range(200)]
        per_request = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_request < 1024, per_request  # orjson's own result holds ~4 KiB
    assert orjson.loads(kept[0].body) == body
