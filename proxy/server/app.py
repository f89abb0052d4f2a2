"""The ASGI application: routing, auth, body limits, and the one place errors become responses.

Endpoints: POST /v1/chat/completions (stream or not), POST /v1/messages (Anthropic format, stream
or not; `x-api-key` or Bearer; Anthropic-shaped errors), POST /v1/embeddings, GET /v1/models,
GET /healthz.
Every failure is a `proxy.errors.GatewayError`; `__call__` turns it into an OpenAI-shaped JSON
response with its status and a log line (never with secrets: headers are not logged).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any, Awaitable, Callable, Mapping

import orjson
import trio

from proxy.server import chat
from proxy.server import embeddings
from proxy.server import messages
from proxy.config import Config, check_environment
from proxy.core.errors import (AuthenticationFailed, Forbidden, GatewayError, InvalidRequest, MethodNotAllowed,
                     NotFound, PayloadTooLarge)
from proxy.formats import make_adapter
from proxy.server.pump import Receive, Relay, Send
from proxy.routing.router import Router
from proxy.transport.upstream import Upstream

log = logging.getLogger("proxy.server.app")

JSON_HEADERS = [(b"content-type", b"application/json")]


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class ClientGone(Exception):
    """The client disconnected before we answered: nothing to send, nothing to log as an error."""


async def send_json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": JSON_HEADERS + [(b"content-length", str(len(data)).encode())] + list(headers)})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def read_body(scope: Mapping[str, Any], receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
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


class Gateway:
    def __init__(self, config: Config, environ: Mapping[str, str] = os.environ):
        check_environment(config, environ)
        self.config = config
        env = config.auth.master_key_env
        self._master_key = (environ.get(env) or None) if env else None
        self.router = Router(config)
        self.upstream = Upstream(config.providers)
        self.adapters = {name: make_adapter(p, environ.get(p.api_key_env) if p.api_key_env else None)
                         for name, p in config.providers.items()}
        self.relays: set[Relay] = set()  # open streams: drained on shutdown, counted in metrics
        self.draining = False
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {
            "/healthz": {"GET": self._healthz},
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/messages": {"POST": self._messages},
            "/v1/embeddings": {"POST": self._embeddings},
            "/admin/routing": {"GET": self._admin_routing},
            "/admin/bypass": {"POST": self._admin_bypass},
        }

    @property
    def auth_enabled(self) -> bool:
        return self._master_key is not None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            self._enter()
            try:
                await self._http(scope, receive, send)
            finally:
                self._leave()

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            methods = self._routes.get(scope["path"])
            if methods is None:
                raise NotFound(f"Unknown path: {scope['path']}")
            handler = methods.get(scope["method"])
            if handler is None:
                allow = ", ".join(methods)
                raise MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']} (use {allow})",
                                       allow=allow)
            if scope["path"].startswith("/v1/"):
                self._authenticate(scope)
            elif scope["path"].startswith("/admin/"):
                if self._master_key is None:
                    raise Forbidden("admin endpoints need a master key: set the variable named by "
                                    "[auth] master_key_env")
                self._authenticate(scope)
            await handler(scope, receive, send)
        except ClientGone:
            log.info("%s %s client disconnected before the response", scope["method"], scope["path"])
        except GatewayError as error:
            level = logging.WARNING if error.status >= 500 else logging.INFO
            log.log(level, "%s %s -> %d %s: %s (%.1f ms)", scope["method"], scope["path"], error.status,
                    error.code or error.type, error.message, (time.perf_counter() - started) * 1000)
            # /v1/messages speaks Anthropic, errors included (the anthropic SDK maps them to its classes)
            body = error.to_anthropic_body() if scope["path"] == "/v1/messages" else error.to_body()
            await send_json(send, error.status, body, error.headers())

    def _authenticate(self, scope: Mapping[str, Any]) -> None:
        if self._master_key is None:
            return
        given, api_key = b"", b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
            elif name == b"x-api-key" and scope["path"] == "/v1/messages":
                api_key = value  # the anthropic SDK's way; Bearer works there too
        scheme, _, token = given.partition(b" ")
        if api_key and not given:
            scheme, token = b"bearer", api_key
        if scheme.lower() != b"bearer" or not token:
            also = " or 'x-api-key: <key>'" if scope["path"] == "/v1/messages" else ""
            raise AuthenticationFailed(f"Missing API key: send 'Authorization: Bearer <key>'{also}.")
        if not hmac.compare_digest(token.strip(), self._master_key.encode()):
            raise AuthenticationFailed("Incorrect API key provided.")

    async def _admin_routing(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.router.snapshot(trio.current_time()))

    async def _admin_bypass(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        """POST {"enabled": true|false}: the run-time BYPASS_ROUTER switch."""
        body = await read_body(scope, receive, 4096)
        try:
            enabled = orjson.loads(body)["enabled"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            enabled = None
        if not isinstance(enabled, bool):
            raise InvalidRequest('expected a JSON body {"enabled": true|false}', param="enabled")
        self.router.bypass = enabled
        log.warning("router bypass %s via /admin/bypass", "ON" if enabled else "off")
        await send_json(send, 200, {"bypass": enabled})

    async def _healthz(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        if self.draining:
            await send_json(send, 503, {"status": "draining"})
        else:
            await send_json(send, 200, {"status": "ok", "open_streams": len(self.relays)})

    async def _models(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
                for name in self.router.model_names()]
        await send_json(send, 200, {"object": "list", "data": data})

    async def _chat(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive, self.config.server.max_body_bytes)
        await chat.handle(self, body, receive, send,
                          requested_deployment=header(scope, b"x-gateway-deployment"))

    async def _messages(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive, self.config.server.max_body_bytes)
        await messages.handle(self, body, receive, send, anthropic_beta=header(scope, b"anthropic-beta"),
                              requested_deployment=header(scope, b"x-gateway-deployment"))

    async def _embeddings(self, scope: Mapping[str, Any], receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive, self.config.server.max_body_bytes)
        await embeddings.handle(self, body, receive, send)

    # -- drain: the server asks us to stop (proxy/server.py) --

    def _enter(self) -> None:
        self._active += 1
        if self._active == 1:
            self._idle = trio.Event()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def abort_streams(self, error: GatewayError) -> None:
        for relay in list(self.relays):
            relay.abort(error)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.upstream.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
