"""loadtest v2 end to end on loopback: sweeps, warm-up and cool-down, SLOs and goodput, token
counts against the server's usage, datasets, fail fast, exit codes and the reports, against the
real fake provider and the real gateway on port 0 (the command line runs as a subprocess)."""

from __future__ import annotations

import json
import re
import sys
import time
from functools import partial

import pytest
import trio

from loadtest.html import render
from loadtest.prompts import Length, build
from loadtest.runner import run
from loadtest.settings import RunSettings, Shape, Target
from loadtest.slo import SLO
from loadtest.sweep import sweep
from loadtest.tokens import TokenCounter
from proxy.core.encodings import encoding
from proxy.testing.fake import FakeProvider, FakeSettings
from proxy.testing.fake.content import completion_text

from .conftest import MASTER_KEY


@pytest.fixture
async def provider(nursery):
    fake = FakeProvider(FakeSettings(tokens=8))
    fake.port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{fake.port}/v1"
    return fake


def settings(url: str, *, prompt: str = "Hello", slo: SLO | None = None, api_key: str | None = None,
             stream_usage: bool = True, tokenizer: str | None = None, prompts=None, **shape) -> RunSettings:
    return RunSettings(target=Target(urls=(url,), model="gpt-4o", prompt=prompt, api_key=api_key,
                                     stream_usage=stream_usage, tokenizer=tokenizer, prompts=prompts),
                       shape=Shape(**shape), progress=False, slo=slo)


async def loadtest(*args: str) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "loadtest", "--quiet", *args]
    # run_process keeps this loop (and the in-process provider/gateway) running meanwhile
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_a_concurrency_sweep_has_one_json_row_per_step_and_names_the_knee(provider, tmp_path):
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    code, stdout, stderr = await loadtest(
        "--url", provider.url, "--concurrency", "1,3", "--requests", "6", "--warmup", "0.2",
        "--slo", "ttft_ms=1000", "--json", str(out), "--html", str(page), "--csv", str(tmp_path / "r.csv"))
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert [s["load"] for s in data["steps"]] == [{"concurrency": 1}, {"concurrency": 3}]
    for s in data["steps"]:
        assert s["requests"] == 6 and s["ok"] == 6 and s["slo_attainment"] == 1.0
        assert s["goodput_rps"] == s["requests_per_s"] > 0 and s["warmup_requests"] > 0
        assert {"ttft_ms", "itl_ms", "e2e_ms", "output_tokens_per_s", "usage_mismatch"} <= set(s)
    assert "knee" in data and data["knee_note"] and data["exit_code"] == 0
    assert data["parameters"]["concurrency"] == [1, 3] and data["parameters"]["api_key"] is None
    lines = stdout.splitlines()
    assert lines[0].split()[0] == "load" and lines[2].split()[0] == "1" and lines[3].split()[0] == "3"
    assert any(line.startswith("knee:") for line in lines)
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and {r.split(",")[0] for r in rows[1:]} == {"0", "1"}
    # the warm-up requests reached the provider but are in no step's figures
    assert len(provider.records) == 12 + sum(s["warmup_requests"] for s in data["steps"])


async def test_html_report_is_self_contained_with_the_step_table(provider, tmp_path):
    with trio.fail_after(30):
        result = await sweep(settings(provider.url, slo=SLO(ttft_ms=1000), concurrency=1, requests=4),
                             [Shape(concurrency=c, requests=4) for c in (1, 2)])
    page = render(result, {"url": provider.url, "concurrency": [1, 2], "note": "<script>x</script>"})
    # nothing to load: no script, stylesheet link, image source or CSS url() anywhere
    assert not re.search(r"<script|<link|<img|<iframe|src=|href=|url\(|@import", page, re.I)
    assert "&lt;script&gt;x&lt;/script&gt;" in page  # run values are escaped
    table = page.split('<table class="steps">', 1)[1].split("</table>", 1)[0]
    cells = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(cells) == 2 and cells[0].startswith("<td>1</td><td>4 / 4</td>")
    assert cells[1].startswith("<td>2</td><td>4 / 4</td>")
    assert page.count("<svg") == 6  # load, tokens, TTFT, ITL, e2e, and the (unsampled) target panel
    assert "Throughput and goodput against load" in page and "goodput req/s" in page
    assert "not sampled: pass --target-pid" in page


