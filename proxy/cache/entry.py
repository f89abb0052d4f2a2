"""A cache entry: one answer as the gateway relayed it, and how it is told again.

A streamed answer is kept as its chunk sequence (`proxy/core/events.py`: the canonical chunks,
usage chunk included, or Anthropic's own events on /v1/messages passthrough) and replayed through
the endpoint's own encoder, so the client's SDK sees what it saw the first time, usage included
when it asked for it. A plain answer is kept as its canonical completion (or embeddings result).
Either serves either: a plain request is answered from a stream's chunks (gathered into a
completion) and a streamed one from a completion (cut into the chunks a provider would send).

On the wire to a store an entry is one JSON document (`encode`/`decode`); `decode` refuses any
document that is not exactly what `encode` writes (`CorruptEntry`), and the caller drops it.
Replays are fast by default: the first chunks up to the first visible one go out alone (time to
first token), then the rest in batches growing to `REPLAY_BATCH` chunks (fewer, larger writes),
with a scheduler turn between batches. With `[cache] replay = "original"` a stream is recorded with
the time of each upstream read (`offsets`: seconds after the first read) and replayed with the same
gaps between reads: the first read at once, then the answer as fast as the provider wrote it. An
entry without offsets (a plain answer, or written while replays were fast) replays fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from proxy.core.events import Chunk
from proxy.formats import ANTHROPIC_MESSAGE, canonical_chunk
from proxy.formats.anthropic import to_completion

FORMAT = 1
REPLAY_BATCH = 512
FIRST_BATCH = 32
CHUNK_OVERHEAD = 64  # bytes counted per chunk beyond its data (its JSON framing in a store)


class CorruptEntry(ValueError):
    pass


@dataclass(slots=True, eq=False)
class Entry:
    endpoint: str                          # "chat", "messages", "embeddings"
    stored_at: float                       # time.time() when written
    chunks: list[Chunk] | None = None      # a streamed answer, as relayed
    completion: dict[str, Any] | None = None  # a plain answer
    size: int = 0                          # bytes it takes in a store (its encoded length)
    offsets: list[float] | None = None     # per chunk: seconds after the first upstream read
                                           # (before the writer: the reads' times, see `flatten`)


def chunks_size(chunks: list[Chunk]) -> int:
    return sum(len(c.data) for c in chunks) + CHUNK_OVERHEAD * len(chunks)


def encode(entry: Entry) -> bytes:
    chunks = None
    if entry.chunks is not None:
        chunks = [[c.data.decode(), c.visible, c.usage, c.event] for c in entry.chunks]
    doc = {"v": FORMAT, "e": entry.endpoint, "t": entry.stored_at, "c": chunks, "p": entry.completion}
    if entry.offsets is not None:
        doc["o"] = [round(o * 1000) for o in entry.offsets]  # milliseconds: compact, and enough
    return orjson.dumps(doc)


def decode(raw: bytes) -> Entry:
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") != FORMAT:
            raise CorruptEntry("not a cache entry of this version")
        endpoint, stored_at, chunks, completion = doc["e"], doc["t"], doc["c"], doc["p"]
        if not isinstance(endpoint, str) or not isinstance(stored_at, (int, float)):
            raise CorruptEntry("bad endpoint or time")
        if (chunks is None) == (completion is None) or (completion is not None and not isinstance(completion, dict)):
            raise CorruptEntry("neither or both of chunks and completion")
        parsed = None
        if chunks is not None:
            parsed = [Chunk(data.encode(), visible, usage, event) for data, visible, usage, event in chunks]
            if not parsed or not all(isinstance(c.visible, bool) and (c.usage is None or isinstance(c.usage, dict))
                                     and (c.event is None or isinstance(c.event, str)) for c in parsed):
                raise CorruptEntry("bad chunks")
        offsets = doc.get("o")
        if offsets is not None:
            if (parsed is None or not isinstance(offsets, list) or len(offsets) != len(parsed)
                    or not all(type(o) is int and o >= 0 for o in offsets)
                    or any(a > b for a, b in zip(offsets, offsets[1:]))):
                raise CorruptEntry("bad offsets")
            offsets = [o / 1000 for o in offsets]
    except CorruptEntry:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptEntry(f"unreadable: {type(e).__name__}") from None
    return Entry(endpoint, float(stored_at), parsed, completion, len(raw), offsets)


def flatten(reads: Any, times: Any = None) -> tuple[list[Chunk], list[float] | None]:
    """A recording (proxy/cache/policy.py `recorder`: one item per upstream read, and with
    replay = "original" the time of each) -> the entry's chunks, and their offsets."""
    if times is None:
        return [chunk for chunks in reads for chunk in chunks], None
    first = times[0] if times else 0.0
    chunks, offsets = [], []
    for at, batch in zip(times, reads):
        chunks += batch
        offsets += [at - first] * len(batch)
    return chunks, offsets


# -- a stream's chunks -> a completion --

