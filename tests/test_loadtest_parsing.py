"""loadtest v2's parts without a network: --slo, lengths, datasets, tokens, the knee, fail fast,
exit codes, the command line's checks, and the HTML report's self-containment."""

from __future__ import annotations

import json
import random
import re
import sys
from statistics import mean, pstdev
from types import SimpleNamespace

import pytest
import trio

from loadtest import cli
from loadtest.guard import STREAK, Guard
from loadtest.prompts import Length, Picker, build, load_dataset
from loadtest.settings import SettingsError, Shape
from loadtest.slo import SLO
from loadtest.sweep import AUTO_MAX_STEPS, Sweep, exit_code, knee, sweep
from loadtest.tokens import TokenCounter, default_tokenizer, disagrees
from proxy.core.encodings import encoding


# -- --slo --

def test_slo_parses_any_subset():
    assert SLO.parse("ttft_ms=500,itl_ms=50,e2e_ms=10000") == SLO(500, 50, 10000)
    assert SLO.parse(" itl_ms = 20 ").to_json() == {"itl_ms": 20}
    assert str(SLO.parse("e2e_ms=1500,ttft_ms=200")) == "ttft_ms=200,e2e_ms=1500"


@pytest.mark.parametrize("text", ["", "ttft=500", "ttft_ms", "ttft_ms=0", "ttft_ms=-5", "ttft_ms=abc",
                                  "ttft_ms=nan", "ttft_ms=1,ttft_ms=2", "tpot_ms=5"])
def test_bad_slo_names_the_value_and_what_is_expected(text):
    with pytest.raises(SettingsError, match=r"slo = .*expected KEY=MS"):
        SLO.parse(text)


def sample(outcome="ok", ttft=0.1, itl=0.01, tokens=5, e2e=1.0):
    from loadtest.client import Sample

    return Sample(0, 0, 0.0, sent=0.0, first_token=ttft, last_token=ttft + itl * (tokens - 1), ended=e2e,
                  outcome=outcome, tokens=tokens)


def test_slo_is_met_per_request():
    slo = SLO.parse("ttft_ms=200,itl_ms=20,e2e_ms=2000")
    assert slo.met(sample(), 0.0)
    assert not slo.met(sample(ttft=0.25), 0.0)
    assert not slo.met(sample(itl=0.03), 0.0)
    assert not slo.met(sample(e2e=2.5), 0.0)
    assert not slo.met(sample(outcome="cancelled"), 0.0)
    assert slo.met(sample(tokens=1, itl=5.0), 0.0)  # one token: no gap to judge
    assert not SLO(ttft_ms=1000).met(sample(ttft=float("nan")), 0.0)


# -- lengths and prompts --

def test_lengths_parse_and_draw():
    assert Length.parse("prompt_tokens", "500").draw(random.Random(1)) == 500
    normal = Length.parse("prompt_tokens", "normal:500,100")
    draws = [normal.draw(random.Random(i)) for i in range(2000)]
    assert mean(draws) == pytest.approx(500, rel=0.03) and pstdev(draws) == pytest.approx(100, rel=0.1)
    uniform = Length.parse("max_tokens", "uniform:10,20")
    assert {uniform.draw(random.Random(i)) for i in range(500)} == set(range(10, 21))
    assert str(normal) == "normal:500,100"


@pytest.mark.parametrize("text", ["0", "-3", "abc", "normal:500", "normal:-1,2", "uniform:20,10",
                                  "gauss:1,2", "normal:inf,1"])
def test_bad_lengths_are_refused(text):
    with pytest.raises(SettingsError, match=r"max_tokens = .*expected N, normal:MEAN,SD"):
        Length.parse("max_tokens", text)


def test_synthetic_prompts_follow_the_distribution_and_the_seed():
    counter = TokenCounter("o200k_base")
    a = build(counter, prompt_tokens=Length.parse("p", "normal:300,50"), seed=3)
    b = build(counter, prompt_tokens=Length.parse("p", "normal:300,50"), seed=3)
    tokens = [p.input_tokens for p in a.prompts]
    assert tokens == [p.input_tokens for p in b.prompts]
    assert mean(tokens) == pytest.approx(300, rel=0.1) and pstdev(tokens) > 30
    fixed = build(counter, prompt_tokens=Length.parse("p", "200"), max_tokens=Length.parse("m", "64"))
    assert len(fixed.prompts) == 1 and fixed.prompts[0].max_tokens == 64
    assert fixed.prompts[0].input_tokens == pytest.approx(200, abs=5)


