"""Virtual keys: the record, the secret, and the checks of what an admin sends.

Rules: a key is `sk-gw-` + 32 random bytes (base64url); it is shown once, at creation or rotation,
and only its sha256 is stored (the key is random: no salt or slow hash needed). A key is named by
a short public id (`key_` + 12 hex) and shown by its first characters (`prefix`). Every field an
admin sends is checked here; a bad one is a 400 naming the field.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import orjson

from proxy.core.errors import InvalidRequest, clip

KEY_PREFIX = "sk-gw-"
SHOWN_PREFIX = 12        # characters of the key kept to recognise it ("sk-gw-AbC123")
PERIODS = ("day", "month", "total")
MAX_NAME = 200
MAX_MODELS = 100
MAX_METADATA_BYTES = 16 * 1024


def new_secret() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def new_id() -> str:
    return "key_" + os.urandom(6).hex()


def hash_secret(secret: str | bytes) -> str:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    hash: str
    prefix: str
    name: str
    team: str | None = None
    models: tuple[str, ...] | None = None   # None = every model; entries are exact names or globs
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None         # streams open at once
    budget_usd: float | None = None
    budget_period: str = "month"
    expires_at: float | None = None         # epoch seconds
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    revoked: bool = False

    def allows(self, model: str) -> bool:
        if self.models is None:
            return True
        return any(model == m or fnmatch.fnmatchcase(model, m) for m in self.models)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def limited(self) -> bool:
        """Needs the store at admission (anything counted across workers)."""
        return bool(self.rpm or self.tpm or self.max_parallel or self.budget_usd is not None)

    def public(self) -> dict[str, Any]:
        """The fields an admin sees: never the hash."""
        return {"id": self.id, "prefix": self.prefix, "name": self.name, "team": self.team,
                "models": list(self.models) if self.models is not None else None, "rpm": self.rpm,
                "tpm": self.tpm, "max_parallel": self.max_parallel, "budget_usd": self.budget_usd,
                "budget_period": self.budget_period, "expires_at": rfc3339(self.expires_at),
                "metadata": self.metadata, "created_at": rfc3339(self.created_at), "revoked": self.revoked}

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["models"] = None if self.models is None else orjson.dumps(list(self.models)).decode()
        row["metadata"] = orjson.dumps(self.metadata).decode()
        row["revoked"] = int(self.revoked)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "KeyRecord":
        row = dict(row)
        row["models"] = None if row.get("models") in (None, "") else tuple(orjson.loads(row["models"]))
        row["metadata"] = orjson.loads(row["metadata"]) if row.get("metadata") else {}
        row["revoked"] = bool(int(row.get("revoked") or 0))
        for name in ("rpm", "tpm", "max_parallel"):
            row[name] = None if row.get(name) in (None, "") else int(row[name])
        for name in ("budget_usd", "expires_at", "created_at"):
            row[name] = None if row.get(name) in (None, "") else float(row[name])
        row["team"] = row.get("team") or None
        return cls(**{k: row[k] for k in cls.__slots__ if k in row})  # type: ignore[attr-defined]


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")


# -- what an admin sends (POST creates, PATCH changes some fields) --

def _bad(field_name: str, value: Any, expected: str) -> InvalidRequest:
    return InvalidRequest(f"{field_name}: expected {expected}, got {clip(repr(value))}", param=field_name)


def _text(name: str, v: Any, *, optional: bool) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_NAME or not v.isprintable():
        raise _bad(name, v, f"a printable string of 1..{MAX_NAME} characters")
    return v


def _positive_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _bad(name, v, "an integer >= 1 or null")
    return v


def _usd(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _bad(name, v, "a number of USD >= 0 or null")
    return float(v)


def _models(name: str, v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if (not isinstance(v, list) or len(v) > MAX_MODELS
            or not all(isinstance(m, str) and m and len(m) <= MAX_NAME for m in v)):
        raise _bad(name, v, f"a list of at most {MAX_MODELS} model names or globs, or null")
    return tuple(v)


def _period(name: str, v: Any) -> str:
    if v not in PERIODS:
        raise _bad(name, v, '"day", "month" or "total"')
    return v


def _expires(name: str, v: Any) -> float | None:
    if v is None:
        return None
    try:
        when = datetime.fromisoformat(v) if isinstance(v, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise _bad(name, v, 'an RFC 3339 time with a zone ("2026-12-31T23:59:59Z") or null')
    return when.timestamp()


def _metadata(name: str, v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(orjson.dumps(v)) > MAX_METADATA_BYTES:
        raise _bad(name, v, f"a JSON object of at most {MAX_METADATA_BYTES} bytes")
    return v


_FIELDS = {
    "name": lambda n, v: _text(n, v, optional=False),
    "team": lambda n, v: _text(n, v, optional=True),
    "models": _models,
    "rpm": _positive_int,
    "tpm": _positive_int,
    "max_parallel": _positive_int,
    "budget_usd": _usd,
    "budget_period": _period,
    "expires_at": _expires,
    "metadata": _metadata,
}


def parse_fields(body: bytes, *, creating: bool) -> dict[str, Any]:
    """The checked fields of a POST (creating) or PATCH body; 400 naming the first bad field."""
    try:
        raw = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body must be a JSON object", param="body") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("the body must be a JSON object", param="body")
    for name in raw:
        if name not in _FIELDS:
            raise InvalidRequest(f"{clip(name)}: no such field (known: {', '.join(_FIELDS)})", param=clip(name))
    if creating and "name" not in raw:
        raise InvalidRequest("name: required", param="name")
    return {name: _FIELDS[name](name, value) for name, value in raw.items()}


def new_record(fields: dict[str, Any], now: float | None = None) -> tuple[KeyRecord, str]:
    """A new key from checked fields, and its secret (shown once)."""
    secret = new_secret()
    record = KeyRecord(id=new_id(), hash=hash_secret(secret), prefix=secret[:SHOWN_PREFIX],
                       created_at=time.time() if now is None else now, **fields)
    return record, secret


def rotated(record: KeyRecord) -> tuple[KeyRecord, str]:
    secret = new_secret()
    return replace(record, hash=hash_secret(secret), prefix=secret[:SHOWN_PREFIX]), secret
