"""Ollama (`POST {base_url}/api/chat`, `/api/embed`): canonical <-> Ollama, NDJSON streams.

Request: messages keep their roles; content parts collapse to text plus `images` (base64, from
data: URLs; Ollama takes no image URLs, so those are refused with a 400); assistant tool_calls
carry their arguments as objects, as Ollama wants; sampling options move under `options`
(`max_tokens` -> `num_predict`, `stop`, `temperature`, `top_p`, `seed`); `tools` are OpenAI's
shape already. No key is needed; if one is configured it is sent as Bearer (auth proxies).

Stream: one JSON object per line. Content lines become content deltas; a line's `tool_calls`
(Ollama sends each call whole) become one tool_calls delta each, with a generated id and the
arguments serialized; the `done` line gives the finish reason (`tool_calls` if any call was made,
`length` for done_reason "length") and usage from `prompt_eval_count`/`eval_count`. A line with
`error` fails the stream; a line longer than `max_event_bytes` too.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import orjson

from proxy.core.request import ChatRequest
from proxy.config import ProviderConfig
from proxy.core.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamRateLimited, UpstreamStatusError
from proxy.core.events import Chunk
from proxy.formats import WireRequest, canonical_chunk, json_answer
from proxy.core.usage import usage


class OllamaAdapter:
    def __init__(self, config: ProviderConfig, api_key: str | None):
        self.name = config.name
        self._chat_url = config.base_url + "/api/chat"
        self._embed_url = config.base_url + "/api/embed"
        self._headers = [("content-type", "application/json"), *config.headers]
        if api_key:
            self._headers.append(("authorization", f"Bearer {api_key}"))

    def chat_request(self, request: ChatRequest, model: str) -> WireRequest:
        return WireRequest("POST", self._chat_url, self._headers, orjson.dumps(to_ollama(request.body, model)))

    def stream_parser(self, max_event_bytes: int, request: ChatRequest | None = None) -> "OllamaStreamParser":
        return OllamaStreamParser(self.name, max_event_bytes)

    def parse_completion(self, body: bytes, request: ChatRequest | None = None) -> dict[str, Any]:
        reply = json_answer(self.name, body, "message", dict, "a response without a message")
        message = reply["message"]
        calls = [_call(i, c) for i, c in enumerate(message.get("tool_calls") or ())]
        out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ("" if not calls else None)}
        if calls:
            out["tool_calls"] = calls
        return {"id": f"chatcmpl-ollama-{time.time_ns():x}", "object": "chat.completion",
                "created": int(time.time()), "model": reply.get("model"),
                "choices": [{"index": 0, "message": out, "finish_reason": _finish(reply, bool(calls))}],
                "usage": usage(reply.get("prompt_eval_count") or 0, reply.get("eval_count") or 0)}

    def parse_error(self, status: int, headers: Mapping[str, str], body: bytes) -> GatewayError:
        try:
            err = orjson.loads(body).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            err = None
        message = f"provider {self.name}: {err}" if isinstance(err, str) else \
            f"provider {self.name} returned HTTP {status}"
        if status == 429:
            return UpstreamRateLimited(message, retry_after=headers.get("retry-after"))
        if status >= 500:
            return UpstreamStatusError(message, status=status, type="api_error", code="upstream_error")
        return UpstreamStatusError(message, status=status, type="invalid_request_error",
                                   code="model_not_found" if status == 404 else None)

    def embeddings_request(self, body: dict[str, Any], model: str) -> WireRequest:
        out: dict[str, Any] = {"model": model, "input": body["input"]}
        if body.get("dimensions") is not None:
            out["dimensions"] = body["dimensions"]
        return WireRequest("POST", self._embed_url, self._headers, orjson.dumps(out))

    def parse_embeddings(self, body: bytes) -> dict[str, Any]:
        reply = json_answer(self.name, body, "embeddings", list, "no embeddings")
        prompt = reply.get("prompt_eval_count") or 0
        return {"object": "list", "model": reply.get("model"),
                "data": [{"object": "embedding", "index": i, "embedding": e}
                         for i, e in enumerate(reply["embeddings"])],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def _call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments", {})
    return {"id": call.get("id") or f"call_{index}", "type": "function",
            "function": {"name": fn.get("name"),
                         "arguments": args if isinstance(args, str) else orjson.dumps(args).decode()}}


def _finish(reply: dict[str, Any], called: bool) -> str:
    if called:
        return "tool_calls"
    return "length" if reply.get("done_reason") == "length" else "stop"


def _message(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m["role"] if m["role"] != "developer" else "system"}
    content = m.get("content")
    if isinstance(content, list):
        texts, images = [], []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not (isinstance(url, str) and url.startswith("data:") and ";base64," in url):
                    raise InvalidRequest("ollama deployments take images only as base64 data: URLs",
                                         param="messages")
                images.append(url.partition(";base64,")[2])
        out["content"] = "".join(texts)
        if images:
            out["images"] = images
    else:
        out["content"] = content or ""
    if m.get("tool_calls"):
        out["tool_calls"] = []
        for call in m["tool_calls"]:
            fn = call.get("function") or {}
            try:
                args = orjson.loads(fn.get("arguments") or "{}")
            except (orjson.JSONDecodeError, TypeError):
                args = {}
            out["tool_calls"].append({"function": {"name": fn.get("name"), "arguments": args}})
    if m["role"] == "tool" and m.get("name"):
        out["tool_name"] = m["name"]
    return out


def to_ollama(body: dict[str, Any], model: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "messages": [_message(m) for m in body["messages"]],
                           "stream": bool(body.get("stream"))}
    options: dict[str, Any] = {}
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if cap:
        options["num_predict"] = cap
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    for key in ("temperature", "top_p", "seed"):
        if body.get(key) is not None:
            options[key] = body[key]
    if options:
        out["options"] = options
    if body.get("tools"):
        out["tools"] = body["tools"]
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["format"] = "json"
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["format"] = (fmt.get("json_schema") or {}).get("schema", "json")
    return out


class OllamaStreamParser:
    """Ollama NDJSON -> canonical chunks."""

    def __init__(self, provider: str, max_event_bytes: int):
        self._provider = provider
        self._max = max_event_bytes
        self._buf = bytearray()
        self._id = f"chatcmpl-ollama-{time.time_ns():x}"  # Ollama answers carry no id
        self._created = int(time.time())
        self._started = False
        self._calls = 0
        self._done = False
        self.failed: GatewayError | None = None

    def feed(self, data: bytes) -> list[Chunk]:
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        chunks = self._lines(lines)
        if self.failed is None and len(self._buf) > self._max:
            self.failed = UpstreamError(f"provider {self._provider}: stream line larger than {self._max} bytes")
        return chunks

    def close(self) -> list[Chunk]:
        chunks = self._lines([bytes(self._buf)])
        self._buf = bytearray()
        if self.failed is None and not self._done:
            self.failed = UpstreamError(f"provider {self._provider} ended the stream before it was complete")
        return chunks

    def _chunk(self, model: Any, delta: dict[str, Any] | None, finish: str | None = None,
               usage_: dict[str, Any] | None = None) -> Chunk:
        return canonical_chunk(self._id, self._created, model, delta, finish, usage_)

    def _lines(self, lines: list) -> list[Chunk]:
        chunks: list[Chunk] = []
        for line in lines:
            line = bytes(line).strip()
            if not line:
                continue
            if self._done or self.failed is not None:
                break
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.failed = UpstreamError(f"provider {self._provider} sent a line that is not JSON")
                break
            if not isinstance(obj, dict):
                self.failed = UpstreamError(f"provider {self._provider} sent a line that is not an object")
                break
            if "error" in obj:
                self.failed = UpstreamError(f"provider {self._provider}: {obj['error']}")
                break
            model, message = obj.get("model"), obj.get("message") or {}
            if not self._started:
                self._started = True
                chunks.append(self._chunk(model, {"role": "assistant", "content": ""}))
            if message.get("content"):
                chunks.append(self._chunk(model, {"content": message["content"]}))
            for call in message.get("tool_calls") or ():
                c = _call(self._calls, call)
                c["index"] = self._calls
                self._calls += 1
                chunks.append(self._chunk(model, {"tool_calls": [c]}))
            if obj.get("done"):
                self._done = True
                chunks.append(self._chunk(model, {}, _finish(obj, self._calls > 0)))
                chunks.append(self._chunk(model, None, usage_=usage(obj.get("prompt_eval_count") or 0,
                                                                    obj.get("eval_count") or 0)))
        return chunks