def test_jsonl_dataset_prompts_and_messages(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"messages": [{"role": "system", "content": "be brief"}, '
                    '{"role": "user", "content": "two"}]}\n')
    assert load_dataset(str(path)) == [[[{"role": "user", "content": "one"}]],
                                       [[{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "two"}]]]


def test_sharegpt_multi_turn_sends_each_turn_with_its_history(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                      {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "fine"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "solo"}]},
    ]))
    (multi, single) = load_dataset(str(path))
    assert multi == [[{"role": "user", "content": "hi"}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "how are you"}]]
    assert single == [[{"role": "user", "content": "solo"}]]
    prompts = build(TokenCounter("o200k_base"), dataset=str(path), seed=1)
    picker = Picker(prompts, seed=1)
    turns = {0: [], 1: []}
    for _ in range(12):
        for stream in (0, 1):
            turns[stream].append(len(picker.next(stream).messages))
    for seq in turns.values():  # a 3-message turn always follows its 1-message first turn
        assert all(prev == 1 for prev, cur in zip(seq, seq[1:]) if cur == 3)
        assert seq[0] == 1
    a, b = Picker(prompts, seed=9), Picker(prompts, seed=9)  # the seed fixes the order
    assert [a.next(0).messages for _ in range(10)] == [b.next(0).messages for _ in range(10)]


@pytest.mark.parametrize("content, error", [
    ("", "at least one prompt"),
    ('{"text": "x"}\n', "line 1: expected"),
    ('{"prompt": "ok"}\nnot json\n', "line 2 is not JSON"),
    ('[{"conversations": [{"from": "robot", "value": "x"}]}]', "entry 1: expected turns"),
])
def test_bad_datasets_name_the_file_and_the_line(tmp_path, content, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SettingsError, match=re.escape(error)):
        load_dataset(str(path))


# -- tokens --

def test_stream_text_is_counted_with_the_tokenizer_and_usage_is_read():
    counter = TokenCounter("o200k_base")
    pieces = ["Hello", ",", " wonderful", " world", "!"]
    kept = [json.dumps({"choices": [{"delta": {"content": p}}]}).encode() for p in pieces]
    kept.append(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}')
    count, usage = counter.stream("openai", kept, events=5)
    assert count == len(encoding("o200k_base").encode("Hello, wonderful world!")) and usage == 4
    assert TokenCounter("events").stream("openai", kept, events=5) == (5, 4)
    anthropic = [b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi there"}}',
                 b'{"type":"message_delta","delta":{},"usage":{"output_tokens":2}}']
    assert counter.stream("anthropic", anthropic, events=1) == (2, 2)
    body = b'{"choices":[{"message":{"content":"Hi there"}}],"usage":{"completion_tokens":9}}'
    assert counter.body("openai", body) == (2, 9)


def test_usage_disagrees_beyond_two_percent():
    assert not disagrees(100, 102) and disagrees(100, 103) and disagrees(100, 97)
    assert not disagrees(0, 0) and disagrees(0, 1)


def test_default_tokenizer_by_model_name():
    assert default_tokenizer("gpt-4o-mini") == "o200k_base"
    assert default_tokenizer("openai/gpt-4o") == "o200k_base"
    assert default_tokenizer("gpt-4-turbo") == "cl100k_base"
    assert default_tokenizer("gpt-3.5-turbo") == "cl100k_base"
    with pytest.raises(ValueError, match="tokenizer"):
        TokenCounter("llama")


# -- the knee, the automatic sweep, exit codes --

def step(load, rps, requests=100, errors=0, ok=None, attainment=None, stopped=None):
    summary = SimpleNamespace(load=load, requests_per_s=rps, requests=requests, errors=errors,
                              ok=requests - errors if ok is None else ok, output_tokens_per_s=rps * 10,
                              ttft_ms={"p50": 1.0}, goodput_rps=None, slo_attainment=attainment,
                              delivered_rps=rps)
    return SimpleNamespace(summary=summary, stopped=stopped)


def test_knee_of_a_rate_sweep_is_the_last_sustained_rate():
    steps = [step({"rate": r}, min(r, 25) * 0.99) for r in (5, 10, 20, 40)]
    point, note = knee(steps)
    assert point["rate"] == 20 and "sustained" in note
    assert knee(steps[:3]) == (None, "not reached: every rate was sustained")
    assert knee([step({"rate": 5}, 1.0)])[0] is None


def test_knee_of_a_concurrency_sweep_is_where_throughput_stops_growing():
    steps = [step({"concurrency": c}, rps) for c, rps in ((1, 10), (10, 95), (50, 100), (100, 101))]
    assert knee(steps)[0]["concurrency"] == 10
    assert knee(steps[:2])[0] is None


