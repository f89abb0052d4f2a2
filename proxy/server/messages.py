"""POST /v1/messages: the Anthropic Messages API in front of any provider kind.

The same path as /v1/chat/completions (`proxy/chat.py`) with Anthropic on the client side:
`proxy.formats.messages_api` parses the body into a canonical `ChatRequest` (keeping the original
for an Anthropic deployment, which gets it untouched), `proxy.routing.failover` routes and calls the
provider, and the answer is encoded back into Anthropic's shape. Streams go through the same
`proxy.relay.Relay` (backpressure, write deadline, disconnects), with Anthropic's error event as
the failure rendering; a stream ends with `message_stop` (there is no [DONE]). Errors before the
first byte are Anthropic-shaped JSON with the right status (`proxy/app.py` renders them).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from proxy.routing import failover as dispatch
from proxy.formats.messages_api import StreamEncoder, error_event, parse_messages_request, to_message
from proxy.server.chat import Usage, run_relay, until_disconnect
from proxy.core.request import ChatRequest
from proxy.routing.failover import Served
from proxy.formats import ANTHROPIC_MESSAGE, Chunk
from proxy.server.pump import Receive, Relay, Send

if TYPE_CHECKING:
    from proxy.server.app import Gateway

log = logging.getLogger("proxy.server.messages")


async def handle(gateway: "Gateway", body: bytes, receive: Receive, send: Send, *,
                 anthropic_beta: str | None = None, requested_deployment: str | None = None) -> None:
    from proxy.server.app import ClientGone, send_json

    request = parse_messages_request(body, anthropic_beta)
    gateway.router.check_model(request.model)  # 404 before any work
    served = Served(requested=requested_deployment)
    usage = Usage()
    started = time.perf_counter()
    if request.stream:
        await _stream(gateway, request, served, usage, receive, send, started)
        return
    completion = await until_disconnect(receive, lambda: dispatch.complete(gateway, request, served))
    if completion is None:
        _log(request, served, "client_disconnected", usage, started)
        raise ClientGone()
    usage.update(completion.get("usage"))
    message = completion.get(ANTHROPIC_MESSAGE)
    if message is None:
        message = to_message(completion, request.model)
    await send_json(send, 200, message, served.headers())
    _log(request, served, "ok", usage, started)


async def _stream(gateway: "Gateway", request: ChatRequest, served: Served, usage: Usage,
                  receive: Receive, send: Send, started: float) -> None:
    encoder = StreamEncoder(request.model)

    async def produce(channel: trio.MemorySendChannel) -> None:
        async def emit(chunks: list[Chunk]) -> None:
            if out := encoder.encode(chunks):  # one channel item per upstream read, as in chat
                await channel.send(out)

        await dispatch.stream(gateway, request, emit, served)
        if out := encoder.finish():
            await channel.send(out)

    def done(relay: Relay) -> None:
        usage.update(encoder.usage)
        _log(request, served, relay.outcome, usage, started, relay.bytes_written)

    await run_relay(gateway, receive, send, produce, served, done, error_event=error_event)


def _log(request: ChatRequest, served: Served, outcome: str, usage: Usage,
         started: float, bytes_out: int | None = None) -> None:
    log.info("messages model=%s deployment=%s/%s attempts=%d stream=%s outcome=%s %s bytes_out=%s ms=%.1f",
             request.model, served.provider, served.model, served.attempts, request.stream, outcome,
             usage.log_fields(), bytes_out if bytes_out is not None else "-",
             (time.perf_counter() - started) * 1000)
