"""`llm-gateway keys create|list|show|update|revoke|rotate|spend --config PATH`: virtual keys on the
store named by the config's [state], without the server running (or while it runs: a running
gateway sees the change within [state] refresh_interval).

Exit status: 0 done, 1 the key or the store was not found/usable, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import trio

from proxy.config import ConfigError, load_config
from proxy.core.errors import GatewayError
from proxy.keys.policy import make_store
from proxy.keys.records import KeyRecord, new_record, parse_fields, rotated
from proxy.keys.store import SPEND_GROUPS, Store, day_range, period_key


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)  # --config before or after the action
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="the gateway's TOML config (its [state] names the store)")
    parser.add_argument("--config", metavar="PATH", help="the gateway's TOML config (its [state] names the store)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_sub(common))

    def fields(p: argparse.ArgumentParser, creating: bool) -> None:
        p.add_argument("--name", required=creating)
        p.add_argument("--team")
        p.add_argument("--models", help="comma-separated model names or globs (default: every model)")
        p.add_argument("--rpm", type=int)
        p.add_argument("--tpm", type=int)
        p.add_argument("--max-parallel", type=int)
        p.add_argument("--budget-usd", type=float)
        p.add_argument("--budget-period", choices=("day", "month", "total"))
        p.add_argument("--expires-at", metavar="RFC3339")
        p.add_argument("--metadata", metavar="JSON", help="a JSON object")

    for name, creating in (("create", True), ("update", False)):
        p = sub.add_parser(name, help=f"{name} a key")
        if not creating:
            p.add_argument("id")
        fields(p, creating)
        p.add_argument("--json", action="store_true", help="print the key as JSON")
    sub.add_parser("list", help="list keys (never their secrets)").add_argument("--json", action="store_true")
    for name in ("show", "revoke", "rotate"):
        p = sub.add_parser(name, help=f"{name} a key")
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
    p = sub.add_parser("spend", help="spend grouped by key, team or model")
    p.add_argument("--group-by", choices=SPEND_GROUPS, default="key")
    p.add_argument("--period", default="month", help="day, month, total, YYYY-MM or YYYY-MM-DD")
    return parser


def _sub(common: argparse.ArgumentParser) -> type:
    class Sub(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, parents=[common], **kwargs)
    return Sub


def _body(args: argparse.Namespace) -> bytes:
    """The CLI's options as the admin API's JSON body, checked by the same code."""
    body: dict[str, Any] = {}
    for name in ("name", "team", "rpm", "tpm", "max_parallel", "budget_usd", "budget_period", "expires_at"):
        value = getattr(args, name, None)
        if value is not None:
            body[name] = value
    if args.models is not None:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.metadata is not None:
        try:
            body["metadata"] = json.loads(args.metadata)
        except ValueError:
            body["metadata"] = args.metadata  # parse_fields names it
    return json.dumps(body).encode()


class _Failed(Exception):
    pass


async def _get(store: Store, key_id: str) -> KeyRecord:
    record = await store.get_key(key_id)
    if record is None:
        raise _Failed(f"no key with id '{key_id}'")
    return record


async def _run(args: argparse.Namespace, store: Store) -> Any:
    action = args.action
    if action == "create":
        record, secret = new_record(parse_fields(_body(args), creating=True))
        await store.put_key(record)
        return {**record.public(), "key": secret}
    if action == "list":
        _, records = await store.load_keys()
        return [r.public() for r in sorted(records, key=lambda r: r.created_at)]
    if action == "spend":
        try:
            first, last = day_range(args.period)
        except ValueError:
            raise _Failed(f"--period: expected day, month, total, YYYY-MM or YYYY-MM-DD, got {args.period!r}")
        return [row.to_json() for row in await store.spend(args.group_by, first, last)]
    record = await _get(store, args.id)
    if action == "show":
        spend = await store.scope_spend(f"key:{record.id}", period_key(record.budget_period, time.time()))
        return {**record.public(), "spend_usd": spend}
    if record.revoked and action != "revoke":
        raise _Failed(f"key {record.id} is revoked")
    if action == "update":
        record = dataclasses.replace(record, **parse_fields(_body(args), creating=False))
        await store.put_key(record)
        return record.public()
    if action == "revoke":
        record = dataclasses.replace(record, revoked=True)
        await store.put_key(record)
        return record.public()
    record, secret = rotated(record)  # rotate
    await store.put_key(record)
    return {"id": record.id, "key": secret, "prefix": record.prefix}


async def _with_store(args: argparse.Namespace, store: Store) -> Any:
    await store.open()
    try:
        return await _run(args, store)
    finally:
        await store.aclose()


def _show(args: argparse.Namespace, result: Any) -> None:
    if getattr(args, "json", False) or args.action == "spend":
        print(json.dumps(result, indent=2))
        return
    if isinstance(result, list):
        for k in result:
            state = "revoked" if k["revoked"] else "active"
            print(f"{k['id']}  {k['prefix']}…  {state:7}  name={k['name']} team={k['team'] or '-'} "
                  f"models={','.join(k['models']) if k['models'] else '*'} rpm={k['rpm'] or '-'} "
                  f"tpm={k['tpm'] or '-'} budget={k['budget_usd'] if k['budget_usd'] is not None else '-'}"
                  f"/{k['budget_period']} expires={k['expires_at'] or '-'}")
        return
    if "key" in result:
        print(f"{result['id']}: {result['key']}\n(shown once: store it now; only its hash is kept)")
        return
    for name, value in result.items():
        print(f"{name}: {value}")


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config PATH is required")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not config.state.enabled:
        print(f"error: {args.config} has no [state] table: virtual keys are off", file=sys.stderr)
        return 2
    try:
        result = trio.run(_with_store, args, make_store(config))
    except _Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except GatewayError as e:  # a bad field (400) or the store (503)
        print(f"error: {e.message}", file=sys.stderr)
        return 2 if e.status == 400 else 1
    _show(args, result)
    return 0