def completion_of(chunks: list[Chunk]) -> dict[str, Any]:
    if chunks and chunks[0].event is not None:
        message = anthropic_message(chunks)
        completion = to_completion(message)
        completion[ANTHROPIC_MESSAGE] = message
        return completion
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        data = orjson.loads(chunk.data)
        if not head:
            head = data
        if chunk.usage is not None and isinstance(data.get("usage"), dict):
            usage = data["usage"]
        for choice in data.get("choices") or ():
            slot = choices.setdefault(choice.get("index", 0), {"content": [], "tools": {}, "finish": None,
                                                             "refusal": []})
            delta = choice.get("delta") or {}
            if delta.get("content"):
                slot["content"].append(delta["content"])
            if delta.get("refusal"):
                slot["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                tool = slot["tools"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                      "function": {"name": "", "arguments": ""}})
                tool["id"] = call.get("id") or tool["id"]
                fn = call.get("function") or {}
                tool["function"]["name"] += fn.get("name") or ""
                tool["function"]["arguments"] += fn.get("arguments") or ""
            slot["finish"] = choice.get("finish_reason") or slot["finish"]
    out_choices = []
    for index in sorted(choices):
        slot = choices[index]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(slot["content"]) or None}
        if slot["refusal"]:
            message["refusal"] = "".join(slot["refusal"])
        if slot["tools"]:
            message["tool_calls"] = [slot["tools"][i] for i in sorted(slot["tools"])]
        out_choices.append({"index": index, "message": message, "finish_reason": slot["finish"] or "stop",
                            "logprobs": None})
    completion = {"id": head.get("id"), "object": "chat.completion", "created": head.get("created"),
                  "model": head.get("model"), "choices": out_choices}
    if usage is not None:
        completion["usage"] = usage
    return completion


def anthropic_message(chunks: list[Chunk]) -> dict[str, Any]:
    """Anthropic's own stream events -> the message a non-streaming call would have returned."""
    message: dict[str, Any] = {"type": "message", "role": "assistant", "content": []}
    partial: dict[int, list[str]] = {}
    for chunk in chunks:
        data = orjson.loads(chunk.data)
        kind = data.get("type")
        if kind == "message_start":
            message.update(data.get("message") or {})
            message["content"] = []
        elif kind == "content_block_start":
            message["content"].append(dict(data.get("content_block") or {}))
        elif kind == "content_block_delta" and message["content"]:
            index = data.get("index", len(message["content"]) - 1)
            block, delta = message["content"][min(index, len(message["content"]) - 1)], data.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif kind == "input_json_delta":
                partial.setdefault(index, []).append(delta.get("partial_json", ""))
            elif kind == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            elif kind == "signature_delta":
                block["signature"] = delta.get("signature")
        elif kind == "message_delta":
            message.update({k: v for k, v in (data.get("delta") or {}).items() if k in ("stop_reason", "stop_sequence")})
            message["usage"] = {**(message.get("usage") or {}), **(data.get("usage") or {})}
    for index, parts in partial.items():
        try:
            message["content"][index]["input"] = orjson.loads("".join(parts) or "{}")
        except (orjson.JSONDecodeError, IndexError):
            pass
    return message


# -- a completion -> a stream's chunks --

def chunks_of(completion: dict[str, Any]) -> list[Chunk]:
    """The chunks a provider streaming this completion would have sent (content in one piece)."""
    id_, created, model = completion.get("id"), completion.get("created") or int(time.time()), completion.get("model")
    out = []
    for choice in completion.get("choices") or ():
        index, message = choice.get("index", 0), choice.get("message") or {}
        role = canonical_chunk(id_, created, model, {"role": "assistant", "content": ""})
        out.append(role if index == 0 else _at(role, index))
        if message.get("content"):
            out.append(_at(canonical_chunk(id_, created, model, {"content": message["content"]}), index))
        if message.get("refusal"):
            out.append(_at(canonical_chunk(id_, created, model, {"refusal": message["refusal"]}), index))
        calls = [dict(call, index=i) for i, call in enumerate(message.get("tool_calls") or ())]
        if calls:
            out.append(_at(canonical_chunk(id_, created, model, {"tool_calls": calls}), index))
        out.append(_at(canonical_chunk(id_, created, model, {}, choice.get("finish_reason") or "stop"), index))
    if isinstance(completion.get("usage"), dict):
        out.append(canonical_chunk(id_, created, model, None, usage=completion["usage"]))
    return out


def _at(chunk: Chunk, index: int) -> Chunk:
    if index == 0:
        return chunk
    data = orjson.loads(chunk.data)
    data["choices"][0]["index"] = index
    return Chunk(orjson.dumps(data), chunk.visible, chunk.usage)


class Replay:
    """An entry as the endpoint's answer (proxy/server/exchange.py `Answer`)."""

    __slots__ = ("entry", "paced")

    def __init__(self, entry: Entry, paced: bool = False):
        self.entry = entry
        self.paced = paced and entry.offsets is not None

    async def stream(self, emit) -> None:
        if self.paced:
            await self._paced(emit)
            return
        chunks = self.entry.chunks if self.entry.chunks is not None else chunks_of(self.entry.completion)
        first = next((i for i, c in enumerate(chunks) if c.visible), len(chunks) - 1) + 1
        await emit(chunks[:first])
        start, size = first, FIRST_BATCH
        while start < len(chunks):
            # A turn for the others before each batch: emit does not wait while the client keeps
            # up, so without it the writer sends the first token only after the whole answer is
            # encoded, and every other stream waits that long too. Batches grow (32, 64 .. 512
            # chunks): small while the first bytes go out, then fewer, larger writes (1,000 chunks:
            # 6 writes; 1.36 ms of CPU a hit against 1.61 with batches up to 128, 1.63 in one write).
            await trio.sleep(0)
            await emit(chunks[start:start + size])
            start, size = start + size, min(size * 2, REPLAY_BATCH)

    async def _paced(self, emit) -> None:
        """The chunks of each original read together, each read at its original offset."""
        chunks, offsets = self.entry.chunks, self.entry.offsets
        start = trio.current_time()
        i = 0
        while i < len(chunks):
            j = i + 1
            while j < len(chunks) and offsets[j] == offsets[i]:
                j += 1
            await trio.sleep_until(start + offsets[i])
            await emit(chunks[i:j])
            i = j

    def completion(self) -> dict[str, Any]:
        if self.entry.completion is not None:
            return dict(self.entry.completion)  # the endpoint may set keys (embeddings' model)
        return completion_of(self.entry.chunks)
