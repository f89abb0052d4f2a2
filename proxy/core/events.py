"""The one event a streamed answer is made of, from the provider's adapter to the client's encoder.

Rules:
- A `Chunk` is made once, by the adapter that parsed the provider's bytes, and never changed after
  (`proxy/formats/`: provider wire -> chunks; `chat_api.py` / `messages_api.py`: chunks -> client);
  an encoder that needs another shape parses `data` into a dict of its own.
- `data` is JSON text. Without `event` it is a canonical chunk: an OpenAI `chat.completion.chunk`
  (usage in the shape of `proxy/core/usage.py`), either as the provider wrote it (OpenAI kinds:
  forwarded without a JSON round trip) or as the adapter serialized it. With `event` it is a
  provider-native event passed through unchanged (Anthropic to an Anthropic client), and only an
  encoder of that same format ever sees it.
- What the pipeline needs to know about a chunk without parsing it, the adapter says when it makes
  it: `visible` (failover holds chunks back until the first visible one, so that a switch of
  provider before it stays unseen) and `usage` (accounting; the encoder shows, translates or
  drops it).

Nothing here knows a wire format; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# Never changed once made, by rule rather than frozen=True: on CPython 3.11 a frozen dataclass's
# __init__ costs ~350 ns more (object.__setattr__ per field), +10-15% on the per-token cost of
# the OpenAI -> OpenAI path (parser + encoder; scripts/chunk_cost.py measures it).
@dataclass(slots=True)
class Chunk:
    data: bytes
    # Carries something the client must see: content, a tool call, a refusal, the finish reason,
    # a usage-only chunk, any passed-through event. False for e.g. the role-only first chunk.
    visible: bool = True
    # The canonical usage this chunk carries (the encoder re-renders such a chunk), else None.
    usage: dict[str, Any] | None = None
    # The provider-native event name, for an event passed through unchanged; else None.
    event: str | None = None
