"""proxy.formats.tool_args alone: the schema subset, and the checker's place in a chunk stream."""

from __future__ import annotations

import orjson
import pytest

from proxy.core.errors import ToolArgumentsInvalid
from proxy.core.events import Chunk
from proxy.formats.tool_args import ToolCallChecker, arguments_error, check_completion, schema_error

SCHEMA = {"type": "object", "required": ["city"], "additionalProperties": False,
          "properties": {"city": {"type": "string", "minLength": 2},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7},
                         "unit": {"enum": ["C", "F"]},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                         "when": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}


@pytest.mark.parametrize("args", ['{"city": "Paris"}', '{"city": "Rome", "days": 3, "unit": "C"}',
                                  '{"city": "Oslo", "tags": ["a"], "when": null}', '{"city": "Nice", "days": 2.0}'])
async def test_valid_arguments(args):
    assert arguments_error(args, SCHEMA) is None


@pytest.mark.parametrize("args, why", [
    ('{"city": "Par', "not valid JSON"), ('[]', "$ must be object"), ('{}', "$.city is required"),
    ('{"city": 1}', "$.city must be string"), ('{"city": "P"}', "at least 2"),
    ('{"city": "Rome", "days": 9}', "<= 7"), ('{"city": "Rome", "days": true}', "must be integer"),
    ('{"city": "Rome", "unit": "K"}', "one of"), ('{"city": "Rome", "x": 1}', "$.x is not allowed"),
    ('{"city": "Rome", "tags": ["a", 2]}', "$.tags[1] must be string"),
    ('{"city": "Rome", "tags": ["a", "b", "c"]}', "at most 2 items"),
    ('{"city": "Rome", "when": 5}', "none of the anyOf"),
])
async def test_invalid_arguments_say_why(args, why):
    assert why in arguments_error(args, SCHEMA)


async def test_unknown_keywords_never_reject():
    assert schema_error("x", {"type": "string", "pattern": "^[0-9]+$", "format": "email", "$ref": "#/a"}) is None


def chunk(delta=None, finish=None):
    return Chunk(orjson.dumps({"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}))


async def test_checker_stops_before_the_finish_chunk():
    checker = ToolCallChecker({"f": SCHEMA})
    first = [chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"ci'}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": 5}'}}]})]
    passed, error = checker.check(first)
    assert passed == first and error is None  # fragments flow while the call is unfinished
    passed, error = checker.check([chunk({"content": "x"}), chunk(finish="tool_calls"), chunk()])
    assert len(passed) == 1 and isinstance(error, ToolArgumentsInvalid)
    assert "$.city must be string" in error.message and error.code == "tool_arguments_invalid"


async def test_checker_passes_valid_and_plain_chunks():
    checker = ToolCallChecker({"f": SCHEMA})
    chunks = [Chunk(b'{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'),
              chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"city": "Rome"}'}}]}),
              chunk(finish="tool_calls")]
    assert checker.check(chunks) == (chunks, None)


async def test_completion_check():
    ok = {"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": '{"city": "Rome"}'}}]}}]}
    check_completion(ok, {"f": SCHEMA})
    with pytest.raises(ToolArgumentsInvalid, match="did not declare"):
        check_completion(ok, {"g": SCHEMA})
