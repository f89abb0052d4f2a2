"""What each request asks: one prompt, synthetic prompts with a length distribution, or a dataset.

Rules:
- A length is `N` (constant), `normal:MEAN,SD` or `uniform:LOW,HIGH`; draws are rounded and at
  least 1. `--prompt-tokens` and `--max-tokens` both take one.
- `--dataset FILE`: JSONL with one `{"prompt": "..."}` or `{"messages": [...]}` per line, or a
  ShareGPT-style JSON file (a list of `{"conversations": [{"from": "human"|"gpt", "value": ...}]}`).
  A ShareGPT conversation with several human turns is multi-turn: its turns are sent in order,
  turn k with the conversation so far (the dataset's own assistant replies as history).
- Sampling is seeded (`--seed`): the same seed sends the same prompts in the same order.
- Bounded: at most `MAX_CONVERSATIONS` conversations (a seeded sample of a bigger file) and at
  most `SYNTHETIC_POOL` synthetic prompts are built, each request body encoded once, up front.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import orjson

from .settings import SettingsError
from .tokens import TokenCounter

MAX_CONVERSATIONS = 2_000  # a seeded sample beyond this; every turn is encoded up front, history included
SYNTHETIC_POOL = 1_000
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


@dataclass(frozen=True, slots=True)
class Length:
    kind: str  # "constant", "normal", "uniform"
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, name: str, text: str) -> "Length":
        expected = "N, normal:MEAN,SD or uniform:LOW,HIGH (positive numbers)"
        kind, sep, rest = text.strip().partition(":")
        try:
            if not sep:
                value = int(kind)
                if value <= 0:
                    raise ValueError
                return cls("constant", value)
            a, b = (float(x) for x in rest.split(","))
        except ValueError:
            raise SettingsError(f"{name} = {text!r}: expected {expected}") from None
        ok = {"normal": a > 0 and b >= 0, "uniform": 0 < a <= b}.get(kind)
        if not ok or not (math.isfinite(a) and math.isfinite(b)):
            raise SettingsError(f"{name} = {text!r}: expected {expected}")
        return cls(kind, a, b)

    @property
    def constant(self) -> bool:
        return self.kind == "constant"

    def draw(self, rng: random.Random) -> int:
        if self.kind == "normal":
            value = rng.gauss(self.a, self.b)
        elif self.kind == "uniform":
            value = rng.uniform(self.a, self.b)
        else:
            value = self.a
        return max(1, round(value))

    def __str__(self) -> str:
        if self.constant:
            return str(int(self.a))
        return f"{self.kind}:{self.a:g},{self.b:g}"


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: tuple[dict[str, Any], ...]
    max_tokens: int | None
    input_tokens: int  # counted with the run's tokenizer (0 with `events`)


@dataclass(frozen=True)
class PromptSet:
    """Conversations of one or more turns; a turn is one request."""

    conversations: tuple[tuple[Prompt, ...], ...]
    source: str  # for the report: "prompt", "synthetic normal:500,100", "dataset FILE (N)"

    @property
    def prompts(self) -> list[Prompt]:
        return [p for c in self.conversations for p in c]


class Picker:
    """Which prompt a request sends: a seeded draw of a conversation, then its turns in order.

    `stream` is the closed-loop client (each keeps its own conversation going) or 0 in open loop.
    """

    def __init__(self, prompts: PromptSet, seed: int | None) -> None:
        self._conversations = prompts.conversations
        self._rng = random.Random(seed)
        self._at: dict[int, tuple[int, int]] = {}  # stream -> (conversation, next turn)

    def next(self, stream: int) -> Prompt:
        conv, turn = self._at.get(stream, (-1, 0))
        if conv < 0 or turn >= len(self._conversations[conv]):
            conv, turn = self._rng.randrange(len(self._conversations)), 0
        self._at[stream] = (conv, turn + 1)
        return self._conversations[conv][turn]


# One token each (with or without the leading space) in both o200k_base and cl100k_base.
_WORDS = ("alpha", "delta", "echo", "golf", "hotel", "india", "mike", "november", "river",
          "uniform", "apple", "house", "green", "water", "light", "stone", "music", "paper")


def synthetic_prompt(tokens: int, salt: int = 0) -> str:
    """`tokens` tokens of plain words (each one token in o200k_base and cl100k_base); `salt`
    varies the start so prompts of one run do not share a cacheable prefix."""
    return " ".join(_WORDS[(i + salt) % len(_WORDS)] for i in range(max(1, tokens)))


def build(counter: TokenCounter, *, prompt: str | None = None, prompt_tokens: Length | None = None,
          dataset: str | None = None, max_tokens: Length | None = None, seed: int | None = None
          ) -> PromptSet:
    rng = random.Random(seed)

    def cap() -> int | None:
        return max_tokens.draw(rng) if max_tokens is not None else None

    def one(messages: list[dict[str, Any]]) -> Prompt:
        return Prompt(tuple(messages), cap(), counter.messages(messages))

    if dataset is not None:
        conversations = load_dataset(dataset)
        if len(conversations) > MAX_CONVERSATIONS:
            conversations = rng.sample(conversations, MAX_CONVERSATIONS)
        built = tuple(tuple(one(turn) for turn in conv) for conv in conversations)
        return PromptSet(built, f"dataset {dataset} ({len(built)} conversations)")
    if prompt_tokens is not None:
        fixed = prompt_tokens.constant and (max_tokens is None or max_tokens.constant)
        n = 1 if fixed else SYNTHETIC_POOL
        built = tuple((one([{"role": "user", "content": synthetic_prompt(prompt_tokens.draw(rng), i)}]),)
                      for i in range(n))
        return PromptSet(built, f"synthetic, {prompt_tokens} tokens")
    n = 1 if max_tokens is None or max_tokens.constant else SYNTHETIC_POOL
    text = prompt if prompt is not None else "Hello"
    return PromptSet(tuple((one([{"role": "user", "content": text}]),) for _ in range(n)), "prompt")


def load_dataset(path: str) -> list[list[list[dict[str, Any]]]]:
    """Conversations, each a list of turns, each turn the messages that request sends."""
    with open(path, "rb") as f:
        raw = f.read()
    stripped = raw.lstrip()
    conversations: list[list[list[dict[str, Any]]]] = []
    if stripped.startswith(b"["):
        try:
            items = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SettingsError(f"dataset = {path!r}: not valid JSON ({exc})") from None
        for n, item in enumerate(items, 1):
            conversations.append(_entry(path, f"entry {n}", item))
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise SettingsError(f"dataset = {path!r}: line {n} is not JSON ({exc})") from None
            conversations.append(_entry(path, f"line {n}", item))
    conversations = [c for c in conversations if c]
    if not conversations:
        raise SettingsError(f"dataset = {path!r}: expected at least one prompt, found none")
    return conversations


def _entry(path: str, where: str, item: Any) -> list[list[dict[str, Any]]]:
    expected = ('{"prompt": "..."}, {"messages": [...]} or {"conversations": '
                '[{"from": "human", "value": "..."}, ...]}')
    if isinstance(item, dict):
        if isinstance(item.get("prompt"), str):
            return [[{"role": "user", "content": item["prompt"]}]]
        messages = item.get("messages")
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
            return [[{"role": m["role"], "content": m["content"]} for m in messages]]
        turns = item.get("conversations", item.get("conversation"))
        if isinstance(turns, list):
            return _sharegpt(path, where, turns)
    raise SettingsError(f"dataset = {path!r}: {where}: expected {expected}")


def _sharegpt(path: str, where: str, turns: list[Any]) -> list[list[dict[str, Any]]]:
    history: list[dict[str, Any]] = []
    requests: list[list[dict[str, Any]]] = []
    for t in turns:
        if not isinstance(t, dict):
            raise SettingsError(f"dataset = {path!r}: {where}: a turn is not an object")
        role = _SHAREGPT_ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        text = t.get("value", t.get("content"))
        if role is None or not isinstance(text, str):
            raise SettingsError(f"dataset = {path!r}: {where}: expected turns with from: human|gpt "
                                f"and a string value, got {str(t)[:80]}")
        history.append({"role": role, "content": text})
        if role == "user":
            requests.append(list(history))
    return requests


def body(api: str, model: str, prompt: Prompt, stream: bool, stream_usage: bool) -> bytes:
    """The request body: Anthropic takes system messages apart and requires max_tokens."""
    from .apis import ANTHROPIC

    messages = list(prompt.messages)
    out: dict[str, Any] = {"model": model, "stream": stream}
    if api == ANTHROPIC:
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system:
            out["system"] = "\n\n".join(s if isinstance(s, str) else "" for s in system)
            messages = [m for m in messages if m["role"] != "system"]
        out["messages"] = messages
        out["max_tokens"] = prompt.max_tokens if prompt.max_tokens is not None else 1024  # required
        return orjson.dumps(out)
    out["messages"] = messages
    if prompt.max_tokens is not None:
        out["max_tokens"] = prompt.max_tokens
    if stream and stream_usage:
        out["stream_options"] = {"include_usage": True}
    return orjson.dumps(out)
