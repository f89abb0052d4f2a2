"""What a request's cache entry is called, and whether the request may use the cache at all.

The key is a hash of what determines the answer, in a canonical form: the JSON of the request's
fields with sorted keys (key order and whitespace never matter), minus the fields that change
only the delivery (`stream`, `stream_options`) or the bookkeeping (`user`, `metadata`, `store`,
`service_tier`). The model is the one the client asked for (before a cost tier picks a group).
Each tenant has its own namespace (a team's, else a key's, else the shared default one), and the
endpoint is part of the key: a /v1/messages answer may hold Anthropic's own events, which only
an Anthropic client can be sent.

Which requests use the cache (`Directive`): in mode "deterministic" only those whose answer is
meant to repeat (temperature 0, or a seed), in mode "all" every one; embeddings always. The
client decides per request with `x-gateway-cache: use` (cache it even if not deterministic),
`skip` (neither read nor write), `refresh` (do not read, write the new answer), and with
`cache-control`: `no-cache` reads nothing (refresh), `no-store` writes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from proxy.core.errors import InvalidRequest

# Fields that do not change what the model answers.
DELIVERY_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier"})
HEADER = b"x-gateway-cache"
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class Directive:
    read: bool   # look the request up
    write: bool  # store its answer


SKIP = Directive(False, False)
USE = Directive(True, True)


def namespace(team: str | None, key_id: str | None) -> str:
    """A team's keys share answers; a key without a team has its own; no key (open or master
    access) uses the default namespace. Prefixed, so a team and a key of the same name differ."""
    if team:
        return "team:" + team
    if key_id:
        return "key:" + key_id
    return DEFAULT_NAMESPACE


def cache_key(space: str, endpoint: str, model: str, body: Mapping[str, Any], extra: Any = None) -> str:
    material = {k: v for k, v in body.items() if k not in DELIVERY_FIELDS}
    material["model"] = model
    digest = hashlib.blake2b(orjson.dumps([endpoint, material, extra], option=orjson.OPT_SORT_KEYS),
                             digest_size=20).hexdigest()
    return f"{space}:{endpoint}:{digest}"


def deterministic(body: Mapping[str, Any]) -> bool:
    """Temperature 0 or a seed: the client means the answer to repeat."""
    seed = body.get("seed")
    return body.get("temperature") == 0 or (isinstance(seed, int) and not isinstance(seed, bool))


def directive(headers: Mapping[bytes, bytes], cache_all: bool, is_deterministic: bool) -> Directive:
    """What to do for one request; a bad x-gateway-cache value is a 400 naming the header."""
    asked = headers.get(HEADER)
    control = headers.get(b"cache-control")
    if asked is None and control is None:  # the common case: two dict lookups
        return USE if cache_all or is_deterministic else SKIP
    read = write = cache_all or is_deterministic
    if asked is not None:
        value = asked.strip().lower()
        if value == b"use":
            read = write = True
        elif value == b"skip":
            read = write = False
        elif value == b"refresh":
            read, write = False, True
        else:
            raise InvalidRequest("x-gateway-cache must be one of use, skip, refresh", param="x-gateway-cache")
    if control is not None:
        tokens = {t.strip().split(b"=")[0] for t in control.lower().split(b",")}
        if b"no-cache" in tokens:
            read = False
        if b"no-store" in tokens:
            write = False
    return Directive(read, write)
