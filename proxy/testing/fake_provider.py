"""A fake LLM provider: the upstream for demos, end-to-end tests and benchmarks.

It speaks three wire formats with deterministic text, tunable timing (time to first token,
inter-token latency) and injectable faults (error statuses, hangs, dropped and stalled streams,
error events mid-stream):
- OpenAI: POST /v1/chat/completions (JSON and SSE), POST /v1/embeddings;
- Anthropic: POST /v1/messages (JSON and SSE events, `event: error` for faults);
- Ollama: POST /api/chat (JSON and NDJSON; streams unless "stream": false), POST /api/embed.
Each can answer with tool calls (`tool_call` directive) and reports usage with cached tokens
(`cached_tokens`, `cache_write_tokens`) in its own fields. Errors are shaped like the format's.
Every chat or embeddings request leaves a `RequestRecord` that tests inspect.

Runtime control (for routing tests: key revocation, partial outages, hangs): POST /_fake/control
with a JSON object, or set `FakeProvider.control` (a frozen `FakeControl`) in-process:
    {"revoke_key": true}                      every request gets 401 invalid_api_key
    {"fail_percent": 30, "fail_status": 503}  that share of requests fail with that status; the
                                              sequence is deterministic (3 of every 10, evenly)
    {"hang": true}                            every request hangs before headers
    {"reset": true}                           clear all controls (alone or before the others)
Keys given are merged over the current control; the answer is the control now in force.

Rules:
- Raw trio sockets + h11 (sans-IO), not an ASGI server: every byte on the wire is ours, and while a
  response is in progress a watcher task reads the socket, so a client close is seen at once (the
  gateway tests prove they release upstream sockets by watching `RequestRecord.closed`).
- It is the "floor" in benchmarks: one task per connection, a few hundred bytes of state each;
  per token, a lookup of pre-framed bytes and one `send_all`; tokens already due (itl=0, or
  catching up after a slow reader) share one write. Pacing uses absolute deadlines (no drift).
- Deterministic: the same request always yields the same text and token counts.
- One connection's failure never reaches the server: errors are caught per connection, logged at
  debug level, and the connection is closed.

Per-request directives: any message content (a string, or the text parts of a list) may hold a line
    fake: {"ttft": 0.2, "itl": 0.01, "tokens": 50}
whose keys are `FakeSettings` field names; they override the server settings for that request
(several lines merge in order). Unknown keys or bad values get a 400.

Faults fire once N content tokens are written (N above the completion's token count: no fault).
drop_after closes the socket (FIN, so the client reads every token, then an unterminated chunked
body); stall_after goes silent. A non-stream body is all-or-nothing: the fault takes its place.
A peer close is noticed only while a request is being answered; a half-close (SHUT_WR) counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import http
import logging
import math
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import h11
import orjson
import trio

log = logging.getLogger(__name__)

MODEL_ID = "fake-model"
_WORDS = (" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")
_WORD_JSON = tuple(orjson.dumps(w) for w in _WORDS)
_RECV_BYTES = 65536
_MAX_BODY = 64 * 1024 * 1024
# Bytes of a pipelined next request the watcher buffers before it stops reading (TCP pushes back).
_MAX_READ_AHEAD = 1024 * 1024
_FORMATS = ("openai", "anthropic", "ollama")
# Tokens that are already due (itl=0, or catching up after a slow reader) share one write.
_BATCH_BYTES = 16 * 1024
_DIRECTIVE = re.compile(r"^[ \t]*fake:[ \t]*(\{.*\})[ \t]*$", re.MULTILINE)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# field -> (check, what was expected). h11 refuses a body on 1xx/204/304, so those are not allowed.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "ttft": (_number, "a number >= 0"),
    "itl": (_number, "a number >= 0"),
    "tokens": (_count, "an integer >= 0"),
    "token_bytes": (_count, "an integer >= 0"),
    "status": (lambda v: _count(v) and 200 <= v <= 599 and v not in (204, 304),
               "an HTTP status 200-599 other than 204/304"),
    "retry_after": (lambda v: v is None or _number(v), "null or a number >= 0"),
    "hang_before_headers": (lambda v: isinstance(v, bool), "true or false"),
    "drop_after": (lambda v: v is None or _count(v), "null or an integer >= 0"),
    "stall_after": (lambda v: v is None or _count(v), "null or an integer >= 0"),
    "error_after": (lambda v: v is None or _count(v), "null or an integer >= 0"),
    "tool_call": (lambda v: v is None or _tool_calls_ok(v),
                  'null, or {"name": str, "arguments": str} or a list of them'),
    "cached_tokens": (_count, "an integer >= 0"),
    "cache_write_tokens": (_count, "an integer >= 0"),
}


def _tool_calls_ok(v: Any) -> bool:
    calls = v if isinstance(v, list) else [v]
    return bool(calls) and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                               and isinstance(c.get("arguments", ""), str) for c in calls)


@dataclass(frozen=True, kw_only=True)
class FakeSettings:
    """Server-wide behaviour; every field may be overridden per request by a `fake:` directive."""

    ttft: float = 0.0  # seconds from response headers to the first content token
    itl: float = 0.0  # seconds between tokens
    tokens: int = 16  # completion tokens, capped by max_tokens / max_completion_tokens
    token_bytes: int = 0  # 0: natural words; N: every token is exactly N ASCII bytes
    status: int = 200  # non-200: an OpenAI-style error body with this status
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

    def __post_init__(self) -> None:
        for name, (check, expected) in _CHECKS.items():
            value = getattr(self, name)
            if not check(value):
                raise ValueError(f"{name} = {value!r}: expected {expected}")


@dataclass(eq=False)
class RequestRecord:
    """What happened to one chat/completions request; mutated while the response runs."""

    id: int
    path: str
    model: str | None
    stream: bool
    status: int
    authorization: str | None
    body: dict
    headers: dict = field(default_factory=dict)  # request headers, lower-case names
    bytes_sent: int = 0  # body payload bytes (no headers, no chunk framing) whose send_all returned
    tokens_sent: int = 0
    completed: bool = False
    peer_closed_early: bool = False
    started_at: float = 0.0
    ended_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "closed"}


class _BadRequest(Exception):
    pass


class _Drop(Exception):
    """Unwinds a response whose fault is to close the connection abruptly."""


@dataclass(frozen=True, slots=True)
class _Chat:
    """One chat request, decided up front so the response loop only sends."""

    settings: FakeSettings
    model: str
    stream: bool
    include_usage: bool
    tokens: int
    finish_reason: str
    prompt_tokens: int
    fault: tuple[int, str] | None  # (after how many tokens, "drop" | "stall")
    wire: str = "openai"  # "openai" | "anthropic" | "ollama"
    tool_calls: tuple[tuple[str, str], ...] = ()  # (name, arguments JSON text)
    error_message: str | None = None  # the message of an error status (run-time control)
    embed_inputs: tuple[str, ...] = ()  # an embeddings request: its texts
    embed_dims: int = 8


class _Exchange:
    """One request/response on a connection: the socket, h11 state and the record it feeds."""

    __slots__ = ("stream", "conn", "is_head", "record", "peer_gone", "dropped", "wire")

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, is_head: bool) -> None:
        self.stream, self.conn, self.is_head = stream, conn, is_head
        self.wire = "openai"
        self.record: RequestRecord | None = None
        self.peer_gone = False  # the client closed (EOF, reset or a failed write)
        self.dropped = False  # we closed abruptly on purpose (drop_after)

    async def write(self, data: bytes, body_bytes: int) -> None:
        await self.stream.send_all(data)
        if self.record is not None:
            self.record.bytes_sent += body_bytes


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
                raise _BadRequest(f"fake directive is not valid JSON: {exc}") from None
            if not isinstance(directive, dict):
                raise _BadRequest("fake directive must be a JSON object")
            unknown = sorted(set(directive) - set(_CHECKS))
            if unknown:
                raise _BadRequest(f"unknown fake directive keys {unknown}; "
                                  f"known: {sorted(_CHECKS)}")
            try:
                settings = dataclasses.replace(settings, **directive)
            except ValueError as exc:
                raise _BadRequest(f"fake directive: {exc}") from None
    return settings


def _plan_chat(body: Any, base: FakeSettings, wire: str = "openai") -> _Chat:
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise _BadRequest("messages must be a list")
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
    if cap is not None and not _count(cap):
        raise _BadRequest(f"max_tokens must be an integer >= 0, got {cap!r}")
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
    return _Chat(
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


def _immediate(chat: _Chat | str) -> bool:
    """Whether the whole response is written at once, with no wait the peer could interrupt."""
    if isinstance(chat, str):
        return True
    s = chat.settings
    if s.hang_before_headers:
        return False
    return s.status != 200 or not (chat.stream or s.ttft or chat.fault)


def _token_text(token_bytes: int) -> str:
    return ("abcdefghijklmnopqrstuvwxyz" * (token_bytes // 26 + 1))[:token_bytes]


def _completion_text(tokens: int, token_bytes: int) -> str:
    if token_bytes:
        return _token_text(token_bytes) * tokens
    return "".join(_WORDS) * (tokens // len(_WORDS)) + "".join(_WORDS[: tokens % len(_WORDS)])


_ERROR_KINDS = {  # status -> OpenAI error (type, code); other 4xx: invalid_request_error
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                     500: "api_error", 529: "overloaded_error"}


def _error_body(status: int, message: str | None = None, wire: str = "openai") -> dict[str, Any]:
    message = message or f"fake provider error {status}"
    if wire == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if wire == "ollama":
        return {"error": message}
    default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    kind, code = _ERROR_KINDS.get(status, default)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


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
                  "fail_percent": (lambda v: _count(v) and v <= 100, "an integer 0..100"),
                  "fail_status": (_CHECKS["status"][0], _CHECKS["status"][1])}
        for name, (check, expected) in checks.items():
            if not check(getattr(self, name)):
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected {expected}")


def _fragments(text: str, parts: int = 3) -> list[str]:
    """Split at awkward places (mid-token) so clients must join fragments in order."""
    size = max(1, -(-len(text) // parts))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _usage_fields(chat: _Chat) -> dict[str, Any]:
    p, n, c, w = chat.prompt_tokens, chat.tokens, chat.settings.cached_tokens, chat.settings.cache_write_tokens
    if chat.wire == "anthropic":
        return {"input_tokens": p, "output_tokens": n, "cache_read_input_tokens": c,
                "cache_creation_input_tokens": w}
    if chat.wire == "ollama":
        return {"prompt_eval_count": p, "eval_count": n}
    usage: dict[str, Any] = {"prompt_tokens": p + c, "completion_tokens": n, "total_tokens": p + c + n}
    if c:
        usage["prompt_tokens_details"] = {"cached_tokens": c}
    return usage


def _tool_input(arguments: str) -> Any:
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments  # kept as text: how a broken model's output looks where objects are expected


_STOP = {"anthropic": {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"},
         "ollama": {"stop": "stop", "length": "length", "tool_calls": "stop"}}


def _completion_body(chat: _Chat, rid: int) -> dict[str, Any]:
    text = _completion_text(chat.tokens, chat.settings.token_bytes)
    if chat.wire == "anthropic":
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        for i, (name, args) in enumerate(chat.tool_calls):
            value = _tool_input(args)
            content.append({"type": "tool_use", "id": f"toolu_fake_{rid}_{i}", "name": name,
                            "input": value if isinstance(value, dict) else {}})
        return {"id": f"msg_fake_{rid}", "type": "message", "role": "assistant", "model": chat.model,
                "content": content, "stop_reason": _STOP["anthropic"][chat.finish_reason],
                "stop_sequence": None, "usage": _usage_fields(chat)}
    if chat.wire == "ollama":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if chat.tool_calls:
            message["tool_calls"] = [{"function": {"name": n, "arguments": _tool_input(a)}}
                                     for n, a in chat.tool_calls]
        return {"model": chat.model, "created_at": "2024-01-01T00:00:00Z", "message": message, "done": True,
                "done_reason": _STOP["ollama"][chat.finish_reason], **_usage_fields(chat)}
    reply: dict[str, Any] = {"role": "assistant", "content": text if text or not chat.tool_calls else None}
    if chat.tool_calls:
        reply["tool_calls"] = [{"id": f"call_fake_{rid}_{i}", "type": "function",
                                "function": {"name": n, "arguments": a}}
                               for i, (n, a) in enumerate(chat.tool_calls)]
    return {"id": f"chatcmpl-fake-{rid}", "object": "chat.completion", "created": int(time.time()),
            "model": chat.model, "choices": [{"index": 0, "finish_reason": chat.finish_reason,
                                              "message": reply}], "usage": _usage_fields(chat)}


def _sse(data: Any, event: str | None = None) -> bytes:
    return (b"event: %s\n" % event.encode() if event else b"") + b"data: " + orjson.dumps(data) + b"\n\n"


def _script(chat: _Chat, rid: int) -> list[tuple[bytes, bool]]:
    """A whole stream as (payload, is_token) events; tokens are paced, faults count them."""
    words = [(_token_text(chat.settings.token_bytes) if chat.settings.token_bytes else _WORDS[i % len(_WORDS)])
             for i in range(chat.tokens)]
    out: list[tuple[bytes, bool]] = []
    if chat.wire == "anthropic":
        start = {"id": f"msg_fake_{rid}", "type": "message", "role": "assistant", "model": chat.model,
                 "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": dict(_usage_fields(chat), output_tokens=1)}
        out.append((_sse({"type": "message_start", "message": start}, "message_start"), False))
        out.append((_sse({"type": "ping"}, "ping"), False))
        index = 0
        if words:
            out.append((_sse({"type": "content_block_start", "index": 0,
                              "content_block": {"type": "text", "text": ""}}, "content_block_start"), False))
            out += [(_sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": w}}, "content_block_delta"), True) for w in words]
            out.append((_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"), False))
            index = 1
        for i, (name, args) in enumerate(chat.tool_calls):
            block = {"type": "tool_use", "id": f"toolu_fake_{rid}_{i}", "name": name, "input": {}}
            out.append((_sse({"type": "content_block_start", "index": index + i, "content_block": block},
                             "content_block_start"), False))
            out += [(_sse({"type": "content_block_delta", "index": index + i,
                           "delta": {"type": "input_json_delta", "partial_json": f}}, "content_block_delta"), True)
                    for f in _fragments(args)]
            out.append((_sse({"type": "content_block_stop", "index": index + i}, "content_block_stop"), False))
        out.append((_sse({"type": "message_delta", "delta": {"stop_reason": _STOP["anthropic"][chat.finish_reason],
                                                             "stop_sequence": None},
                          "usage": {"output_tokens": chat.tokens}}, "message_delta"), False))
        out.append((_sse({"type": "message_stop"}, "message_stop"), False))
        return out
    if chat.wire == "ollama":
        def line(message: dict[str, Any], **extra: Any) -> bytes:
            return orjson.dumps({"model": chat.model, "created_at": "2024-01-01T00:00:00Z",
                                 "message": dict(role="assistant", **message), "done": False, **extra}) + b"\n"
        out += [(line({"content": w}), True) for w in words]
        if chat.tool_calls:
            calls = [{"function": {"name": n, "arguments": _tool_input(a)}} for n, a in chat.tool_calls]
            out.append((line({"content": "", "tool_calls": calls}), True))
        out.append((line({"content": ""}, done=True, done_reason=_STOP["ollama"][chat.finish_reason],
                         **_usage_fields(chat)).replace(b'"done":false,', b""), False))
        return out
    base = {"id": f"chatcmpl-fake-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": chat.model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}]))
    out.append((chunk({"role": "assistant", "content": ""}), False))
    out += [(chunk({"content": w}), True) for w in words]
    for i, (name, args) in enumerate(chat.tool_calls):
        out.append((chunk({"tool_calls": [{"index": i, "id": f"call_fake_{rid}_{i}", "type": "function",
                                           "function": {"name": name, "arguments": ""}}]}), False))
        out += [(chunk({"tool_calls": [{"index": i, "function": {"arguments": f}}]}), True)
                for f in _fragments(args)]
    out.append((chunk({}, chat.finish_reason), False))
    if chat.include_usage:
        out.append((_sse(dict(base, choices=[], usage=_usage_fields(chat))), False))
    out.append((b"data: [DONE]\n\n", False))
    return out


def _error_event(wire: str) -> bytes:
    if wire == "anthropic":
        return _sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error")
    if wire == "ollama":
        return b'{"error":"fake provider error mid-stream"}\n'
    return _sse({"error": {"message": "fake provider error mid-stream", "type": "server_error",
                           "param": None, "code": None}})


def _response(conn: h11.Connection, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    return conn.send(h11.Response(status_code=status, headers=headers,
                                  reason=_REASONS.get(status, b"")))


_ROUTES = {  # path -> the one method it serves
    b"/v1/chat/completions": b"POST",
    b"/v1/messages": b"POST",
    b"/api/chat": b"POST",
    b"/v1/embeddings": b"POST",
    b"/api/embed": b"POST",
    b"/_fake/control": b"POST",
    b"/v1/models": b"GET",
    b"/healthz": b"GET",
    b"/_fake/requests": b"GET",
    b"/_fake/reset": b"POST",
}
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class FakeProvider:
    def __init__(self, settings: FakeSettings = FakeSettings(), *,
                 max_records: int = 100_000) -> None:
        self.settings = settings  # read once per request, so tests may swap it at run time
        self.records: list[RequestRecord] = []
        self.port: int | None = None
        self._max_records = max_records  # benchmarks run millions of requests: keep the newest
        self._next_id = 1
        self._record_added = trio.Event()
        self.control = FakeControl()  # run-time faults: POST /_fake/control (see module docstring)
        self._control_seen = 0  # requests since the control last changed (fail_percent's sequence)

    # -- helpers for tests --

    def record_for(self, predicate: Callable[[RequestRecord], bool]) -> RequestRecord | None:
        return next((r for r in self.records if predicate(r)), None)

    async def wait_for_records(self, n: int) -> list[RequestRecord]:
        """Wait until at least n records exist (bound it with trio.fail_after)."""
        while len(self.records) < n:
            await self._record_added.wait()
        return self.records

    def reset(self) -> None:
        self.records.clear()

    def set_control(self, **changes: Any) -> FakeControl:
        """Merge `changes` over the current control; `reset=True` starts from none."""
        base = FakeControl() if changes.pop("reset", False) else self.control
        self.control = dataclasses.replace(base, **changes)
        self._control_seen = 0
        return self.control

    def _controlled(self, settings: FakeSettings) -> tuple[FakeSettings, str | None]:
        """The settings with the run-time control applied, and the error message it imposes."""
        control = self.control
        if control.hang:
            return dataclasses.replace(settings, hang_before_headers=True), None
        if control.revoke_key:
            return dataclasses.replace(settings, status=401), "Incorrect API key provided (revoked)."
        if control.fail_percent:
            self._control_seen += 1
            n, p = self._control_seen, control.fail_percent
            if n * p // 100 > (n - 1) * p // 100:  # evenly spread: exactly p of every 100
                return dataclasses.replace(settings, status=control.fail_status), None
        return settings, None

    def _add_record(self, record: RequestRecord) -> None:
        if len(self.records) >= self._max_records:
            del self.records[: max(1, self._max_records // 10)]  # trim in batches: amortised O(1)
        self.records.append(record)
        self._record_added.set()
        self._record_added = trio.Event()

    # -- serving --

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        if port == 0:  # each address family would get its own random port: keep one
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._exchange(stream, conn):
                conn.start_next_cycle()
        except Exception as exc:  # one bad connection must never take the server down
            log.debug("fake provider: connection ended by %r", exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """Serve one request; True if the connection may carry another."""
        request, body = None, bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(_Exchange(stream, conn, False), 400, f"malformed HTTP: {exc}")
                return False
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:  # curl waits for this before big bodies
                    continue_ = h11.InformationalResponse(status_code=100, headers=[])
                    await stream.send_all(conn.send(continue_))
                conn.receive_data(await stream.receive_some(_RECV_BYTES))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    await self._reject(_Exchange(stream, conn, False), 413, "body too large")
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed: the client is done with this connection
                return False
        ex = _Exchange(stream, conn, request.method == b"HEAD")
        keep = await self._route(ex, request, bytes(body))
        return keep and conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _route(self, ex: _Exchange, request: h11.Request, body: bytes) -> bool:
        path = request.target.split(b"?", 1)[0]
        method = _ROUTES.get(path)
        if method is None:
            message = f"no route for {path.decode('latin-1')}"
            await self._send_json(ex, 404, _error_body(404, message))
        elif request.method != method:
            await self._send_json(ex, 405, _error_body(405, f"use {method.decode()}"),
                                  [(b"allow", method)])
        elif path in _CHAT_PATHS:
            ex.wire = _CHAT_PATHS[path]
            return await self._chat(ex, request, body)
        elif path in (b"/v1/embeddings", b"/api/embed"):
            ex.wire = "ollama" if path == b"/api/embed" else "openai"
            return await self._chat(ex, request, body)
        elif path == b"/_fake/control":
            try:
                changes = orjson.loads(body)
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                unknown = sorted(set(changes) - {"reset"} - {f.name for f in dataclasses.fields(FakeControl)})
                if unknown:
                    raise ValueError(f"unknown control keys {unknown}")
                control = self.set_control(**changes)
            except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                await self._send_json(ex, 400, _error_body(400, f"bad control: {exc}"))
            else:
                await self._send_json(ex, 200, dataclasses.asdict(control))
        elif path == b"/v1/models":
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fake"}
            await self._send_json(ex, 200, {"object": "list", "data": [model]})
        elif path == b"/healthz":
            await self._send_json(ex, 200, {"status": "ok"})
        elif path == b"/_fake/requests":
            await self._send_json(ex, 200, [r.to_json() for r in self.records])
        else:
            self.reset()
            await self._send_json(ex, 200, {"status": "ok"})
        return True

    async def _send_json(self, ex: _Exchange, status: int, obj: Any,
                         headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        body = orjson.dumps(obj)
        head = _response(ex.conn, status, [(b"content-type", b"application/json"),
                                           (b"content-length", b"%d" % len(body)), *headers])
        if ex.is_head:  # h11 rightly refuses a body on a HEAD response
            await ex.write(head + ex.conn.send(h11.EndOfMessage()), 0)
            return
        await ex.write(head + ex.conn.send(h11.Data(data=body)) + ex.conn.send(h11.EndOfMessage()),
                       len(body))

    async def _reject(self, ex: _Exchange, status: int, message: str) -> None:
        if ex.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send_json(ex, status, _error_body(status, message),
                                  [(b"connection", b"close")])

    # -- chat completions --

    async def _chat(self, ex: _Exchange, request: h11.Request, raw: bytes) -> bool:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        record = RequestRecord(
            id=self._next_id, path=request.target.decode("latin-1"), model=None, stream=False,
            status=200, authorization=headers.get("authorization"), headers=headers,
            body={}, started_at=trio.current_time())
        self._next_id += 1
        self._add_record(record)
        ex.record = record
        try:
            chat = self._plan(record, raw)
            await self._watching_peer(ex, chat)
            if ex.peer_gone and not record.completed:
                record.peer_closed_early = True
            return not (ex.peer_gone or ex.dropped)
        finally:
            record.ended_at = trio.current_time()
            record.closed.set()

    def _plan(self, record: RequestRecord, raw: bytes) -> _Chat | str:
        """The request decided, or the message of the 400 it gets."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            record.status = 400
            return f"malformed JSON body: {exc}"
        if isinstance(body, dict):
            record.body = body
            record.model = body.get("model") if isinstance(body.get("model"), str) else None
            record.stream = body.get("stream") is True
        settings, message = self._controlled(self.settings)
        if record.path.split("?", 1)[0] in ("/v1/embeddings", "/api/embed"):
            return self._plan_embeddings(record, body, settings, message)
        try:
            chat = _plan_chat(body, settings, ex_wire := self._wire_of(record))
        except _BadRequest as exc:
            record.status = 400
            return str(exc)
        if ex_wire == "ollama":
            record.stream = chat.stream  # Ollama streams unless told not to
        record.status = chat.settings.status
        return dataclasses.replace(chat, error_message=message) if message else chat

    @staticmethod
    def _wire_of(record: RequestRecord) -> str:
        return _CHAT_PATHS.get(record.path.split("?", 1)[0].encode(), "openai")

    def _plan_embeddings(self, record: RequestRecord, body: Any, settings: FakeSettings,
                         message: str | None) -> _Chat | str:
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            record.status = 400
            return "input must be a string or a non-empty list"
        texts = [i if isinstance(i, str) else " ".join(map(str, i)) for i in inputs]
        wire = "ollama" if record.path.startswith("/api/") else "openai"
        dims = body.get("dimensions") if _count(body.get("dimensions")) else 8
        record.status = settings.status
        return _Chat(settings=settings, model=record.model or MODEL_ID, stream=False, include_usage=False,
                     tokens=0, finish_reason="stop", prompt_tokens=sum(len(t.split()) for t in texts),
                     fault=None, wire=wire, embed_inputs=tuple(texts), embed_dims=dims,
                     error_message=message)

    async def _watching_peer(self, ex: _Exchange, chat: _Chat | str) -> None:
        """Respond while a second task reads the socket: EOF or reset cancels the response."""
        if _immediate(chat):  # nothing to wait for: a watcher would only cost (~20% of a request)
            await self._respond_once(ex, chat)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_peer, ex, nursery.cancel_scope)
            try:
                await self._respond_once(ex, chat)
            finally:
                nursery.cancel_scope.cancel()

    async def _respond_once(self, ex: _Exchange, chat: _Chat | str) -> None:
        try:
            await self._respond(ex, chat)
        except trio.BrokenResourceError:  # a failed write: the peer is gone
            ex.peer_gone = True
        except _Drop:
            ex.dropped = True

    @staticmethod
    async def _watch_peer(ex: _Exchange, scope: trio.CancelScope) -> None:
        read = 0
        try:
            while data := await ex.stream.receive_some(_RECV_BYTES):
                ex.conn.receive_data(data)  # a pipelined next request: h11 keeps it for later
                read += len(data)
                if read > _MAX_READ_AHEAD:
                    await trio.sleep_forever()
        except trio.BrokenResourceError:
            pass
        ex.peer_gone = True
        scope.cancel()

    async def _respond(self, ex: _Exchange, chat: _Chat | str) -> None:
        """Returns only once the whole response is written; faults raise or wait forever."""
        if isinstance(chat, str):
            await self._send_json(ex, 400, _error_body(400, chat, ex.wire))
        elif chat.settings.hang_before_headers:
            await trio.sleep_forever()  # the watcher ends this when the peer closes
        elif chat.settings.status != 200:
            s, headers = chat.settings, []
            if s.retry_after is not None:
                value = int(s.retry_after) if float(s.retry_after).is_integer() else s.retry_after
                headers.append((b"retry-after", str(value).encode()))
            await self._send_json(ex, s.status, _error_body(s.status, chat.error_message, chat.wire), headers)
        elif chat.embed_inputs:
            await self._send_json(ex, 200, _embeddings_body(chat))
        elif chat.stream and (chat.wire != "openai" or chat.tool_calls or chat.settings.error_after is not None):
            await self._stream_script(ex, chat)
        elif chat.stream:
            await self._stream(ex, chat)
        else:
            await self._complete(ex, chat)
        ex.record.completed = True

    async def _fault(self, kind: str) -> None:
        if kind == "drop":
            raise _Drop
        await trio.sleep_forever()  # stall: the watcher ends this when the peer closes

    async def _complete(self, ex: _Exchange, chat: _Chat) -> None:
        s, record = chat.settings, ex.record
        if s.ttft:
            await trio.sleep(s.ttft)
        n = chat.tokens
        body = orjson.dumps(_completion_body(chat, record.id))
        head = _response(ex.conn, 200, [(b"content-type", b"application/json"),
                                        (b"content-length", b"%d" % len(body))])
        if chat.fault:  # a JSON body is all-or-nothing: the fault takes the body's place
            await ex.write(head, 0)
            await self._fault(chat.fault[1])
        await ex.write(head + ex.conn.send(h11.Data(data=body)) + ex.conn.send(h11.EndOfMessage()),
                       len(body))
        record.tokens_sent = n

    async def _stream(self, ex: _Exchange, chat: _Chat) -> None:
        s, record, conn = chat.settings, ex.record, ex.conn
        prefix = b'data: {"id":"chatcmpl-fake-%d","object":"chat.completion.chunk","created":%d,' \
                 b'"model":%s,"choices":' % (record.id, int(time.time()), orjson.dumps(chat.model))
        role = prefix + (b'[{"index":0,"delta":{"role":"assistant","content":""},'
                         b'"finish_reason":null}]}\n\n')
        # Role chunk goes with the headers, before ttft, as OpenAI does.
        head = _response(conn, 200, _SSE_HEADERS)
        role_frame = conn.send(h11.Data(data=role))
        await ex.write(head + role_frame, len(role))

        # h11 chose the framing (chunked for HTTP/1.1, raw for HTTP/1.0) and its writer for it is
        # stateless, so token events are framed here the same way, once per distinct token: the
        # loop below only sends bytes. (Ten h11 sends per request cost more than the request.)
        chunked = role_frame != role
        tokens = (orjson.dumps(_token_text(s.token_bytes)),) if s.token_bytes else _WORD_JSON
        payloads = [prefix + b'[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n' % t
                    for t in tokens[: max(1, chat.tokens)]]
        frames = [b"%x\r\n%s\r\n" % (len(p), p) if chunked else p for p in payloads]
        sizes = [len(p) for p in payloads]
        kinds = len(frames)

        stop = chat.fault[0] if chat.fault else chat.tokens
        first = trio.current_time() + s.ttft
        sent = 0
        while sent < stop:
            due = first + sent * s.itl  # deadlines, not sleeps: no drift over long streams
            if due > trio.current_time():
                await trio.sleep_until(due)
            if s.itl:
                ready = min(stop, max(sent + 1, int((trio.current_time() - first) / s.itl) + 1))
            else:
                ready = stop
            batch, payload, end = [], 0, sent
            while end < ready and payload < _BATCH_BYTES:
                batch.append(frames[end % kinds])
                payload += sizes[end % kinds]
                end += 1
            await ex.write(batch[0] if len(batch) == 1 else b"".join(batch), payload)
            sent = record.tokens_sent = end

        if chat.fault:
            await self._fault(chat.fault[1])
        finish = chat.finish_reason.encode()
        tail = prefix + b'[{"index":0,"delta":{},"finish_reason":"%s"}]}\n\n' % finish
        if chat.include_usage:
            tail += prefix + b'[],"usage":%s}\n\n' % orjson.dumps(_usage_fields(chat))
        tail += b"data: [DONE]\n\n"
        await ex.write(conn.send(h11.Data(data=tail)) + conn.send(h11.EndOfMessage()), len(tail))


    async def _stream_script(self, ex: _Exchange, chat: _Chat) -> None:
        """Anthropic and Ollama streams, and OpenAI ones with tool calls or an error event.

        Simpler than `_stream` (one write per event): these paths serve tests, not benchmarks.
        """
        s, record, conn = chat.settings, ex.record, ex.conn
        events = _script(chat, record.id)
        content_type = b"application/x-ndjson" if chat.wire == "ollama" else b"text/event-stream"
        await ex.write(_response(conn, 200, [(b"content-type", content_type), (b"cache-control", b"no-cache")]), 0)
        first = trio.current_time() + s.ttft
        sent = 0
        for payload, is_token in events:
            if is_token:
                if chat.fault and sent >= chat.fault[0]:
                    await self._fault(chat.fault[1])
                if s.error_after is not None and sent >= s.error_after:
                    payload = _error_event(chat.wire)
                    await ex.write(conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()), len(payload))
                    return
                due = first + sent * s.itl
                if due > trio.current_time():
                    await trio.sleep_until(due)
                sent = record.tokens_sent = sent + 1
            await ex.write(conn.send(h11.Data(data=payload)), len(payload))
        await ex.write(conn.send(h11.EndOfMessage()), 0)


