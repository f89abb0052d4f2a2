"""loadtest: an honest TTFT / inter-token latency / memory-per-stream load tester for LLM APIs.

Layers, bottom up: `http1` (sans-IO HTTP/1.1) and `apis` (request bodies, event meaning) ->
`client` (one request on a raw trio socket, timed) -> `runner` (closed/open loop, sampling) ->
`stats` / `report` / `plot` -> `cli`. `loadtest.bench` drives the side-by-side benchmark.
"""
