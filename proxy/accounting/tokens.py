"""Prompt tokens before the call, with tiktoken (offline encodings: proxy/core/encodings.py).

The rules are OpenAI's ("How to count tokens with tiktoken", the OpenAI cookbook), which its API
matches for the documented examples:
- each message: 3 tokens, plus every string value encoded (role, content, name, tool_call_id),
  plus 1 for a `name`; the reply is primed with 3 more;
- tools (`tools`, legacy `functions`): per function `func_init` (7 on o200k_base, 10 on
  cl100k_base) + "name:description" (a final "." dropped); with properties 3, and per property 3 +
  "key:type:description" (enums: -3, then 3 + the item per item); 12 at the end. Schema beyond
  that flat shape (nested objects, arrays) is counted as its JSON text: an estimate;
- content parts: text encoded, images by images.py; a tool call: its name + arguments + 3.

/v1/messages prompts are counted in their own shape by the same rules: `system` as a message, each
block's text, tool_use name + input JSON, tool_result content, images, thinking text.

Encodings: "o200k_base" and "cl100k_base" are exact; "approximate" (models whose tokenizer is not
shipped: Anthropic, Ollama's open-weight models) is cl100k_base times a margin (1.2 by default,
`token_margin` per model), rounded up per message, so a window check errs on the safe side.

Cost: about 0.15 µs per token plus a few µs per message (bench.md). A prompt over
LARGE_PROMPT_CHARS characters of text is counted by `count_prompt_async` without holding up the
loop: its long texts are encoded in slices of SLICE_CHARS (~0.3 ms each) with a checkpoint between
slices, so other streams are relayed in between and no stall is longer than one slice. Slices are
cut only before a space that follows a non-space and precedes a word character, where both
encodings' pre-tokenizers start a new piece, so their counts add up exactly (a long stretch without such a place, CJK or base64 text, goes
to a worker thread instead). The other way,
LARGE_PROMPTS = "thread" (a worker thread, COUNTING_THREADS at once), measured worse: the loop
still stalled 2-4 ms per large prompt (tiktoken holds the GIL while it builds the token list) and
each hand-off costs ~90-170 µs of CPU; inline counting stalls the loop for the whole encode
(bench.md, scripts/bench_tokens.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import orjson
import trio

from proxy.accounting.images import UNKNOWN_IMAGE_TOKENS, base64_image_size, image_tokens, tile_tokens
from proxy.accounting.model_info import APPROXIMATE_MARGIN
from proxy.core.encodings import encoding
from proxy.core.request import ChatRequest

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
TOKENS_PER_TOOL_CALL = 3
# Characters of prompt text above which counting yields to other tasks: ~0.4 ms of encoding, a
# stall too short to show in a stream's gaps (and below it one thread hand-off, ~90-170 µs of CPU,
# would cost about as much as the count; scripts/bench_tokens.py).
LARGE_PROMPT_CHARS = 16_384
SLICE_CHARS = 8_192
LARGE_PROMPTS = "slices"  # or "thread" (compared in bench.md)
COUNTING_THREADS = 1  # large prompts counted at once; a flood of them waits its turn
_SLICE_AT = re.compile(r"(?<=\S) (?=\w)")

Encode = Callable[[str], int]


@dataclass(slots=True)
class PromptCount:
    """A prompt's tokens, per message of the client's format, so a sliding window can drop some."""

    messages: list[int] = field(default_factory=list)
    fixed: int = REPLY_PRIMING  # reply priming + tools + Anthropic's top-level system

    @property
    def total(self) -> int:
        return self.fixed + sum(self.messages)


def counter(encoding_name: str, known: dict[int, tuple[str, int]] | None = None) -> Encode:
    """count(text) -> tokens; `known` holds counts already made (by id, checked by identity)."""
    enc = encoding("cl100k_base" if encoding_name == "approximate" else encoding_name)
    encode = enc.encode_ordinary  # special-token text counts as text: what a user typed

    def count(text: str) -> int:
        if known:
            found = known.get(id(text))
            if found is not None and found[0] is text:
                return found[1]
        return len(encode(text)) if text else 0

    return count


def slices(text: str, size: int = SLICE_CHARS):
    """`text` in pieces of about `size` characters whose token counts add up to the whole's."""
    start = 0
    while len(text) - start > size:
        cut = _SLICE_AT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def count_chat(request: ChatRequest | dict[str, Any], encoding_name: str) -> int:
    """The prompt tokens of a chat request (or a Chat Completions body), cookbook rules."""
    return count_prompt(request, encoding_name).total


