"""POST /v1/embeddings: OpenAI's embeddings API, to OpenAI-compatible and Ollama deployments.

A plain JSON call (no stream): validate the body, pick a deployment, let the adapter shape the
request (`embeddings_request`) and the answer (`parse_embeddings`: always OpenAI's list shape),
one `proxy.transport.upstream` request in between, raced against the client's disconnect. An Anthropic
deployment has no embeddings: 400 naming the provider. Deployments are chosen, retried and
failed over by the same loop as chat (`proxy.dispatch.run`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any


from proxy.server.chat import until_disconnect
from proxy.core.request import load_request_object
from proxy.routing import failover as dispatch
from proxy.routing.failover import Served
from proxy.core.errors import InvalidRequest
from proxy.server.pump import Receive, Send
from proxy.routing.router import DeploymentState

if TYPE_CHECKING:
    from proxy.server.app import Gateway

log = logging.getLogger("proxy.server.embeddings")


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def parse_embeddings_request(raw: bytes) -> dict[str, Any]:
    body = load_request_object(raw)
    value = body.get("input")
    ok = isinstance(value, str) and value != "" or isinstance(value, list) and len(value) > 0 and (
        all(isinstance(v, str) and v for v in value) or all(isinstance(v, int) for v in value)
        or all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value))
    _check(ok, "'input' must be a non-empty string, array of strings, or array of token arrays", "input")
    fmt = body.get("encoding_format")
    _check(fmt in (None, "float", "base64"), "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dims = body.get("dimensions")
    _check(dims is None or isinstance(dims, int) and not isinstance(dims, bool) and dims >= 1,
           "'dimensions' must be a positive integer", "dimensions")
    return body


async def handle(gateway: "Gateway", body: bytes, receive: Receive, send: Send) -> None:
    from proxy.server.app import ClientGone, send_json

    request = parse_embeddings_request(body)
    started = time.perf_counter()
    gateway.router.check_model(request["model"])  # 404 before any work
    served = Served()

    async def attempt(state: DeploymentState, model: str, ttft: float | None) -> dict[str, Any]:
        adapter = gateway.adapters[state.deployment.provider]
        wire = adapter.embeddings_request(request, model)  # 400 for a kind without embeddings
        return adapter.parse_embeddings(await gateway.upstream.request(adapter, wire))

    async def call() -> dict[str, Any]:
        return await dispatch.run(gateway, request["model"], served, attempt)

    result = await until_disconnect(receive, call)
    if result is None:
        raise ClientGone()
    result["model"] = request["model"]
    await send_json(send, 200, result, served.headers())
    log.info("embeddings model=%s deployment=%s/%s inputs=%d prompt_tokens=%s ms=%.1f", request["model"],
             served.provider, served.model, len(result.get("data") or ()),
             (result.get("usage") or {}).get("prompt_tokens", "-"), (time.perf_counter() - started) * 1000)