async def test_cooldown_lets_in_flight_requests_finish(provider):
    prompt = 'fake: {"ttft": 0.3, "tokens": 2}'
    with trio.fail_after(20):
        cut = await run(settings(provider.url, prompt=prompt, concurrency=3, duration=0.1))
        kept = await run(settings(provider.url, prompt=prompt, concurrency=3, duration=0.1, cooldown=2.0))
    assert cut.summary.outcomes == {"cancelled": 3}
    assert kept.summary.outcomes == {"ok": 3}  # started in the window, finished in the cool-down
    assert all(s.ended - s.sent < 1.0 for s in kept.samples)


async def test_slo_attainment_goodput_and_exit_code_3(provider):
    prompt = 'fake: {"ttft": 0.1, "tokens": 3}'
    code, stdout, stderr = await loadtest("--url", provider.url, "--prompt", prompt, "--concurrency", "2",
                                          "--requests", "4", "--slo", "ttft_ms=50", "--min-attainment", "0.9")
    assert code == 3, stderr
    assert re.search(r"SLO attainment \(ttft_ms<=50\)\s+0\.0 %", stdout)
    assert re.search(r"goodput requests/s\s+0\.00", stdout)
    code, stdout, stderr = await loadtest("--url", provider.url, "--prompt", prompt, "--concurrency", "2",
                                          "--requests", "4", "--slo", "ttft_ms=1000,e2e_ms=5000",
                                          "--min-attainment", "0.9")
    assert code == 0, stderr
    assert re.search(r"SLO attainment \(ttft_ms<=1000, e2e_ms<=5000\)\s+100\.0 %", stdout)


async def test_output_tokens_are_counted_and_usage_checked(provider):
    # Words: the fake's usage agrees with o200k_base. 7-byte tokens: one event each, but
    # "abcdefg" * 6 is not 6 tokens for tiktoken, so every usage "disagrees" with the count.
    with trio.fail_after(20):
        words = await run(settings(provider.url, prompt='fake: {"tokens": 12}', concurrency=2, requests=4))
        blobs = await run(settings(provider.url, prompt='fake: {"tokens": 6, "token_bytes": 7}',
                                   concurrency=2, requests=4))
        events = await run(settings(provider.url, prompt='fake: {"tokens": 6, "token_bytes": 7}',
                                    tokenizer="events", concurrency=1, requests=2))
        no_usage = await run(settings(provider.url, stream_usage=False, concurrency=1, requests=2))
    o200k = encoding("o200k_base")
    assert all(s.output_tokens == len(o200k.encode(completion_text(12, 0))) == s.usage_tokens == 12
               for s in words.samples)
    assert words.summary.usage_mismatch == 0.0 and words.summary.usage_checked == 4
    assert words.summary.tokenizer == "o200k_base" and words.summary.output_tokens == 48
    assert all(s.output_tokens == len(o200k.encode(completion_text(6, 7))) != 6 for s in blobs.samples)
    assert blobs.summary.usage_mismatch == 1.0
    assert blobs.summary.output_tokens_per_s != pytest.approx(24 / blobs.summary.duration_s, rel=0.01)
    assert all(s.output_tokens == s.tokens == 6 for s in events.samples)
    assert no_usage.summary.usage_mismatch is None and no_usage.summary.usage_checked == 0
    assert all(s.input_tokens == 1 for s in no_usage.samples)  # "Hello"


async def test_usage_through_the_gateway_agrees_with_the_count(start_gateway, provider):
    gw = await start_gateway(provider_port=provider.port)
    with trio.fail_after(20):
        result = await run(settings(gw.v1, api_key=MASTER_KEY, prompt='fake: {"tokens": 20}',
                                    concurrency=2, requests=6))
    s = result.summary
    assert s.ok == 6 and s.usage_checked == 6 and s.usage_mismatch == 0.0 and s.output_tokens == 120