def count_prompt(request: ChatRequest | dict[str, Any], encoding_name: str,
                 margin: float | None = None, known: dict[int, tuple[str, int]] | None = None) -> PromptCount:
    """Per-message counts of a ChatRequest in its client's format (Anthropic's on /v1/messages)."""
    count = counter(encoding_name, known)
    func_init = 7 if encoding_name == "o200k_base" else 10
    if isinstance(request, ChatRequest) and request.anthropic_body is not None:
        result = _anthropic(request.anthropic_body, count, func_init)
    else:
        result = _chat(request.body if isinstance(request, ChatRequest) else request, count, func_init)
    if margin is None:
        margin = APPROXIMATE_MARGIN if encoding_name == "approximate" else 1.0
    if margin != 1.0:
        result.messages = [math.ceil(n * margin) for n in result.messages]
        result.fixed = math.ceil(result.fixed * margin)
    return result


async def count_prompt_async(request: ChatRequest, encoding_name: str, margin: float | None = None,
                             limiter: trio.CapacityLimiter | None = None) -> PromptCount:
    """count_prompt, letting other tasks run while a large prompt is encoded (module docstring);
    `limiter` bounds the worker threads of LARGE_PROMPTS = "thread"."""
    if prompt_chars(request) < LARGE_PROMPT_CHARS:
        return count_prompt(request, encoding_name, margin)
    if LARGE_PROMPTS == "thread":
        return await trio.to_thread.run_sync(partial(count_prompt, request, encoding_name, margin),
                                             limiter=limiter)
    count = counter(encoding_name)
    known: dict[int, tuple[str, int]] = {}
    for text in _long_texts(request):
        n = 0
        for piece in slices(text):
            if len(piece) > 4 * SLICE_CHARS:  # no place to cut (no spaces: CJK, base64): off the loop
                n += await trio.to_thread.run_sync(count, piece, limiter=limiter)
                continue
            n += count(piece)
            await trio.lowlevel.checkpoint()
        known[id(text)] = (text, n)
    return count_prompt(request, encoding_name, margin, known)


async def count_once(notes: dict[str, Any], request: ChatRequest, encoding_name: str,
                     margin: float | None = None, limiter: trio.CapacityLimiter | None = None) -> PromptCount:
    """count_prompt_async once per request and (encoding, margin), memoised in the request's notes:
    the cost-tier router (order 10) and the accounting (order 15) both need the count, and a
    10-message prompt costs ~90 µs of encoding. The result is read, never changed."""
    if margin is None:  # as count_prompt resolves it, so that None and its value share one entry
        margin = APPROXIMATE_MARGIN if encoding_name == "approximate" else 1.0
    memo = notes.setdefault("prompt_counts", {})
    found = memo.get((encoding_name, margin))
    if found is None:
        found = memo[encoding_name, margin] = await count_prompt_async(request, encoding_name, margin, limiter)
    return found


def _long_texts(request: ChatRequest) -> list[str]:
    """The prompt's texts longer than a slice: message contents, their text parts, the system prompt."""
    body = request.anthropic_body if request.anthropic_body is not None else request.body
    found: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            if len(value) > SLICE_CHARS:
                found.append(value)
        elif isinstance(value, list):
            for part in value:
                if isinstance(part, dict):
                    add(part.get("text"))

    add(body.get("system"))
    for m in body.get("messages") or ():
        if isinstance(m, dict):
            add(m.get("content"))
    return found


def prompt_chars(request: ChatRequest) -> int:
    """About how many characters of text a prompt holds: cheap, for choosing inline or not."""
    body = request.anthropic_body if request.anthropic_body is not None else request.body
    n = 0
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    text = part.get("text") or part.get("content")
                    n += len(text) if isinstance(text, str) else 64
    system = body.get("system")
    return n + (len(system) if isinstance(system, str) else 0) + 500 * len(body.get("tools") or ())


# -- OpenAI Chat Completions --

def _chat(body: dict[str, Any], count: Encode, func_init: int) -> PromptCount:
    result = PromptCount([_chat_message(m, count) for m in body.get("messages") or ()])
    functions = [t.get("function") for t in body.get("tools") or () if isinstance(t, dict)]
    functions += list(body.get("functions") or ())
    result.fixed += _tools([f for f in functions if isinstance(f, dict)], count, func_init)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and "json_schema" in response_format:
        result.fixed += count(orjson.dumps(response_format["json_schema"]).decode())
    return result


