"""Prompt token counting: OpenAI's documented figures, tools, images, /v1/messages, the thread path."""

import base64
import struct
import zlib

import pytest
import trio

from proxy.accounting import tokens
from proxy.accounting.images import UNKNOWN_IMAGE_TOKENS, image_size, tile_tokens
from proxy.accounting.model_info import ModelTable, encoding_for
from proxy.accounting.tokens import count_chat, count_prompt, count_prompt_async
from proxy.core.encodings import encoding
from proxy.core.request import parse_chat_request
from proxy.formats.messages_api import parse_messages_request

import orjson

# The OpenAI cookbook's example ("How to count tokens with tiktoken", section 6), whose API usage
# it reports as 129 prompt tokens on gpt-3.5-turbo/gpt-4 (cl100k_base) and 124 on gpt-4o (o200k_base).
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]
# Section 7: with this tool, 105 tokens (cl100k_base) and 101 (o200k_base) by the OpenAI API.
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}}}]
WEATHER_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def cookbook_count(messages, encoding_name):
    """The cookbook's num_tokens_from_messages, written out from its text with tiktoken directly."""
    enc = encoding(encoding_name)
    n = 0
    for message in messages:
        n += 3
        for key, value in message.items():
            n += len(enc.encode(value))
            if key == "name":
                n += 1
    return n + 3


@pytest.mark.parametrize("encoding_name,api_figure", [("cl100k_base", 129), ("o200k_base", 124)])
def test_the_cookbook_example_counts_as_the_api_did(encoding_name, api_figure):
    assert cookbook_count(COOKBOOK_MESSAGES, encoding_name) == api_figure  # our reading of the rule
    assert count_chat({"messages": COOKBOOK_MESSAGES}, encoding_name) == api_figure
    request = parse_chat_request(orjson.dumps({"model": "gpt-4o", "messages": COOKBOOK_MESSAGES}))
    assert count_chat(request, encoding_name) == api_figure


@pytest.mark.parametrize("encoding_name,api_figure", [("cl100k_base", 105), ("o200k_base", 101)])
def test_tools_count_as_the_api_did(encoding_name, api_figure):
    body = {"messages": WEATHER_MESSAGES, "tools": WEATHER_TOOLS}
    assert count_chat(body, encoding_name) == api_figure
    without = count_chat({"messages": WEATHER_MESSAGES}, encoding_name)
    assert without == cookbook_count(WEATHER_MESSAGES, encoding_name) < api_figure


def test_nested_tool_schema_counts_more_than_the_flat_one():
    nested = orjson.loads(orjson.dumps(WEATHER_TOOLS))
    nested[0]["function"]["parameters"]["properties"]["location"]["items"] = {"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"}}}
    flat = count_chat({"messages": WEATHER_MESSAGES, "tools": WEATHER_TOOLS}, "o200k_base")
    assert count_chat({"messages": WEATHER_MESSAGES, "tools": nested}, "o200k_base") > flat + 10


def _png(width, height):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\0" * 64)


def _jpeg(width, height):
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof + b"\0" * 32


def _gif(width, height):
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\0" * 16


def test_image_sizes_are_read_from_inline_headers():
    assert image_size(_png(1024, 768)) == (1024, 768)
    assert image_size(_jpeg(640, 480)) == (640, 480)
    assert image_size(_gif(300, 200)) == (300, 200)
    assert image_size(b"not an image") is None


def test_image_tokens_follow_openais_documented_examples():
    # platform.openai.com/docs/guides/vision: 1024x1024 high -> 765; 2048x4096 high -> 1105.
    assert tile_tokens(1024, 1024) == 765
    assert tile_tokens(2048, 4096) == 1105
    assert tile_tokens(512, 512) == 255  # small images are not scaled up
    assert UNKNOWN_IMAGE_TOKENS == tile_tokens(768, 2048)  # the most a high-detail image costs


def test_image_parts_in_a_chat_prompt():
    def body(url, detail=None):
        image = {"url": url} if detail is None else {"url": url, "detail": detail}
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                          {"type": "image_url", "image_url": image}]}]}
    text_only = count_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]},
                           "o200k_base")
    inline = "data:image/png;base64," + base64.b64encode(_png(1024, 1024)).decode()
    assert count_chat(body(inline), "o200k_base") == text_only + 765
    assert count_chat(body(inline, "low"), "o200k_base") == text_only + 85
    assert count_chat(body("https://example.com/cat.png"), "o200k_base") == text_only + UNKNOWN_IMAGE_TOKENS


def test_tool_calls_and_results_are_counted():
    plain = [{"role": "user", "content": "weather?"}]
    calls = plain + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_current_weather",
                                                             "arguments": '{"location": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}]
    enc = encoding("o200k_base")
    expected = (count_chat({"messages": plain}, "o200k_base")
                + 3 + len(enc.encode("assistant")) + 3 + len(enc.encode("get_current_weather"))
                + len(enc.encode('{"location": "Paris"}'))
                + 3 + len(enc.encode("tool")) + len(enc.encode("call_1")) + len(enc.encode("22 C and sunny")))
    assert count_chat({"messages": calls}, "o200k_base") == expected