def _embeddings_body(chat: _Chat) -> dict[str, Any]:
    vectors = []
    for text in chat.embed_inputs:  # deterministic, distinct per text, unit-ish length
        seed = sum(text.encode()) + len(text)
        vectors.append([((seed * (i + 7)) % 97) / 97.0 for i in range(chat.embed_dims)])
    if chat.wire == "ollama":
        return {"model": chat.model, "embeddings": vectors, "prompt_eval_count": chat.prompt_tokens}
    return {"object": "list", "model": chat.model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": chat.prompt_tokens, "total_tokens": chat.prompt_tokens}}


_CHAT_PATHS = {b"/v1/chat/completions": "openai", b"/v1/messages": "anthropic", b"/api/chat": "ollama"}


# -- command line --

async def _run_cli(provider: FakeProvider, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(provider.serve, host, port)
            shown = f"[{host}]" if ":" in host else host
            print(f"fake provider listening on http://{shown}:{bound}/v1", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.testing.fake_provider",
                                     description="Fake LLM provider: OpenAI, Anthropic and Ollama wire formats.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    parser.add_argument("--itl", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per response")
    parser.add_argument("--token-bytes", type=int, default=0, help="bytes per token (0: words)")
    args = parser.parse_args(argv)
    try:
        settings = FakeSettings(ttft=args.ttft, itl=args.itl, tokens=args.tokens,
                                token_bytes=args.token_bytes)
    except ValueError as exc:
        parser.error(str(exc))
    trio.run(_run_cli, FakeProvider(settings), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
