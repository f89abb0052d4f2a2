"""ASGI plumbing shared by the endpoints: message types, JSON responses, bounded body reads.

Nothing here knows an endpoint or a wire format; the endpoints and the app import it, never the
other way round.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, TypeVar

import orjson
import trio

from proxy.core.errors import GatewayError, PayloadTooLarge

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client disconnected before we answered: nothing to send, nothing to log as an error."""


async def send_json(send: Send, status: int, body: Any, headers: Headers = ()) -> None:
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": JSON_HEADERS + [(b"content-length", str(len(data)).encode())] + list(headers)})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def read_body(headers: Mapping[bytes, bytes], receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `limit` bytes."""
    length = headers.get(b"content-length", b"")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)
        if length.isdigit() and len(body) == int(length):
            # Every declared byte is here (the server frames the body by Content-Length): the
            # last, empty message is not waited for. Each receive() is a scheduler round, and
            # under load a round on a new request's way is a turn of every other stream.
            return bytes(body)


async def until_disconnect(receive: Receive, call: Callable[[], Awaitable[T]]) -> T:
    """Run `call` unless the client disconnects first (then cancel it and raise ClientGone)."""
    result: T | None = None
    error: GatewayError | None = None
    gone = False

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            result = await call()
        except GatewayError as e:
            error = e
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if gone:
        raise ClientGone()
    return result  # type: ignore[return-value]
