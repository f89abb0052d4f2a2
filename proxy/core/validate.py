"""Request bodies checked against the published API shapes, once, at ingress. Sans-IO, no I/O.

Three shapes: OpenAI Chat Completions (`check_chat`), OpenAI Embeddings (`check_embeddings`) and
the top level of Anthropic Messages (`check_messages`; its messages and content blocks are checked
while they are translated, in `proxy/formats/messages_api.py`, with the same `fail`).

Rules:
- Every documented field present in the body is checked for its type and its documented range
  (temperature 0..2, n 1..128, ...); a violation is a 400 `invalid_request_error` whose `param`
  is the field's path (`messages[2].role`, `tools[0].function.name`) and whose message says what
  was expected and what kind of JSON value came instead — never the value itself, so nothing a
  client sends is echoed unbounded.
- Fields we do not know pass through untouched (new API parameters, a compatible server's own
  extensions such as vLLM's `top_k`), and so do content part types we do not know. `null` is
  accepted for every optional top-level field, as the APIs do.
- Adapters may rely on what is checked here: after it, translating a request cannot fail on a
  wrong type. That is what keeps client input from ever looking like a provider failure.
- Cheap: a typical 10-message chat request costs a few microseconds (tests/test_validation.py
  measures it); a message of just role and content takes the short path.
"""

from __future__ import annotations

from typing import Any, Callable

from proxy.core.errors import InvalidRequest, clip

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
ROLE_SET = frozenset(ROLES)
_PLAIN_ROLES = frozenset({"system", "developer", "user", "assistant"})  # role and text are all they need
MAX_MODEL_CHARS = 256  # longer names are refused rather than echoed and logged
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's documented bound on an input array

_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
          float: "a number", type(None): "null"}


def fail(where: str, expected: str, value: Any = ...) -> None:
    """Raise the 400 for `where`; `value` (what came instead) is named by its JSON kind only."""
    got = "" if value is ... else f", not {_KINDS.get(type(value), 'that')}"
    raise InvalidRequest(f"'{where}' must be {expected}{got}", param=where)


def _range(where: str, expected: str, value: Any) -> None:
    raise InvalidRequest(f"'{where}' must be {expected}, not {clip(value, 40)}", param=where)


# -- value checks: each takes (value, where) and raises, or returns None --

def string(value: Any, where: str) -> None:
    if type(value) is not str:
        fail(where, "a string", value)


def boolean(value: Any, where: str) -> None:
    if type(value) is not bool:
        fail(where, "a boolean", value)


def obj(value: Any, where: str) -> None:
    if type(value) is not dict:
        fail(where, "an object", value)


def integer(low: int | None = None, high: int | None = None) -> Callable[[Any, str], None]:
    expected = "an integer" + (f" from {low} to {high}" if high is not None else
                               f" >= {low}" if low is not None else "")

    def check(value: Any, where: str) -> None:
        if type(value) is not int:
            fail(where, expected, value)
        if low is not None and value < low or high is not None and value > high:
            _range(where, expected, value)
    return check


def number(low: float, high: float) -> Callable[[Any, str], None]:
    expected = f"a number from {low:g} to {high:g}"

    def check(value: Any, where: str) -> None:
        if type(value) is not int and type(value) is not float:
            fail(where, expected, value)
        if not low <= value <= high:
            _range(where, expected, value)
    return check


def one_of(*choices: str) -> Callable[[Any, str], None]:
    expected = "one of " + ", ".join(f"'{c}'" for c in choices)

    def check(value: Any, where: str) -> None:
        if type(value) is not str:
            fail(where, expected, value)
        if value not in choices:
            _range(where, expected, value)
    return check