def _chat_message(message: Any, count: Encode) -> int:
    if not isinstance(message, dict):
        return 0
    n = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if isinstance(value, str):
            n += count(value)
        elif key == "content" and isinstance(value, list):
            n += sum(_chat_part(part, count) for part in value)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    n += TOKENS_PER_TOOL_CALL + count(str(fn.get("name") or "")) + count(str(fn.get("arguments") or ""))
        elif key == "function_call" and isinstance(value, dict):
            n += count(str(value.get("name") or "")) + count(str(value.get("arguments") or ""))
        elif value is not None and not isinstance(value, (bool, int, float)):
            n += count(orjson.dumps(value).decode())
        if key == "name":
            n += TOKENS_PER_NAME
    return n


def _chat_part(part: Any, count: Encode) -> int:
    if not isinstance(part, dict):
        return 0
    kind = part.get("type")
    if kind == "text":
        return count(str(part.get("text") or ""))
    if kind == "image_url":
        image = part.get("image_url")
        if isinstance(image, str):
            return image_tokens(image)
        if isinstance(image, dict):
            return image_tokens(image.get("url"), image.get("detail"))
        return UNKNOWN_IMAGE_TOKENS
    return count(str(part.get("text") or part.get("refusal") or ""))


def _tools(functions: list[dict[str, Any]], count: Encode, func_init: int) -> int:
    """The cookbook's num_tokens_for_tools, with nested schema counted as JSON text."""
    if not functions:
        return 0
    n = 12  # func_end
    for fn in functions:
        description = str(fn.get("description") or "")
        n += func_init + count(f"{fn.get('name', '')}:{description.removesuffix('.')}")
        properties = (fn.get("parameters") or {}).get("properties") if isinstance(fn.get("parameters"), dict) else None
        if not isinstance(properties, dict) or not properties:
            continue
        n += 3  # prop_init
        for key, prop in properties.items():
            n += 3  # prop_key
            if not isinstance(prop, dict):
                continue
            kind = prop.get("type", "")
            if not isinstance(kind, str):
                kind = orjson.dumps(kind).decode()
            enum = prop.get("enum")
            if isinstance(enum, list):
                n += -3 + sum(3 + count(str(item)) for item in enum)
            n += count(f"{key}:{kind}:{str(prop.get('description') or '').removesuffix('.')}")
            extra = {k: v for k, v in prop.items() if k not in ("type", "description", "enum")}
            if extra:
                n += count(orjson.dumps(extra).decode())
    return n


# -- Anthropic Messages --

def _anthropic(body: dict[str, Any], count: Encode, func_init: int) -> PromptCount:
    result = PromptCount([_anthropic_message(m, count) for m in body.get("messages") or ()])
    system = body.get("system")
    if system:
        result.fixed += TOKENS_PER_MESSAGE + count("system") + _anthropic_content(system, count)
    tools = [{"name": t.get("name"), "description": t.get("description"), "parameters": t.get("input_schema")}
             for t in body.get("tools") or () if isinstance(t, dict)]
    result.fixed += _tools(tools, count, func_init)
    return result


def _anthropic_message(message: Any, count: Encode) -> int:
    if not isinstance(message, dict):
        return 0
    return TOKENS_PER_MESSAGE + count(str(message.get("role") or "")) + _anthropic_content(message.get("content"), count)


def _anthropic_content(content: Any, count: Encode) -> int:
    if isinstance(content, str):
        return count(content)
    if not isinstance(content, list):
        return 0
    return sum(_anthropic_block(block, count) for block in content if isinstance(block, dict))


def _anthropic_block(block: dict[str, Any], count: Encode) -> int:
    kind = block.get("type")
    if kind == "text":
        return count(str(block.get("text") or ""))
    if kind == "image":
        source = block.get("source") if isinstance(block.get("source"), dict) else {}
        size = base64_image_size(source["data"]) if isinstance(source.get("data"), str) else None
        return UNKNOWN_IMAGE_TOKENS if size is None else tile_tokens(*size)
    if kind == "tool_use":
        return TOKENS_PER_TOOL_CALL + count(str(block.get("name") or "")) + count(orjson.dumps(block.get("input", {})).decode())
    if kind == "tool_result":
        return TOKENS_PER_TOOL_CALL + _anthropic_content(block.get("content", ""), count)
    if kind == "thinking":
        return count(str(block.get("thinking") or ""))
    if kind == "document":
        source = block.get("source") if isinstance(block.get("source"), dict) else {}
        return count(source["data"]) if source.get("type") == "text" and isinstance(source.get("data"), str) \
            else UNKNOWN_IMAGE_TOKENS
    return count(orjson.dumps(block).decode())
