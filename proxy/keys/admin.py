"""The admin API of virtual keys and spend (master key only; the app refuses client keys: 403).

    POST   /admin/keys              {"name", "team"?, "models"?, "rpm"?, "tpm"?, "max_parallel"?,
                                     "budget_usd"?, "budget_period"?, "expires_at"?, "metadata"?}
                                    -> 201 {"id", "key", ...fields}   (the key is shown this once)
    GET    /admin/keys              -> {"data": [fields, ...]}       (never a secret or a hash)
    GET    /admin/keys/{id}         -> fields + "spend_usd" (the key's budget period so far)
    PATCH  /admin/keys/{id}         any of the fields -> the fields
    DELETE /admin/keys/{id}         revoke -> the fields ("revoked": true)
    POST   /admin/keys/{id}/rotate  -> {"id", "key"}                 (the old key stops working)
    GET    /admin/spend?group_by=key|team|model&period=day|month|total|YYYY-MM|YYYY-MM-DD
                                    -> {"data": [{"group", "spend_usd", "requests",
                                                  "input_tokens", "output_tokens"}]}

Every change is written to the store, then this process's view of the keys is refreshed at once
(other processes see it within [state] refresh_interval).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping
from urllib.parse import parse_qs

from proxy.core.errors import InvalidRequest, NotFound, clip
from proxy.keys.policy import KeysPolicy
from proxy.keys.records import KeyRecord, new_record, parse_fields, rotated
from proxy.keys.store import SPEND_GROUPS, day_range, period_key
from proxy.server.asgi import Receive, Send, send_json
from proxy.server.exchange import Exchange

log = logging.getLogger("proxy.keys.admin")

KEYS_PATH = "/admin/keys"
SPEND_PATH = "/admin/spend"


class KeysAdmin:
    def __init__(self, policy: KeysPolicy):
        self.policy = policy
        self.store = policy.store

    def routes(self) -> dict[str, dict[str, Any]]:
        """path -> {method: handler}; a path ending in "/" is a prefix."""
        return {KEYS_PATH: {"GET": self.list, "POST": self.create},
                KEYS_PATH + "/": {"GET": self.get, "PATCH": self.update, "DELETE": self.revoke,
                                  "POST": self.rotate},
                SPEND_PATH: {"GET": self.spend}}

    async def create(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        x.endpoint = "admin"
        record, secret = new_record(parse_fields(body, creating=True))
        await self.store.put_key(record)
        await self.policy.refresh()
        log.info("key %s created (name=%s team=%s)", record.id, clip(record.name), clip(record.team))
        await send_json(send, 201, {**record.public(), "key": secret}, x.response_headers)

    async def list(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                   send: Send) -> None:
        x.endpoint = "admin"
        _, records = await self.store.load_keys()
        records.sort(key=lambda r: r.created_at)
        await send_json(send, 200, {"object": "list", "data": [r.public() for r in records]}, x.response_headers)

    async def _record(self, x: Exchange, action: str | None = None) -> KeyRecord:
        rest = x.path[len(KEYS_PATH) + 1:]
        key_id, _, tail = rest.partition("/")
        if tail != (action or "") or not key_id:
            raise NotFound(f"Unknown path: {x.path}")
        record = await self.store.get_key(key_id)
        if record is None:
            raise NotFound(f"no key with id '{clip(key_id)}'")
        return record

    async def get(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                  send: Send) -> None:
        x.endpoint = "admin"
        record = await self._record(x)
        spend = await self.store.scope_spend(f"key:{record.id}", period_key(record.budget_period, time.time()))
        await send_json(send, 200, {**record.public(), "spend_usd": spend}, x.response_headers)

    async def update(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        x.endpoint = "admin"
        record = await self._record(x)
        fields = parse_fields(body, creating=False)
        if record.revoked:
            raise InvalidRequest(f"key {record.id} is revoked: create a new one", param="id")
        record = dataclasses.replace(record, **fields)
        await self.store.put_key(record)
        await self.policy.refresh()
        log.info("key %s updated (%s)", record.id, ", ".join(fields) or "nothing")
        await send_json(send, 200, record.public(), x.response_headers)

    async def revoke(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        x.endpoint = "admin"
        record = dataclasses.replace(await self._record(x), revoked=True)
        await self.store.put_key(record)
        await self.policy.refresh()
        log.warning("key %s revoked", record.id)
        await send_json(send, 200, record.public(), x.response_headers)

    async def rotate(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        x.endpoint = "admin"
        record = await self._record(x, "rotate")
        if record.revoked:
            raise InvalidRequest(f"key {record.id} is revoked: create a new one", param="id")
        record, secret = rotated(record)
        await self.store.put_key(record)
        await self.policy.refresh()
        log.warning("key %s rotated", record.id)
        await send_json(send, 200, {"id": record.id, "key": secret, "prefix": record.prefix}, x.response_headers)

    async def spend(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                    send: Send) -> None:
        x.endpoint = "admin"
        query = parse_qs((x.notes.get("query") or b"").decode("latin-1"))
        group_by = query.get("group_by", ["key"])[-1]
        if group_by not in SPEND_GROUPS:
            raise InvalidRequest(f"group_by: expected key, team or model, got {clip(repr(group_by))}",
                                 param="group_by")
        period = query.get("period", ["month"])[-1]
        try:
            first, last = day_range(period)
        except ValueError:
            raise InvalidRequest(f"period: expected day, month, total, YYYY-MM or YYYY-MM-DD, got "
                                 f"{clip(repr(period))}", param="period") from None
        rows = await self.store.spend(group_by, first, last)
        await send_json(send, 200, {"object": "list", "group_by": group_by, "period": period,
                                    "data": [r.to_json() for r in rows]}, x.response_headers)