def test_a_messages_prompt_counts_like_its_chat_translation():
    anthropic = {"model": "claude-sonnet-4", "max_tokens": 100, "system": COOKBOOK_MESSAGES[0]["content"],
                 "messages": [{"role": "user", "content": m["content"]} for m in COOKBOOK_MESSAGES[1:]]}
    request = parse_messages_request(orjson.dumps(anthropic))
    native = count_prompt(request, "cl100k_base")
    assert len(native.messages) == 5  # one count per Anthropic message, for the sliding window
    assert native.total == count_chat(request.body, "cl100k_base")


def test_messages_tools_use_the_same_rule():
    anthropic = {"model": "claude-sonnet-4", "max_tokens": 100, "system": WEATHER_MESSAGES[0]["content"],
                 "messages": [WEATHER_MESSAGES[1]],
                 "tools": [{"name": "get_current_weather", "description": WEATHER_TOOLS[0]["function"]["description"],
                            "input_schema": WEATHER_TOOLS[0]["function"]["parameters"]}]}
    request = parse_messages_request(orjson.dumps(anthropic))
    assert count_prompt(request, "cl100k_base").total == 105


def test_approximate_counts_are_cl100k_with_a_margin():
    exact = count_prompt({"messages": COOKBOOK_MESSAGES}, "cl100k_base")
    approx = count_prompt({"messages": COOKBOOK_MESSAGES}, "approximate")
    assert approx.total >= 1.2 * exact.total
    assert approx.total <= 1.2 * exact.total + len(exact.messages) + 1  # rounded up per message
    assert count_prompt({"messages": COOKBOOK_MESSAGES}, "approximate", 1.0).total == exact.total


@pytest.mark.parametrize("model,expected", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"), ("gpt-4.1-nano", "o200k_base"),
    ("o3-mini", "o200k_base"), ("o1", "o200k_base"), ("gpt-5", "o200k_base"), ("openai/gpt-4o", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-3.5-turbo-0125", "cl100k_base"),
    ("claude-sonnet-4-20250514", "approximate"), ("llama3.1:8b", "approximate"), ("mistral", "approximate"),
])
def test_model_to_encoding(model, expected):
    assert encoding_for(model) == expected
    assert ModelTable().lookup(model).encoding == expected


SAMPLE = ("Tokens, tokens: 42 of them! ünïcode 字符 — emoji 🙂 and punctuation... (yes) "
          "snake_case_names, CamelCase, don't we'll I'm; 1234567 digits\n\n  indented  text\ttabs ")


@pytest.mark.parametrize("encoding_name", ["o200k_base", "cl100k_base"])
def test_slices_add_up_to_the_whole_count(encoding_name):
    import random
    rng = random.Random(7)
    words = SAMPLE.split(" ")
    text = " ".join(rng.choice(words) for _ in range(20_000))
    enc = encoding(encoding_name)
    pieces = list(tokens.slices(text, 1000))
    assert len(pieces) > 50 and "".join(pieces) == text
    assert sum(len(enc.encode_ordinary(p)) for p in pieces) == len(enc.encode_ordinary(text))


@pytest.mark.parametrize("way", ["thread", "slices"])
async def test_large_prompts_let_other_tasks_run_while_they_are_counted(way, monkeypatch):
    monkeypatch.setattr(tokens, "LARGE_PROMPTS", way)
    small = parse_chat_request(orjson.dumps({"model": "gpt-4o", "messages": COOKBOOK_MESSAGES}))
    big_text = "lorem ipsum dolor sit amet " * 20_000  # 540,000 characters
    big = parse_chat_request(orjson.dumps({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "short"}, {"role": "user", "content": [{"type": "text", "text": big_text}]}]}))
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        assert (await count_prompt_async(small, "o200k_base")).total == 124
        assert ticks == before  # a small prompt is counted inline, at once
        counted = await count_prompt_async(big, "o200k_base")
        done = True
    assert ticks - before >= len(big_text) // tokens.SLICE_CHARS - 1  # the loop ran between slices
    assert counted.total == count_prompt(big, "o200k_base").total
    assert counted.total == 3 + 1 + 1 + 3 + 1 + len(encoding("o200k_base").encode(big_text)) + 3


async def test_a_long_text_without_spaces_is_counted_off_the_loop(monkeypatch):
    threads = []
    original = trio.to_thread.run_sync

    async def spy(fn, *args, **kw):
        threads.append(args[0][:10])
        return await original(fn, *args, **kw)

    monkeypatch.setattr(tokens.trio.to_thread, "run_sync", spy)
    text = "字符计数" * 20_000 + " and then some words " * 1000
    request = parse_chat_request(orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}))
    counted = await count_prompt_async(request, "o200k_base")
    assert threads == ["字符计数" * 2 + "字符"]  # the unsliceable stretch only
    assert counted.total == count_prompt(request, "o200k_base").total
