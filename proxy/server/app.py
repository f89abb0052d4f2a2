"""The ASGI application: routes, auth, body limits, and the one place errors become responses.

Endpoints: POST /v1/chat/completions and POST /v1/messages (one chat endpoint, two client
formats), POST /v1/embeddings, GET /v1/models, GET /healthz, GET /admin/routing, POST /admin/bypass.
`Gateway` builds the parts once (router, upstream, adapters, failover, open streams) and hands each
endpoint only the parts it uses. Every failure is a `proxy.core.errors.GatewayError`; `__call__`
turns it into a JSON response in the route's client format (Anthropic's on /v1/messages) with its
status and a log line (never with secrets: headers are not logged).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

import orjson
import trio

from proxy import observability
from proxy.cache.policy import ResponseCache, admin_statistics
from proxy.routing.tiers import TierPolicy
from proxy.accounting.policy import AccountingPolicy
from proxy.config import Config, check_environment
from proxy.core.errors import (MAX_MESSAGE, AdminOnly, AuthenticationFailed, Forbidden, GatewayError, InvalidRequest,
                               MethodNotAllowed, NotFound, clip)
from proxy.formats import make_adapter
from proxy.keys.admin import KeysAdmin
from proxy.keys.policy import KeysPolicy
from proxy.formats.chat_api import ChatAPI
from proxy.formats.messages_api import MessagesAPI
from proxy.routing.failover import Failover
from proxy.routing.router import Router
from proxy.server.asgi import ClientGone, Receive, Send, read_body, send_json
from proxy.server.endpoints import ChatEndpoint, EmbeddingsEndpoint
from proxy.server.exchange import MASTER, OPEN, Exchange, Policies, Principal, request_id, request_id_var
from proxy.server.streams import Streams
from proxy.transport.upstream import Upstream

log = logging.getLogger("proxy.server.app")

# A handler answers, and returns None; or, for a stream, returns the relay's coroutine, which the
# app awaits: the handler's frame then does not live as long as the stream (see _http).
Handler = Callable[[Exchange, bytes, dict[bytes, bytes], Receive, Send], Awaitable[Awaitable[None] | None]]


@dataclass(frozen=True, slots=True)
class Route:
    methods: Mapping[str, Handler]
    auth: str = "client"             # "client" (the master key, if set), "admin" (it must be set), "none"
    body: bool = True                # read the whole body (bounded) before the handler runs
    api_key_header: bytes | None = None  # a second header that may carry the key (Anthropic's x-api-key)
    error_body: Callable[[GatewayError], dict[str, Any]] = GatewayError.to_body


class Gateway:
    def __init__(self, config: Config, environ: Mapping[str, str] = os.environ, *, demo: bool = False):
        check_environment(config, environ)
        self.config = config
        # Demo mode (`serve --demo`): no master key, yet /admin/* and the dashboard answer clients
        # on loopback, so the demo shows everything the gateway has (never on another interface).
        self.demo = demo
        env = config.auth.master_key_env
        self._master_key = (environ.get(env) or None) if env else None
        self.router = Router(config, environ=environ)
        self.upstream = Upstream(config.providers, queue_timeout=config.router.queue_timeout)
        self.adapters = {name: make_adapter(p, environ.get(p.api_key_env) if p.api_key_env else None)
                         for name, p in config.providers.items()}
        self.streams = Streams(config.server)  # open streams: drained on shutdown, counted
        self.draining = False
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        # Per-request policies (keys, limits, cache, metrics ...): beside routing, see exchange.py.
        self.policies = Policies()
        self.keys = KeysPolicy(config) if config.state.enabled else None  # virtual keys, limits: proxy/keys/
        if self.keys is not None:
            self.policies.add(self.keys, Policies.KEYS)
        self.policies.add(AccountingPolicy(config), 15)  # tokens, context window, cost: proxy/accounting/
        if config.tiers:  # cost-aware routing: model aliases sorted into tiers (proxy/routing/tiers.py)
            budget_of = self.keys.last_remaining if self.keys is not None else None  # the budget floor
            self.policies.add(TierPolicy(config, budget_of), Policies.TIERS)
        self.cache = ResponseCache(config.cache) if config.cache.enabled else None  # proxy/cache/
        if self.cache is not None:
            self.policies.add(self.cache, Policies.CACHE)
        failover = Failover(self.router, self.upstream, self.adapters, config.server.max_event_bytes)
        chat, messages = ChatEndpoint(ChatAPI(), failover, self.streams, self.policies), \
            ChatEndpoint(MessagesAPI(), failover, self.streams, self.policies)
        self._routes: dict[str, Route] = {
            "/healthz": Route({"GET": self._healthz}, auth="none", body=False),
            "/v1/models": Route({"GET": self._models}, body=False),
            "/v1/chat/completions": Route({"POST": chat}),
            "/v1/messages": Route({"POST": messages}, api_key_header=messages.api.api_key_header,
                                  error_body=messages.api.error_body),
            "/v1/embeddings": Route({"POST": EmbeddingsEndpoint(failover, self.policies)}),
            "/admin/routing": Route({"GET": self._admin_routing}, auth="admin", body=False),
            "/admin/bypass": Route({"POST": self._admin_bypass}, auth="admin"),
        }
        self._prefixes: list[str] = []
        if self.cache is not None:
            cache = self.cache
            self.add_route("/admin/cache", Route({"GET": lambda x, *_: admin_statistics(cache, x, _[-1])},
                                                 auth="admin", body=False))
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []  # at lifespan shutdown, after the drain
        if self.keys is not None:
            for path, methods in KeysAdmin(self.keys).routes().items():
                self.add_route(path, Route(methods, auth="admin", body=set(methods) != {"GET"}))
            self.on_shutdown.append(self.keys.aclose)
        observability.install(self)  # /metrics, /admin/slo, /dashboard and their policies

    def add_route(self, path: str, route: Route) -> None:
        """Register an endpoint; a path ending in "/" also serves everything below it
        (e.g. "/admin/keys/" for /admin/keys/{id}: the handler reads scope's path from x.path)."""
        if path in self._routes:
            raise ValueError(f"route {path} is already registered")
        self._routes[path] = route
        if path.endswith("/"):
            self._prefixes = sorted([p for p in self._routes if p.endswith("/")], key=len, reverse=True)

    def _route(self, path: str) -> Route | None:
        route = self._routes.get(path)
        if route is None and self._prefixes:
            for prefix in self._prefixes:
                if path.startswith(prefix):
                    return self._routes[prefix]
        return route

    @property
    def auth_enabled(self) -> bool:
        return self._master_key is not None

    def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> Awaitable[None]:
        """The ASGI (3) app. Not a coroutine function: it returns the coroutine that serves the
        scope, so an open stream keeps one frame less for its whole life. A server that tells ASGI 3
        from 2 by `iscoroutinefunction` must be told it is ASGI: serve.py wraps it itself."""
        if scope["type"] == "http":
            return self._http(scope, receive, send)
        if scope["type"] == "lifespan":
            return self._lifespan(receive, send)
        return _ignored()  # e.g. websocket: not served

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        route = self._route(scope["path"])
        headers = dict(scope["headers"])
        rid = request_id(headers.get(b"x-request-id"))
        request_id_var.set(rid)
        x = Exchange(rid, scope["path"], OPEN, started, headers=headers,
                     response_headers=[(b"x-request-id", rid.encode())])
        if scope.get("query_string"):
            x.notes["query"] = scope["query_string"]  # e.g. /admin/spend?group_by=team
        self._enter()  # in flight until the finally below (wait_idle: the drain)
        try:
            if route is None:
                raise NotFound(f"Unknown path: {scope['path']}")
            handler = route.methods.get(scope["method"])
            if handler is None:
                allow = ", ".join(route.methods)
                raise MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']} (use {allow})",
                                       allow=allow)
            if route.auth == "admin" and self._master_key is None and not (self.demo and _loopback(scope)):
                raise Forbidden("admin endpoints need a master key: set the variable named by "
                                "[auth] master_key_env")
            if route.auth != "none":
                x.principal = self._authenticate(headers, route)
            body = await read_body(headers, receive, self.config.server.max_body_bytes) if route.body else b""
            relay = await handler(x, body, headers, receive, send)
            if relay is not None:
                del body  # parsed by now: not kept for as long as the stream lasts
                await relay
        except ClientGone:
            x.outcome = "client_disconnected"
            log.info("%s %s client disconnected before the response", scope["method"], scope["path"])
        except GatewayError as error:
            x.status, x.error, x.outcome = error.status, error, "error"
            level = logging.WARNING if error.status >= 500 else logging.INFO
            # Bounded (clip): the path, code and message may echo what a client or provider sent.
            # Provider strings were redacted where they left the adapter (proxy/formats).
            log.log(level, "%s %s -> %d %s: %s (%.1f ms)", scope["method"], clip(scope["path"]), error.status,
                    clip(error.code or error.type), clip(error.message, MAX_MESSAGE),
                    (time.perf_counter() - started) * 1000)
            render = route.error_body if route is not None else GatewayError.to_body
            body = render(error)
            body["request_id"] = rid  # the id to quote in a bug report, also in the headers
            await send_json(send, error.status, body, x.response_headers + error.headers())
        finally:
            self._leave()
            self.policies.settle(x)
            if x.error is not None:  # its traceback holds this frame, which holds x: a cycle
                x.error.__traceback__ = None

    def is_master_key(self, token: bytes) -> bool:
        """Whether `token` is the master key (constant time); False when none is set."""
        return self._master_key is not None and hmac.compare_digest(token, self._master_key.encode())

    def _authenticate(self, headers: Mapping[bytes, bytes], route: Route) -> Principal:
        """The master key (admin, and traffic unless [auth] master_key_traffic = false), or with
        [state] a virtual key (proxy/keys: 401 unknown/expired/revoked, 403 admin_only on /admin/*)."""
        if self._master_key is None and self.keys is None:
            return OPEN
        api_key_header = route.api_key_header
        given = headers.get(b"authorization", b"")
        api_key = headers.get(api_key_header, b"") if api_key_header else b""
        scheme, _, token = given.partition(b" ")
        if api_key and not given:
            scheme, token = b"bearer", api_key
        if scheme.lower() != b"bearer" or not token:
            also = f" or '{api_key_header.decode()}: <key>'" if api_key_header else ""
            raise AuthenticationFailed(f"Missing API key: send 'Authorization: Bearer <key>'{also}.")
        token = token.strip()
        if self._master_key is not None and hmac.compare_digest(token, self._master_key.encode()):
            if route.auth == "client" and self.keys is not None and not self.config.auth.master_key_traffic:
                raise Forbidden("the master key administers only ([auth] master_key_traffic = false): "
                                "call models with a virtual key")
            return MASTER
        if self.keys is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        principal = self.keys.authenticate(token)
        if route.auth == "admin":
            raise AdminOnly("admin endpoints take the master key only, not a virtual key")
        return principal

    async def _admin_routing(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                             send: Send) -> None:
        await send_json(send, 200, self.router.snapshot(trio.current_time()), x.response_headers)

    async def _admin_bypass(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                            send: Send) -> None:
        """POST {"enabled": true|false}: the run-time BYPASS_ROUTER switch."""
        try:
            enabled = orjson.loads(body)["enabled"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            enabled = None
        if not isinstance(enabled, bool):
            raise InvalidRequest('expected a JSON body {"enabled": true|false}', param="enabled")
        self.router.bypass = enabled
        log.warning("router bypass %s via /admin/bypass", "ON" if enabled else "off")
        await send_json(send, 200, {"bypass": enabled}, x.response_headers)

    async def _healthz(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                       send: Send) -> None:
        if self.draining:
            await send_json(send, 503, {"status": "draining"}, x.response_headers)
        else:
            await send_json(send, 200, {"status": "ok", "open_streams": len(self.streams)}, x.response_headers)

    async def _models(self, x: Exchange, body: bytes, headers: Mapping[bytes, bytes], receive: Receive,
                      send: Send) -> None:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
                for name in self.router.model_names()]
        await send_json(send, 200, {"object": "list", "data": data}, x.response_headers)

    # -- drain: the server asks us to stop (proxy/server/serve.py) --

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
        self.streams.abort_all(error)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.keys is not None:
                    await self.keys.open()  # in each worker, after the fork: the store's connection
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.upstream.aclose()
                for close in self.on_shutdown:
                    await close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _ignored() -> None:
    pass


def _loopback(scope: dict[str, Any]) -> bool:
    client = scope.get("client")
    host = client[0] if client else ""
    return host.startswith("127.") or host == "::1"