async def test_auto_sweep_doubles_up_to_saturation_then_narrows():
    offered = []

    async def fake_runner(settings, seed):
        rate = settings.shape.rate
        offered.append(rate)
        return step({"rate": rate}, min(rate, 100.0))

    from loadtest.settings import RunSettings, Target

    settings = RunSettings(target=Target(urls=("http://127.0.0.1:1/v1",)),
                           shape=Shape(rate=10, duration=1), progress=False)
    result = await sweep(settings, None, auto_start=10, runner=fake_runner)
    assert offered == [10, 20, 40, 80, 160, 120]
    assert [r.summary.load["rate"] for r in result.steps] == [10, 20, 40, 80, 120, 160]
    assert result.knee["rate"] == 80

    offered.clear()

    async def never_saturates(settings, seed):
        offered.append(settings.shape.rate)
        return step({"rate": settings.shape.rate}, settings.shape.rate)

    unbounded = await sweep(settings, None, auto_start=1, runner=never_saturates)
    assert len(offered) == AUTO_MAX_STEPS and unbounded.knee is None


def test_exit_codes():
    fine = Sweep([step({"rate": 1}, 1.0, attainment=1.0)])
    assert exit_code(fine, None) == 0 and exit_code(fine, 0.99) == 0
    assert exit_code(Sweep([step({"rate": 1}, 1.0, attainment=0.9)]), 0.99) == 3
    assert exit_code(Sweep([step({"rate": 1}, 0.0, errors=100)]), None) == 1
    assert exit_code(Sweep([step({"rate": 1}, 1.0, stopped="401 from the target: pass --api-key")]), None) == 4


# -- fail fast --

def response(status: int, outcome: str | None = None):
    return SimpleNamespace(status=status, outcome=outcome or ("ok" if status == 200 else f"http_{status}"),
                           detail="")


async def test_twenty_same_4xx_in_a_row_stop_with_one_line():
    with trio.CancelScope() as scope:
        guard = Guard(scope, None, api_key_given=False)
        for _ in range(STREAK - 1):
            guard.record(response(401))
        assert guard.stopped is None and not scope.cancel_called
        guard.record(response(401))
    assert guard.stopped == "401 from the target: pass --api-key" and scope.cancel_called


async def test_a_streak_is_broken_by_another_status_and_429_is_load():
    with trio.CancelScope() as scope:
        guard = Guard(scope, None, api_key_given=True)
        for i in range(100):
            guard.record(response(404 if i % 15 else 200))
            guard.record(response(429))
            guard.record(response(0, outcome="cancelled"))
        assert guard.stopped is None
        for _ in range(STREAK):
            guard.record(response(404))
    assert guard.stopped == "404: does the URL end in /v1?"


async def test_error_rate_stops_after_twenty_responses():
    with trio.CancelScope() as scope:
        guard = Guard(scope, 0.5, api_key_given=True)
        for i in range(STREAK - 1):
            guard.record(response(502))
        assert guard.stopped is None  # too few responses to judge
        guard.record(response(200))
    assert guard.stopped.startswith("stopped: 19 of 20 responses failed")


# -- the command line's checks (exit code 2, nothing sent) --

@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0,5"], "concurrency = '0,5': expected a positive number"),
    (["--rate", "5,x"], "rate = '5,x'"),
    (["--concurrency", "1", "--rate", "1"], "exactly one of --concurrency, --rate or --sweep auto"),
    (["--sweep", "auto", "--concurrency", "4", "--duration", "1"], "sweep = 'auto'"),
    (["--sweep", "auto"], "expected --duration"),
    (["--concurrency", "1", "--slo", "ttft=5"], "slo = 'ttft=5'"),
    (["--concurrency", "1", "--min-attainment", "0.9"], "expected --slo too"),
    (["--concurrency", "1", "--min-attainment", "1.5", "--slo", "ttft_ms=5"], "min_attainment = '1.5'"),
    (["--concurrency", "1", "--prompt-tokens", "normal:5"], "prompt_tokens = 'normal:5'"),
    (["--concurrency", "1", "--warmup", "-1"], "warmup = -1.0"),
])
def test_bad_arguments_exit_2_with_the_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--url", "http://127.0.0.1:9/v1", "--requests", "1", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_the_run_naming_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        cli.main(["--url", "http://127.0.0.1:9/v1", "--concurrency", "1", "--requests", "1",
                  "--plot", "x.png"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pip install 'trio-llm-gateway[plot]'" in err


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and "3  a step's SLO attainment" in out and "4  stopped early" in out


# -- the side-by-side with aiperf: its table, and a missing install named --

def test_external_side_by_side_table_and_missing_install(tmp_path, capsys):
    from loadtest.bench import external

    row = {"run": 1, "tool": "loadtest", "ttft_p50": 201.234, "ttft_p99": 210.0, "itl_p50": 10.01,
           "itl_p99": 12.5, "cpu_s": 0.8, "wall_s": 1.94, "load": 1.23}
    assert external.markdown([row]).splitlines()[-1] == \
        "| 1 | loadtest | 201.23 | 210.00 | 10.01 | 12.50 | 0.80 | 1.9 | 1.23 |"
    assert external.main(["--cache", str(tmp_path)]) == 1
    assert "run with --install" in capsys.readouterr().err
