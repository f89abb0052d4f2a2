"""What cost-aware routing saves on a labelled prompt set (tests/data/tier_prompts.jsonl).

Each prompt (labelled simple or complex) is classified by a shipped preset (proxy/routing/tiers.py)
and priced with the shipped price table (proxy/accounting/model_info.py) at its prompt tokens
(tiktoken o200k_base) plus an assumed answer length (--simple-output / --complex-output tokens, or
the request's max_tokens if smaller). Baseline: every prompt on the preset's strongest tier.
Quality proxy: complex prompts sent to the cheapest tier ("under-routed") and simple prompts sent
above it ("over-routed").

    python scripts/tier_savings.py [--preset gpt|claude] [--simple-output 150] [--complex-output 800]
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from proxy.accounting.model_info import PRICES_DATE
from proxy.accounting.prices import Prices
from proxy.accounting.tokens import count_chat
from proxy.config import parse_config
from proxy.core.usage import Usage
from proxy.routing.tiers import Classifier, features

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tier_prompts.jsonl")
FILLER = "The quarterly figures show steady growth in every region, with costs rising more slowly than revenue. "


def load(path: str = DATA) -> list[dict]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def request_body(item: dict) -> dict:
    """A Chat Completions body for one labelled prompt (attachments, tools, schema, image as marked)."""
    text = item["prompt"]
    if item.get("attach_words"):
        words = FILLER.split()
        text += "\n\n" + " ".join(words[i % len(words)] for i in range(item["attach_words"]))
    content: object = text
    if item.get("image"):
        content = [{"type": "text", "text": text},
                   {"type": "image_url", "image_url": {"url": "https://example.com/xray.png"}}]
    body: dict = {"model": "auto", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                {"role": "user", "content": content}]}
    if item.get("tools"):
        body["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    if item.get("json_schema"):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    if item.get("max_tokens"):
        body["max_tokens"] = item["max_tokens"]
    return body


def config_for(preset: str):
    tiers = {"preset": preset}
    from proxy.routing.tiers import PRESETS

    models = {t["model"]: {"deployments": [{"provider": "p"}]} for t in PRESETS[preset]}
    return parse_config({"providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                         "models": models, "tiers": {"auto": tiers}})


def run(preset: str, simple_output: int, complex_output: int) -> dict:
    config = config_for(preset)
    classifier = Classifier(config.tiers["auto"])
    prices = Prices.from_config(config)
    tiers = config.tiers["auto"].tiers
    strong = tiers[-1].model
    rows, routed, baseline = [], 0.0, 0.0
    under = over = 0
    for item in load():
        body = request_body(item)
        tokens = count_chat(body, config.tiers["auto"].encoding)
        tier, reason = classifier.classify(features(body, tokens))
        out = simple_output if item["label"] == "simple" else complex_output
        out = min(out, item.get("max_tokens") or out)
        usage = Usage(prompt_tokens=tokens, completion_tokens=out)
        cost, full = prices.cost_usd(tier.model, usage), prices.cost_usd(strong, usage)
        routed, baseline = routed + cost, baseline + full
        under += item["label"] == "complex" and tier is tiers[0]
        over += item["label"] == "simple" and tier is not tiers[0]
        rows.append((item["label"], tier.name, reason, tokens, cost, full, item["prompt"][:60]))
    return {"rows": rows, "routed": routed, "baseline": baseline, "under": under, "over": over,
            "n": len(rows), "strong": strong}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("gpt", "claude"), default=None)
    parser.add_argument("--simple-output", type=int, default=150)
    parser.add_argument("--complex-output", type=int, default=800)
    parser.add_argument("--rows", action="store_true", help="print every prompt's decision")
    args = parser.parse_args()
    print(f"prompt set: {DATA} ({len(load())} prompts); prices: shipped table of {PRICES_DATE}; answers "
          f"{args.simple_output} / {args.complex_output} tokens (simple / complex)")
    print("| preset | all on strongest tier | routed | saved | complex under-routed | simple over-routed |")
    print("|---|---:|---:|---:|---:|---:|")
    for preset in ([args.preset] if args.preset else ["gpt", "claude"]):
        r = run(preset, args.simple_output, args.complex_output)
        print(f"| {preset} (strongest: {r['strong']}) | ${r['baseline']:.4f} | ${r['routed']:.4f} | "
              f"{(1 - r['routed'] / r['baseline']) * 100:.0f} % | {r['under']}/20 | {r['over']}/20 |")
        if args.rows:
            for row in r["rows"]:
                print("   ", row[0], row[1], row[2], row[3], f"{row[4]:.5f}", f"{row[5]:.5f}", row[6], file=sys.stderr)


if __name__ == "__main__":
    main()
