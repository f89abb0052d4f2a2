"""Tool-call arguments checked against the tool's declared JSON schema (`tool_arguments = "validate"`).

Models, small local ones especially, sometimes emit arguments that are not JSON or do not fit the
schema. With "validate", a finished tool call with such arguments becomes a `ToolArgumentsInvalid`
error (502, retryable) instead of reaching the client as if it were fine.

`ToolCallChecker` is sans-IO: it accumulates each tool call's argument fragments (per choice and
tool index, in order) and, when a chunk carries that choice's finish_reason, validates them before
that chunk is passed on. The chunks before the finish go through unchanged, so a valid stream
costs two byte searches per chunk (a chunk is only parsed when it mentions tool_calls or has no
`"finish_reason":null`). `ValidatingAdapter` wraps a provider's adapter (`make_adapter` does it for
`tool_arguments = "validate"`): its stream parser runs the checker under the parser contract
(chunks before the error are returned, then `failed` is set) and its completions are checked
whole, so the failover loop and the endpoints need not know. The Anthropic passthrough path (chunks
with an `event`) is not checked: there the client and the provider share a format and the events go
verbatim.

The schema check is a deliberately small subset of JSON Schema, the part function schemas use:
type (incl. lists of types and "integer"), properties, required, additionalProperties (false or
a schema), items, enum, const, minimum/maximum, minLength/maxLength, minItems/maxItems, anyOf/oneOf/
allOf. Other keywords ($ref, pattern, format, ...) are not checked: a schema we do not understand
never rejects a call.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.core.errors import ToolArgumentsInvalid
from proxy.core.events import Chunk

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_error(value: Any, schema: Any, path: str = "$") -> str | None:
    """The first way `value` violates `schema`, or None."""
    if not isinstance(schema, dict):
        return None
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        checks = [_TYPES[t] for t in names if t in _TYPES]
        if checks and not any(check(value) for check in checks):
            return f"{path} must be {' or '.join(names)}"
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        return f"{path} must be one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{path} must be {schema['const']!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(schema.get("minimum"), (int, float)) and value < schema["minimum"]:
            return f"{path} must be >= {schema['minimum']}"
        if isinstance(schema.get("maximum"), (int, float)) and value > schema["maximum"]:
            return f"{path} must be <= {schema['maximum']}"
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            return f"{path} must be at least {schema['minLength']} characters"
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            return f"{path} must be at most {schema['maxLength']} characters"
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for name in schema.get("required") or ():
            if name not in value:
                return f"{path}.{name} is required"
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                if (error := schema_error(item, props[name], f"{path}.{name}")) is not None:
                    return error
            elif extra is False:
                return f"{path}.{name} is not allowed"
            elif isinstance(extra, dict) and (error := schema_error(item, extra, f"{path}.{name}")):
                return error
    if isinstance(value, list):
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            return f"{path} must have at least {schema['minItems']} items"
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            return f"{path} must have at most {schema['maxItems']} items"
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                if (error := schema_error(item, schema["items"], f"{path}[{i}]")) is not None:
                    return error
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and all(schema_error(value, s, path) for s in options):
            return f"{path} matches none of the {key} schemas"
    for sub in schema.get("allOf") or ():
        if (error := schema_error(value, sub, path)) is not None:
            return error
    return None


def arguments_error(arguments: Any, schema: Any) -> str | None:
    """Why `arguments` (the JSON text a model produced) do not fit `schema`, or None."""
    if isinstance(arguments, str):
        try:
            value = orjson.loads(arguments or "{}")
        except orjson.JSONDecodeError:
            return "arguments are not valid JSON"
    else:
        value = arguments
    return schema_error(value, schema if schema is not None else {"type": "object"})


def tool_schemas(body: dict[str, Any]) -> dict[str, Any]:
    """Tool name -> its parameters schema, from a canonical request body."""
    out = {}
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {"type": "object"}
    return out


def _check_call(schemas: dict[str, Any], name: Any, arguments: Any) -> None:
    if name not in schemas:
        raise ToolArgumentsInvalid(f"the model called tool {name!r}, which the request did not declare")
    if (error := arguments_error(arguments, schemas[name])) is not None:
        raise ToolArgumentsInvalid(f"the model's arguments for tool {name!r} are invalid: {error}")


def check_completion(completion: dict[str, Any], schemas: dict[str, Any]) -> None:
    for choice in completion.get("choices") or ():
        for call in (choice.get("message") or {}).get("tool_calls") or ():
            fn = call.get("function") or {}
            _check_call(schemas, fn.get("name"), fn.get("arguments"))


class ToolCallChecker:
    def __init__(self, schemas: dict[str, Any]):
        self._schemas = schemas
        self._calls: dict[tuple[int, int], list[Any]] = {}  # (choice, tool index) -> [name, fragments]

    def check(self, chunks: list[Chunk]) -> tuple[list[Chunk], ToolArgumentsInvalid | None]:
        """The chunks that may pass, and the error that stops the rest (if any)."""
        for i, chunk in enumerate(chunks):
            data = chunk.data
            if chunk.event is not None:
                continue  # passthrough is not checked here (see the module docstring)
            if data.find(b"tool_calls") < 0 and data.find(b'"finish_reason":null') >= 0:
                continue
            try:
                self._chunk(orjson.loads(data))
            except ToolArgumentsInvalid as error:
                return chunks[:i], error
        return chunks, None

    def _chunk(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            for call in (choice.get("delta") or {}).get("tool_calls") or ():
                entry = self._calls.setdefault((index, call.get("index", 0)), [None, []])
                fn = call.get("function") or {}
                if fn.get("name"):
                    entry[0] = fn["name"]
                if fn.get("arguments"):
                    entry[1].append(fn["arguments"])
            if choice.get("finish_reason"):
                for (c, _), (name, parts) in sorted(self._calls.items()):
                    if c == index:
                        _check_call(self._schemas, name, "".join(parts))


class _ValidatingParser:
    """A stream parser whose output passes a ToolCallChecker (same feed/close/failed contract)."""

    def __init__(self, parser: Any, checker: ToolCallChecker):
        self._parser = parser
        self._checker = checker
        self.failed: Any = None

    def _pass(self, chunks: list[Chunk]) -> list[Chunk]:
        if self.failed is not None:
            return []
        chunks, invalid = self._checker.check(chunks)
        self.failed = invalid or self._parser.failed
        return chunks

    def feed(self, data: bytes) -> list[Chunk]:
        return self._pass(self._parser.feed(data))

    def close(self) -> list[Chunk]:
        return self._pass(self._parser.close())


class ValidatingAdapter:
    """Wraps a provider adapter configured with `tool_arguments = "validate"` (see module docstring).

    Requests without tools pass straight through to the wrapped adapter's parser.
    """

    def __init__(self, adapter: Any):
        self._adapter = adapter
        self.name = adapter.name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._adapter, attr)

    def stream_parser(self, max_event_bytes: int, request: Any = None) -> Any:
        parser = self._adapter.stream_parser(max_event_bytes, request)
        schemas = tool_schemas(request.body) if request is not None else {}
        return _ValidatingParser(parser, ToolCallChecker(schemas)) if schemas else parser

    def parse_completion(self, body: bytes, request: Any = None) -> dict[str, Any]:
        completion = self._adapter.parse_completion(body, request)
        schemas = tool_schemas(request.body) if request is not None else {}
        if schemas:
            check_completion(completion, schemas)
        return completion
