"""What a fake response will be: the settings, their per-request directives, and the plan.

Per-request directives: any message content (a string, or the text parts of a list; for
Anthropic also `system`) may hold a line
    fake: {"ttft": 0.2, "itl": 0.01, "tokens": 50}
whose keys are `FakeSettings` field names; they override the server settings for that request
(several lines merge in order). Unknown keys or bad values get a 400.

Faults fire once N content tokens are written (N above the completion's token count: no fault).
drop_after closes the socket (FIN, so the client reads every token, then an unterminated chunked
body); stall_after goes silent. A non-stream body is all-or-nothing: the fault takes its place.

Rules:
- Settings are frozen and checked when made: a bad value fails with the field, the value and what
  was expected.
- A request is planned whole, up front (`Chat`), so the response loop only sends; planning is pure
  (no I/O, no clock) and the same request always plans the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import orjson

MODEL_ID = "fake-model"
_DIRECTIVE = re.compile(r"^[ \t]*fake:[ \t]*(\{.*\})[ \t]*$", re.MULTILINE)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def count(v: Any) -> bool:
    """Whether `v` is an integer >= 0 (and not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tool_calls_ok(v: Any) -> bool:
    calls = v if isinstance(v, list) else [v]
    return bool(calls) and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                               and isinstance(c.get("arguments", ""), str) for c in calls)


# field -> (check, what was expected). h11 refuses a body on 1xx/204/304, so those are not allowed.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "ttft": (_number, "a number >= 0"),
    "itl": (_number, "a number >= 0"),
    "tokens": (count, "an integer >= 0"),
    "token_bytes": (count, "an integer >= 0"),
    "status": (lambda v: count(v) and 200 <= v <= 599 and v not in (204, 304),
               "an HTTP status 200-599 other than 204/304"),
    "retry_after": (lambda v: v is None or _number(v), "null or a number >= 0"),
    "hang_before_headers": (lambda v: isinstance(v, bool), "true or false"),
    "drop_after": (lambda v: v is None or count(v), "null or an integer >= 0"),
    "stall_after": (lambda v: v is None or count(v), "null or an integer >= 0"),
    "error_after": (lambda v: v is None or count(v), "null or an integer >= 0"),
    "tool_call": (lambda v: v is None or _tool_calls_ok(v),
                  'null, or {"name": str, "arguments": str} or a list of them'),
    "cached_tokens": (count, "an integer >= 0"),
    "cache_write_tokens": (count, "an integer >= 0"),
    "error_event_status": (lambda v: v is None or count(v) and 400 <= v <= 599, "null or a status 400-599"),
    "echo_key": (lambda v: isinstance(v, bool), "true or false"),
}


@dataclass(frozen=True, kw_only=True)
class FakeSettings:
    """Server-wide behaviour; every field may be overridden per request by a `fake:` directive."""

    ttft: float = 0.0  # seconds from response headers to the first content token
    itl: float = 0.0  # seconds between tokens
    tokens: int = 16  # completion tokens, capped by max_tokens / max_completion_tokens
    token_bytes: int = 0  # 0: natural words; N: every token is exactly N ASCII bytes
    status: int = 200  # non-200: an error body in the wire format's shape with this status
    retry_after: float | None = None  # Retry-After header on error statuses
    hang_before_headers: bool = False  # never respond; wait for the peer to close
    drop_after: int | None = None  # after N content tokens close the socket, unterminated
    stall_after: int | None = None  # after N content tokens go silent until the peer closes
    error_after: int | None = None  # stream: after N tokens an error event in the format's shape
    # answer with tool call(s) after the text: {"name", "arguments"} (arguments: JSON text, sent
    # in three fragments when streaming, as written, even if it is not valid JSON)
    tool_call: dict | list | None = None
    cached_tokens: int = 0  # prompt tokens reported as read from the prompt cache
    cache_write_tokens: int = 0  # prompt tokens reported as written to it (Anthropic only)
    # the status error_after's event stands for, in the format's terms (OpenAI's and Anthropic's
    # error type); None: the format's usual server-side error (Anthropic: overloaded_error)
    error_event_status: int | None = None
    # a hostile upstream: the key this request carried (Bearer or x-api-key) is put everywhere a
    # response can carry it — the status line's reason, headers (Retry-After too), every field of
    # an error body, the mid-stream error event — so tests can prove the gateway passes none on
    echo_key: bool = False

    def __post_init__(self) -> None:
        for name, (check, expected) in _CHECKS.items():
            value = getattr(self, name)
            if not check(value):
                raise ValueError(f"{name} = {value!r}: expected {expected}")