def array_of(item: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if type(value) is not list:
            fail(where, "an array", value)
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")
    return check


def fields(spec: dict[str, Callable[[Any, str], None]], *,
           required: tuple[str, ...] = ()) -> Callable[[Any, str], None]:
    """An object whose known keys are checked (unknown keys pass); `required` must be present."""
    def check(value: Any, where: str) -> None:
        if type(value) is not dict:
            fail(where, "an object", value)
        for key in required:
            if key not in value:
                fail(f"{where}.{key}", "present")
        for key, v in value.items():
            if (c := spec.get(key)) is not None:
                c(v, f"{where}.{key}")
    return check


def either(*checks: tuple[type, Callable[[Any, str], None]], expected: str) -> Callable[[Any, str], None]:
    """Chosen by the value's JSON type (str, list, dict ...); any other type fails."""
    by_type = dict(checks)

    def check(value: Any, where: str) -> None:
        c = by_type.get(type(value))
        if c is None:
            fail(where, expected, value)
        c(value, where)
    return check


def nullable(check: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def inner(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)
    return inner


def _any(value: Any, where: str) -> None:
    pass


def non_empty_string(value: Any, where: str) -> None:
    if type(value) is not str or not value:
        fail(where, "a non-empty string", value)


def check_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    non_empty_string(model, "model")
    if len(model) > MAX_MODEL_CHARS:
        _range("model", f"at most {MAX_MODEL_CHARS} characters", f"{len(model)} characters")
    return model


# -- OpenAI Chat Completions --

def _part(kinds: dict[str, Callable[[Any, str], None]], strict: bool) -> Callable[[Any, str], None]:
    """A content part: an object with a string `type`; known types checked, others pass unless
    `strict` (system, developer and tool messages take text parts only)."""
    names = ", ".join(f"'{k}'" for k in kinds)

    def check(value: Any, where: str) -> None:
        if type(value) is not dict:
            fail(where, "an object (a content part)", value)
        kind = value.get("type")
        c = kinds.get(kind) if type(kind) is str else None
        if c is None:
            if type(kind) is not str or strict:
                fail(f"{where}.type", f"one of {names}", kind)
            return
        c(value, where)
    return check


_TEXT_PART = fields({"text": string}, required=("text",))
_IMAGE_URL = fields({"url": string, "detail": one_of("auto", "low", "high")}, required=("url",))
_USER_PARTS = {
    "text": _TEXT_PART,
    "image_url": fields({"image_url": _IMAGE_URL}, required=("image_url",)),
    "input_audio": fields({"input_audio": fields({"data": string, "format": string},
                                                 required=("data", "format"))}, required=("input_audio",)),
    "file": fields({"file": fields({"file_data": string, "file_id": string, "filename": string})},
                   required=("file",)),
}
_TEXT_CONTENT = either((str, _any), (list, array_of(_part({"text": _TEXT_PART}, True))),
                       expected="a string or an array of text parts")
_USER_CONTENT = either((str, _any), (list, array_of(_part(_USER_PARTS, False))),
                       expected="a string or an array of content parts")
_ASSISTANT_CONTENT = either(
    (str, _any), (type(None), _any),
    (list, array_of(_part({"text": _TEXT_PART, "refusal": fields({"refusal": string}, required=("refusal",))},
                          False))),
    expected="a string, an array of content parts or null")
_FUNCTION = fields({"name": non_empty_string, "arguments": string}, required=("name", "arguments"))
_CUSTOM_CALL = fields({"name": non_empty_string, "input": string}, required=("name",))


def _tool_call(value: Any, where: str) -> None:
    if type(value) is not dict:
        fail(where, "an object (a tool call)", value)
    string(value.get("id"), f"{where}.id")
    kind = value.get("type", "function")
    if kind == "custom":
        _CUSTOM_CALL(value.get("custom"), f"{where}.custom")
    elif kind == "function":
        _FUNCTION(value.get("function"), f"{where}.function")
    else:
        fail(f"{where}.type", "'function' or 'custom'", kind)


# role -> (content check, content required, the other keys' checks)
_MESSAGE_KEYS: dict[str, Callable[[Any, str], None]] = {"name": string}
_ROLE_RULES: dict[str, tuple[Callable[[Any, str], None], bool, dict[str, Callable[[Any, str], None]]]] = {
    "system": (_TEXT_CONTENT, True, _MESSAGE_KEYS),
    "developer": (_TEXT_CONTENT, True, _MESSAGE_KEYS),
    "user": (_USER_CONTENT, True, _MESSAGE_KEYS),
    "assistant": (_ASSISTANT_CONTENT, False, {
        "name": string, "refusal": nullable(string), "audio": nullable(fields({"id": string})),
        "tool_calls": nullable(array_of(_tool_call)), "function_call": nullable(_FUNCTION)}),
    "tool": (_TEXT_CONTENT, True, {"tool_call_id": string}),
    "function": (nullable(string), False, {"name": string}),
}


_ROLE = one_of(*ROLES)


def _message(m: Any, where: str) -> None:
    if type(m) is not dict:
        fail(where, "an object (a message)", m)
    role = m.get("role")
    _ROLE(role, f"{where}.role")
    content = m.get("content")
    content_check, required, keys = _ROLE_RULES[role]
    if content is None and "content" not in m:
        if required:
            fail(f"{where}.content", "present")
    else:
        content_check(content, f"{where}.content")
    if role == "tool" and "tool_call_id" not in m:
        fail(f"{where}.tool_call_id", "present")
    if role == "function" and "name" not in m:
        fail(f"{where}.name", "present")
    for key, value in m.items():
        if (c := keys.get(key)) is not None:
            c(value, f"{where}.{key}")


_SCHEMA_FORMAT = fields({"name": non_empty_string, "description": string, "schema": obj,
                         "strict": nullable(boolean)}, required=("name",))


def _response_format(value: Any, where: str) -> None:
    obj(value, where)
    kind = value.get("type")
    one_of("text", "json_object", "json_schema")(kind, f"{where}.type")
    if kind == "json_schema":
        _SCHEMA_FORMAT(value.get("json_schema"), f"{where}.json_schema")


_FUNCTION_DEF = fields({"name": non_empty_string, "description": string, "parameters": obj,
                        "strict": nullable(boolean)}, required=("name",))


def _tool(value: Any, where: str) -> None:
    if type(value) is not dict:
        fail(where, "an object (a tool)", value)
    kind = value.get("type", "function")
    if kind == "function":
        _FUNCTION_DEF(value.get("function"), f"{where}.function")
    elif kind == "custom":
        fields({"name": non_empty_string, "description": string}, required=("name",))(
            value.get("custom"), f"{where}.custom")
    else:
        fail(f"{where}.type", "'function' or 'custom'", kind)


_NAMED = fields({"name": non_empty_string}, required=("name",))


def _tool_choice(value: Any, where: str) -> None:
    if type(value) is str:
        one_of("none", "auto", "required")(value, where)
        return
    obj(value, where)
    kind = value.get("type")
    if kind == "function":
        _NAMED(value.get("function"), f"{where}.function")
    elif kind == "custom":
        _NAMED(value.get("custom"), f"{where}.custom")
    elif kind == "allowed_tools":
        fields({"mode": one_of("auto", "required"), "tools": array_of(obj)}, required=("mode", "tools"))(
            value.get("allowed_tools"), f"{where}.allowed_tools")
    else:
        fail(f"{where}.type", "'function', 'custom' or 'allowed_tools'", kind)


def _function_call(value: Any, where: str) -> None:
    if type(value) is str:
        one_of("none", "auto")(value, where)
    else:
        _NAMED(value, where)


def _logit_bias(value: Any, where: str) -> None:
    obj(value, where)
    bias = number(-100, 100)
    for token, v in value.items():
        bias(v, f"{where}.{clip(token, 40)}")


def _metadata(value: Any, where: str) -> None:
    obj(value, where)
    for key, v in value.items():
        string(v, f"{where}.{clip(key, 40)}")


_STRING_OR_STRINGS = either((str, _any), (list, array_of(string)),
                            expected="a string or an array of strings")

CHAT_FIELDS: dict[str, Callable[[Any, str], None]] = {
    "audio": obj,
    "frequency_penalty": number(-2, 2),
    "function_call": _function_call,
    "functions": array_of(_FUNCTION_DEF),
    "logit_bias": _logit_bias,
    "logprobs": boolean,
    "max_completion_tokens": integer(1),
    "max_tokens": integer(1),
    "metadata": _metadata,
    "modalities": array_of(one_of("text", "audio")),
    "n": integer(1, 128),
    "parallel_tool_calls": boolean,
    "prediction": fields({"type": one_of("content"), "content": _TEXT_CONTENT}, required=("type", "content")),
    "presence_penalty": number(-2, 2),
    "prompt_cache_key": string,
    "reasoning_effort": string,
    "response_format": _response_format,
    "safety_identifier": string,
    "seed": integer(),
    "service_tier": string,
    "stop": _STRING_OR_STRINGS,
    "store": boolean,
    "stream": boolean,
    "stream_options": fields({"include_usage": boolean, "include_obfuscation": boolean}),
    "temperature": number(0, 2),
    "tool_choice": _tool_choice,
    "tools": array_of(_tool),
    "top_logprobs": integer(0, 20),
    "top_p": number(0, 1),
    "user": string,
    "verbosity": one_of("low", "medium", "high"),
    "web_search_options": obj,
}


def check_chat(body: dict[str, Any]) -> None:
    """An OpenAI Chat Completions body (`model` already checked)."""
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        fail("messages", "a non-empty array", messages if "messages" in body else ...)
    for i, m in enumerate(messages):
        if type(m) is dict and len(m) == 2 and type(m.get("content")) is str \
                and type(role := m.get("role")) is str and role in _PLAIN_ROLES:
            continue  # the common message, checked inline (a dict or list role is unhashable)
        _message(m, f"messages[{i}]")
    for key, value in body.items():
        if value is not None and (c := CHAT_FIELDS.get(key)) is not None:
            c(value, key)


# -- OpenAI Embeddings --

def _embedding_input(value: Any, where: str) -> None:
    expected = "a non-empty string, an array of strings, or an array of token arrays"
    if type(value) is str:
        if not value:
            fail(where, expected)
        return
    if type(value) is not list or not value:
        fail(where, expected, value)
    if len(value) > MAX_EMBEDDING_INPUTS:
        _range(where, f"an array of at most {MAX_EMBEDDING_INPUTS} items", f"{len(value)} items")
    first = type(value[0])
    for i, v in enumerate(value):
        if first is str:
            ok = type(v) is str and v != ""
        elif first is int:
            ok = type(v) is int and v >= 0
        else:
            ok = type(v) is list and bool(v) and all(type(t) is int and t >= 0 for t in v)
        if not ok:
            fail(f"{where}[{i}]", "like the first item: a non-empty string, a token (an integer >= 0) "
                 "or a non-empty array of tokens", v)


EMBEDDINGS_FIELDS: dict[str, Callable[[Any, str], None]] = {
    "encoding_format": one_of("float", "base64"),
    "dimensions": integer(1),
    "user": string,
}


def check_embeddings(body: dict[str, Any]) -> None:
    """An OpenAI Embeddings body (`model` already checked)."""
    if "input" not in body:
        fail("input", "present")
    _embedding_input(body["input"], "input")
    for key, value in body.items():
        if value is not None and (c := EMBEDDINGS_FIELDS.get(key)) is not None:
            c(value, key)


# -- Anthropic Messages: the top level (messages and blocks: proxy/formats/messages_api.py) --

def _thinking(value: Any, where: str) -> None:
    obj(value, where)
    kind = value.get("type")
    one_of("enabled", "disabled")(kind, f"{where}.type")
    if kind == "enabled":
        integer(1)(value.get("budget_tokens"), f"{where}.budget_tokens")


MESSAGES_FIELDS: dict[str, Callable[[Any, str], None]] = {
    "max_tokens": integer(1),
    "stop_sequences": array_of(string),
    "stream": boolean,
    "temperature": number(0, 1),
    "top_p": number(0, 1),
    "top_k": integer(0),
    "metadata": fields({"user_id": nullable(string)}),
    "service_tier": string,
    "thinking": _thinking,
    "tools": array_of(obj),
    "tool_choice": obj,
}


def check_messages(body: dict[str, Any]) -> None:
    """The top-level fields of an Anthropic Messages body (`model` already checked)."""
    if "max_tokens" not in body:
        fail("max_tokens", "present")
    for key, value in body.items():
        if value is not None and (c := MESSAGES_FIELDS.get(key)) is not None:
            c(value, key)
