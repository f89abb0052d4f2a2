"""loadtest: an honest TTFT / inter-token latency / memory-per-stream load tester for LLM APIs.

Layers, bottom up: `http1` (sans-IO HTTP/1.1) and `apis` (paths, headers, event meaning),
`prompts` (what each request asks) and `tokens` (tokenizer counts, usage) -> `client` (one
request on a raw trio socket, timed) -> `runner` (closed/open loop, warm-up, cool-down, sampling;
`guard` stops a run that only fails) -> `sweep` (one run per load step, the knee) -> `stats` /
`slo` / `report` / `html` / `plot` -> `cli`. `loadtest.bench` drives the side-by-side benchmark.
"""