async def test_dataset_prompts_and_multi_turn_reach_the_provider(provider, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "first question"}, {"from": "gpt", "value": "first answer"},
        {"from": "human", "value": "second question"}, {"from": "gpt", "value": "second answer"}]}]))
    counter = TokenCounter("o200k_base")
    prompts = build(counter, dataset=str(path), max_tokens=Length.parse("max_tokens", "uniform:3,5"), seed=4)
    with trio.fail_after(20):
        result = await run(settings(provider.url, prompts=prompts, concurrency=1, requests=4), seed=4)
    bodies = [r.body for r in provider.records]
    assert [len(b["messages"]) for b in bodies] == [1, 3, 1, 3]
    assert bodies[1]["messages"][1] == {"role": "assistant", "content": "first answer"}
    assert all(3 <= b["max_tokens"] <= 5 and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert [s.input_tokens for s in result.samples] == [2, 6, 2, 6]
    assert all(s.output_tokens == s.tokens == b["max_tokens"] for s, b in zip(result.samples, bodies))


async def test_synthetic_prompt_lengths_from_the_command_line(provider, tmp_path):
    out = tmp_path / "r.json"
    code, _, stderr = await loadtest("--url", provider.url, "--concurrency", "2", "--requests", "20",
                                     "--prompt-tokens", "normal:200,40", "--max-tokens", "4", "--seed", "1",
                                     "--json", str(out))
    assert code == 0, stderr
    lengths = [len(r.body["messages"][0]["content"].split()) for r in provider.records]
    assert len(set(lengths)) > 5 and 150 < sum(lengths) / len(lengths) < 250
    counted = sum(len(encoding("o200k_base").encode(r.body["messages"][0]["content"])) for r in provider.records)
    assert json.loads(out.read_text())["input_tokens"] == counted == pytest.approx(sum(lengths), rel=0.01)


async def test_401_stops_after_twenty_responses_with_one_line(start_gateway, provider):
    gw = await start_gateway(provider_port=provider.port)
    started = time.monotonic()
    code, stdout, stderr = await loadtest("--url", gw.v1, "--concurrency", "4", "--duration", "30")
    assert code == 4, stdout + stderr
    assert stderr.strip().splitlines()[-1] == "error: 401 from the target: pass --api-key"
    assert time.monotonic() - started < 15  # not the 30 s asked for
    requests = int(re.search(r"^requests\s+(\d+)", stdout, re.M).group(1))
    assert 20 <= requests <= 23, stdout  # 20 in a row, plus at most the other clients' in-flight ones
    assert not provider.records  # refused at the gateway: nothing reached the provider


async def test_404_names_the_base_url(start_gateway, provider):
    gw = await start_gateway(provider_port=provider.port)
    base = gw.v1[: -len("/v1")]
    code, _, stderr = await loadtest("--url", base, "--api-key", MASTER_KEY, "--concurrency", "2",
                                     "--requests", "100")
    assert code == 4 and stderr.strip().splitlines()[-1] == "error: 404: does the URL end in /v1?"


async def test_stop_on_error_rate(provider):
    code, stdout, stderr = await loadtest("--url", provider.url, "--prompt", 'fake: {"status": 503}',
                                          "--concurrency", "2", "--requests", "500", "--stop-on-error-rate", "0.5")
    assert code == 4 and "over --stop-on-error-rate 0.5" in stderr
    assert len(provider.records) < 40
    code, _, _ = await loadtest("--url", provider.url, "--prompt", 'fake: {"status": 503}',
                                "--concurrency", "2", "--requests", "30")
    assert code == 1 and len(provider.records) >= 30 + 20  # no stop asked: all 30 sent, none ok


async def test_png_has_title_legends_and_the_nothing_succeeded_notice(provider, tmp_path):
    pytest.importorskip("matplotlib")
    from loadtest.plot import plot_sweep

    with trio.fail_after(30):
        failed = await sweep(settings(provider.url, prompt='fake: {"status": 500}', concurrency=1, requests=2),
                             [Shape(concurrency=1, requests=2)])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        plot_sweep(failed, str(tmp_path / "f.png"), {"url": provider.url, "concurrency": [1]})
    finally:
        plt.Figure.savefig = real_savefig
    fig = saved[0]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig._suptitle.get_text().startswith("loadtest: url http://") and "concurrency 1" in fig._suptitle.get_text()
    assert any(t.get_text() == "No request succeeded" for t in fig.texts)
    for ax in fig.axes[:3]:
        assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
        assert ax.get_legend() is not None