@dataclass(frozen=True, kw_only=True)
class FakeControl:
    """Server-wide run-time faults (POST /_fake/control, or `FakeProvider.control = ...`)."""

    revoke_key: bool = False  # every request: 401 invalid_api_key
    fail_percent: int = 0  # this share of requests (0-100) fail with fail_status
    fail_status: int = 503
    hang: bool = False  # every request hangs before headers

    def __post_init__(self) -> None:
        checks = {"revoke_key": (lambda v: isinstance(v, bool), "true or false"),
                  "hang": (lambda v: isinstance(v, bool), "true or false"),
                  "fail_percent": (lambda v: count(v) and v <= 100, "an integer 0..100"),
                  "fail_status": (_CHECKS["status"][0], _CHECKS["status"][1])}
        for name, (check, expected) in checks.items():
            if not check(getattr(self, name)):
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected {expected}")


class BadRequest(Exception):
    """The request cannot be planned; its message is the 400's."""


@dataclass(frozen=True, slots=True)
class Chat:
    """One chat (or embeddings) request, decided up front so the response loop only sends."""

    settings: FakeSettings
    model: str
    stream: bool
    include_usage: bool
    tokens: int
    finish_reason: str  # "stop" | "length" | "tool_calls": each format maps it to its own
    prompt_tokens: int
    fault: tuple[int, str] | None  # (after how many tokens, "drop" | "stall")
    wire: str = "openai"  # "openai" | "anthropic" | "ollama"
    tool_calls: tuple[tuple[str, str], ...] = ()  # (name, arguments JSON text)
    error_message: str | None = None  # the message of an error status (run-time control)
    embed_inputs: tuple[str, ...] = ()  # an embeddings request: its texts
    embed_dims: int = 8
    echo: str | None = None  # echo_key: the key the request carried, to be echoed


def _texts(messages: list) -> list[str]:
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p["text"] for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return out


def _apply_directives(settings: FakeSettings, texts: list[str]) -> FakeSettings:
    for text in texts:
        if "fake:" not in text:  # the cheap test first: prompts can be long
            continue
        for match in _DIRECTIVE.finditer(text):
            try:
                directive = orjson.loads(match.group(1))
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"fake directive is not valid JSON: {exc}") from None
            if not isinstance(directive, dict):
                raise BadRequest("fake directive must be a JSON object")
            unknown = sorted(set(directive) - set(_CHECKS))
            if unknown:
                raise BadRequest(f"unknown fake directive keys {unknown}; "
                                 f"known: {sorted(_CHECKS)}")
            try:
                settings = dataclasses.replace(settings, **directive)
            except ValueError as exc:
                raise BadRequest(f"fake directive: {exc}") from None
    return settings


def plan_chat(body: Any, base: FakeSettings, wire: str = "openai") -> Chat:
    """The chat request `body` (in `wire`'s format) under `base` and its directives."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    texts = _texts(messages)
    system = body.get("system") if wire == "anthropic" else None
    if system is not None:
        texts = _texts([{"content": system}]) + texts
    settings = _apply_directives(base, texts)
    cap = body.get("max_completion_tokens")
    cap = body.get("max_tokens") if cap is None else cap
    if wire == "ollama":
        options = body.get("options")
        cap = options.get("num_predict") if isinstance(options, dict) else None
    if cap is not None and not count(cap):
        raise BadRequest(f"max_tokens must be an integer >= 0, got {cap!r}")
    tokens = settings.tokens if cap is None else min(settings.tokens, cap)
    faults = [(at, kind) for at, kind in [(settings.drop_after, "drop"),
                                          (settings.stall_after, "stall")]
              if at is not None and at <= tokens]
    options = body.get("stream_options")
    model = body.get("model")
    calls = settings.tool_call if isinstance(settings.tool_call, list) else \
        [settings.tool_call] if settings.tool_call else []
    tool_calls = tuple((c["name"], c.get("arguments", "{}")) for c in calls)
    finish = "length" if tokens < settings.tokens else "tool_calls" if tool_calls else "stop"
    return Chat(
        settings=settings,
        model=model if isinstance(model, str) else MODEL_ID,
        stream=body.get("stream") is not False if wire == "ollama" else body.get("stream") is True,
        include_usage=wire != "openai" or isinstance(options, dict) and options.get("include_usage") is True,
        tokens=tokens,
        finish_reason=finish,
        prompt_tokens=max(1, sum(len(t.split()) for t in texts)),
        fault=min(faults) if faults else None,
        wire=wire,
        tool_calls=tool_calls,
    )


def plan_embeddings(body: Any, settings: FakeSettings, wire: str, model: str | None) -> Chat:
    """The embeddings request `body` (directives do not apply: it has no messages)."""
    inputs = body.get("input") if isinstance(body, dict) else None
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("input must be a string or a non-empty list")
    texts = [i if isinstance(i, str) else " ".join(map(str, i)) for i in inputs]
    dims = body.get("dimensions") if count(body.get("dimensions")) else 8
    return Chat(settings=settings, model=model or MODEL_ID, stream=False, include_usage=False,
                tokens=0, finish_reason="stop", prompt_tokens=sum(len(t.split()) for t in texts),
                fault=None, wire=wire, embed_inputs=tuple(texts), embed_dims=dims)
