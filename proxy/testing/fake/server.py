"""`FakeProvider`: the fake's HTTP/1.1 server (trio + h11), its routes, run-time control and records.

Routes (each serves one method; others get 405, unknown paths 404, OpenAI-shaped):
    POST /v1/chat/completions, /v1/embeddings    OpenAI          (openai.py)
    POST /v1/messages                            Anthropic       (anthropic.py)
    POST /api/chat, /api/embed                   Ollama          (ollama.py)
    GET  /v1/models, /healthz
    GET  /_fake/requests    every RequestRecord as JSON; POST /_fake/reset clears them
    POST /_fake/control     run-time faults, below
Every chat or embeddings request leaves a `RequestRecord` that tests inspect.

Run-time control (for routing tests: key revocation, partial outages, hangs): POST /_fake/control
with a JSON object, or set `FakeProvider.control` (a frozen `FakeControl`) in-process:
    {"revoke_key": true}                      every request gets 401 invalid_api_key
    {"fail_percent": 30, "fail_status": 503}  that share of requests fail with that status; the
                                              sequence is deterministic (3 of every 10, evenly)
    {"hang": true}                            every request hangs before headers
    {"reset": true}                           clear all controls (alone or before the others)
Keys given are merged over the current control; the answer is the control now in force.

Rules:
- One task per connection, a few hundred bytes of state each; requests on a connection are
  served in turn (keep-alive and pipelining, as h11 allows).
- One connection's failure never reaches the server: errors are caught per connection, logged at
  debug level, and the connection is closed.
- A peer close is noticed only while a request is being answered (see exchange.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import h11
import orjson
import trio

from proxy.testing.fake import openai
from proxy.testing.fake.exchange import (RECV_BYTES, Exchange, RequestRecord, error_body, respond,
                                         send_json)
from proxy.testing.fake.settings import (MODEL_ID, BadRequest, Chat, FakeControl, FakeSettings,
                                         plan_chat, plan_embeddings)

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024 * 1024
_CHAT_PATHS = {b"/v1/chat/completions": "openai", b"/v1/messages": "anthropic", b"/api/chat": "ollama"}
_EMBED_PATHS = {b"/v1/embeddings": "openai", b"/api/embed": "ollama"}
_ROUTES = {  # path -> the one method it serves
    b"/v1/chat/completions": b"POST",
    b"/v1/messages": b"POST",
    b"/api/chat": b"POST",
    b"/v1/embeddings": b"POST",
    b"/api/embed": b"POST",
    b"/_fake/control": b"POST",
    b"/v1/models": b"GET",
    b"/healthz": b"GET",
    b"/_fake/requests": b"GET",
    b"/_fake/reset": b"POST",
}


class FakeProvider:
    def __init__(self, settings: FakeSettings = FakeSettings(), *,
                 max_records: int = 100_000) -> None:
        self.settings = settings  # read once per request, so tests may swap it at run time
        self.records: list[RequestRecord] = []
        self.port: int | None = None
        self._max_records = max_records  # benchmarks run millions of requests: keep the newest
        self._next_id = 1
        self._record_added = trio.Event()
        self.control = FakeControl()  # run-time faults: POST /_fake/control (see module docstring)
        self._control_seen = 0  # requests since the control last changed (fail_percent's sequence)

    # -- helpers for tests --

    def record_for(self, predicate: Callable[[RequestRecord], bool]) -> RequestRecord | None:
        return next((r for r in self.records if predicate(r)), None)

    async def wait_for_records(self, n: int) -> list[RequestRecord]:
        """Wait until at least n records exist (bound it with trio.fail_after)."""
        while len(self.records) < n:
            await self._record_added.wait()
        return self.records

    def reset(self) -> None:
        self.records.clear()

    def set_control(self, **changes: Any) -> FakeControl:
        """Merge `changes` over the current control; `reset=True` starts from none."""
        base = FakeControl() if changes.pop("reset", False) else self.control
        self.control = dataclasses.replace(base, **changes)
        self._control_seen = 0
        return self.control

    def _controlled(self, settings: FakeSettings) -> tuple[FakeSettings, str | None]:
        """The settings with the run-time control applied, and the error message it imposes."""
        control = self.control
        if control.hang:
            return dataclasses.replace(settings, hang_before_headers=True), None
        if control.revoke_key:
            return dataclasses.replace(settings, status=401), "Incorrect API key provided (revoked)."
        if control.fail_percent:
            self._control_seen += 1
            n, p = self._control_seen, control.fail_percent
            if n * p // 100 > (n - 1) * p // 100:  # evenly spread: exactly p of every 100
                return dataclasses.replace(settings, status=control.fail_status), None
        return settings, None

    def _add_record(self, record: RequestRecord) -> None:
        if len(self.records) >= self._max_records:
            del self.records[: max(1, self._max_records // 10)]  # trim in batches: amortised O(1)
        self.records.append(record)
        self._record_added.set()
        self._record_added = trio.Event()

    # -- serving --

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        if port == 0:  # each address family would get its own random port: keep one
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._exchange(stream, conn):
                conn.start_next_cycle()
        except Exception as exc:  # one bad connection must never take the server down
            log.debug("fake provider: connection ended by %r", exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """Serve one request; True if the connection may carry another."""
        request, body = None, bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await _reject(Exchange(stream, conn, False), 400, f"malformed HTTP: {exc}")
                return False
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:  # curl waits for this before big bodies
                    continue_ = h11.InformationalResponse(status_code=100, headers=[])
                    await stream.send_all(conn.send(continue_))
                conn.receive_data(await stream.receive_some(RECV_BYTES))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    await _reject(Exchange(stream, conn, False), 413, "body too large")
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed: the client is done with this connection
                return False
        ex = Exchange(stream, conn, request.method == b"HEAD")
        keep = await self._route(ex, request, bytes(body))
        return keep and conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _route(self, ex: Exchange, request: h11.Request, body: bytes) -> bool:
        path = request.target.split(b"?", 1)[0]
        method = _ROUTES.get(path)
        if method is None:
            message = f"no route for {path.decode('latin-1')}"
            await send_json(ex, 404, openai.error_body(404, message))
        elif request.method != method:
            await send_json(ex, 405, openai.error_body(405, f"use {method.decode()}"),
                            [(b"allow", method)])
        elif path in _CHAT_PATHS or path in _EMBED_PATHS:
            ex.wire = _CHAT_PATHS.get(path) or _EMBED_PATHS[path]
            return await self._chat(ex, request, body)
        elif path == b"/_fake/control":
            try:
                changes = orjson.loads(body)
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                unknown = sorted(set(changes) - {"reset"} - {f.name for f in dataclasses.fields(FakeControl)})
                if unknown:
                    raise ValueError(f"unknown control keys {unknown}")
                control = self.set_control(**changes)
            except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                await send_json(ex, 400, openai.error_body(400, f"bad control: {exc}"))
            else:
                await send_json(ex, 200, dataclasses.asdict(control))
        elif path == b"/v1/models":
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fake"}
            await send_json(ex, 200, {"object": "list", "data": [model]})
        elif path == b"/healthz":
            await send_json(ex, 200, {"status": "ok"})
        elif path == b"/_fake/requests":
            await send_json(ex, 200, [r.to_json() for r in self.records])
        else:
            self.reset()
            await send_json(ex, 200, {"status": "ok"})
        return True

    # -- chat completions and embeddings --

    async def _chat(self, ex: Exchange, request: h11.Request, raw: bytes) -> bool:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        record = RequestRecord(
            id=self._next_id, path=request.target.decode("latin-1"), model=None, stream=False,
            status=200, authorization=headers.get("authorization"), headers=headers,
            body={}, started_at=trio.current_time())
        self._next_id += 1
        self._add_record(record)
        ex.record = record
        try:
            await respond(ex, self._plan(record, raw, ex.wire))
            if ex.peer_gone and not record.completed:
                record.peer_closed_early = True
            return not (ex.peer_gone or ex.dropped)
        finally:
            record.ended_at = trio.current_time()
            record.closed.set()

    def _plan(self, record: RequestRecord, raw: bytes, wire: str) -> Chat | str:
        """The request decided, or the message of the 400 it gets; fills in the record."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            record.status = 400
            return f"malformed JSON body: {exc}"
        if isinstance(body, dict):
            record.body = body
            record.model = body.get("model") if isinstance(body.get("model"), str) else None
            record.stream = body.get("stream") is True
        settings, message = self._controlled(self.settings)
        embeddings = record.path.split("?", 1)[0].encode() in _EMBED_PATHS
        try:
            chat = plan_embeddings(body, settings, wire, record.model) if embeddings else \
                plan_chat(body, settings, wire)
        except BadRequest as exc:
            record.status = 400
            return str(exc)
        if wire == "ollama" and not embeddings:
            record.stream = chat.stream  # Ollama streams unless told not to
        record.status = chat.settings.status
        if chat.settings.echo_key:
            chat = dataclasses.replace(chat, echo=_key_of(record.headers))
        return dataclasses.replace(chat, error_message=message) if message else chat


def _key_of(headers: dict[str, str]) -> str | None:
    """The key a request carried: Anthropic's x-api-key, or a Bearer token."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return headers.get("x-api-key") or (token if scheme.lower() == "bearer" else None) or None


async def _reject(ex: Exchange, status: int, message: str) -> None:
    if ex.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        await send_json(ex, status, error_body("openai", status, message), [(b"connection", b"close")])
