"""The relay: one streaming response, upstream reader -> bounded channel -> client writer.

    provider ──httpx──> [reader task] ──memory channel (stream_buffer slots)──> [writer] ──ASGI send──> client
                                                                        [guard task: disconnect + write deadline]

Rules:
- The channel is the only buffer of a stream. It holds at most `stream_buffer` encoded SSE events,
  each at most `max_event_bytes` (the SSE decoder refuses bigger ones). When the client reads
  slowly, `send()` blocks (hypercorn returns only once bytes reach the kernel), the channel
  fills, the reader blocks, and httpx stops reading: the provider is throttled by TCP.
- Per-write deadline: hypercorn shields its socket writes from cancellation, so a timeout around
  `send()` never fires. Instead the writer moves the deadline of the guard's cancel scope before
  each write and clears it after; if a write stays pending past `write_timeout`, the guard raises
  `ClientStalled`, which cancels the nursery: the reader (and with it the upstream socket) is
  released at once, while the stuck write itself is ended by the kernel (TCP_USER_TIMEOUT,
  `proxy/server.py`).
- A client disconnect arrives only as `http.disconnect` from `receive()` (a send after it
  silently succeeds), so the guard watches `receive()` and cancels the nursery.
- Each event is written as soon as it arrives; only events already queued are joined into one
  write (no added latency, ~10x fewer sends under load).
- Errors travel through the channel in order. Before the first byte went out, an upstream error
  becomes a proper HTTP error response (raised to the caller); after, an error event in the
  client's format (`error_event`: OpenAI's `data: {"error": ...}` by default, Anthropic's
  `event: error` on /v1/messages) and the stream ends without its clean-end marker — never a
  fake clean end.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson
import trio

from proxy.core.errors import ClientStalled, GatewayError
from proxy.core.sse import encode_comment, encode_event

log = logging.getLogger("proxy.server.pump")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
KEEPALIVE = encode_comment("keepalive")


@dataclass(frozen=True, slots=True)
class Failure:
    """An error travelling through the channel behind the events that preceded it."""

    error: GatewayError


Producer = Callable[[trio.MemorySendChannel], Awaitable[None]]


def openai_error_event(error: GatewayError) -> bytes:
    """The default final event of a failed stream: `data: {"error": {...}}`, OpenAI's shape."""
    return encode_event(orjson.dumps(error.to_body()))


class Relay:
    def __init__(self, send: Send, receive: Receive, *, write_timeout: float, buffer: int,
                 keepalive_interval: float,
                 headers: Callable[[], list[tuple[bytes, bytes]]] = list,
                 error_event: Callable[[GatewayError], bytes] = openai_error_event):
        self._send = send
        self._receive = receive
        self._write_timeout = write_timeout
        self._buffer = buffer
        self._keepalive = keepalive_interval
        self._headers = headers  # evaluated at the first write: routing may still be deciding
        self._error_event = error_event  # how a failure after the first byte is told (client format)
        self._write_guard = trio.CancelScope()  # its deadline is "now + write_timeout" during a write
        self._reader_scope = trio.CancelScope()
        self._abort: GatewayError | None = None
        self.started = False  # response headers went out: errors are events from now on
        self.disconnected = False
        self.finished = False  # the last write (more_body=False) has begun
        self.stalled = False
        self.bytes_written = 0
        self.failure: GatewayError | None = None  # the error the stream ended with, if any

    @property
    def outcome(self) -> str:
        """How the stream ended, for the log line: ok, client_disconnected, client_stalled, error:CODE."""
        if self.disconnected:
            return "client_disconnected"
        if self.stalled:
            return "client_stalled"
        if self.failure is not None:
            return f"error:{self.failure.code or self.failure.type}"
        return "ok"

    def abort(self, error: GatewayError) -> None:
        """End the stream with `error` (e.g. drain timeout): stop reading, tell the client."""
        self._abort = error
        self._reader_scope.cancel()

    async def run(self, produce: Producer) -> None:
        """Relay until the producer finishes, the client leaves, or a write stalls.

        Raises the upstream error if it came before any byte was sent (caller answers with it).
        """
        send_channel, receive_channel = trio.open_memory_channel(self._buffer)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, nursery.cancel_scope)
                nursery.start_soon(self._read, produce, send_channel)
                await self._write(receive_channel)
                nursery.cancel_scope.cancel()
        except* ClientStalled:
            self.stalled = True
            self.failure = ClientStalled(f"client did not accept a write for {self._write_timeout} s")
        if self.failure is not None and not self.started:
            raise self.failure

    async def _guard(self, cancel_relay: trio.CancelScope) -> None:
        with self._write_guard:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    # After the last write, hypercorn reports the finished response as a
                    # disconnect too: that is the end, not a client leaving.
                    self.disconnected = not self.finished
                    cancel_relay.cancel()
                    return
        raise ClientStalled("write deadline passed")

    async def _read(self, produce: Producer, channel: trio.MemorySendChannel) -> None:
        async with channel:
            with self._reader_scope:
                try:
                    await produce(channel)
                except GatewayError as error:
                    await channel.send(Failure(error))
                except Exception:
                    log.exception("relay: producer failed")
                    await channel.send(Failure(GatewayError("internal error while streaming")))
            if self._abort is not None:
                await channel.send(Failure(self._abort))

    async def _write(self, channel: trio.MemoryReceiveChannel) -> None:
        async with channel:
            while True:
                try:
                    item = await self._next(channel)
                except trio.EndOfChannel:
                    break
                if item is None:  # nothing arrived for keepalive_interval
                    await self._out(KEEPALIVE)
                    continue
                parts, failure = self._coalesce(item, channel)
                if parts:
                    await self._out(b"".join(parts))
                if failure is not None:
                    await self._fail(failure.error)
                    return
        await self._out(b"", more_body=False)

    async def _next(self, channel: trio.MemoryReceiveChannel) -> bytes | Failure | None:
        """The next item, or None after keepalive_interval without one."""
        try:
            return channel.receive_nowait()  # busy stream: no timer needed
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self._keepalive):
            return await channel.receive()
        return None

    @staticmethod
    def _coalesce(item: bytes | Failure, channel: trio.MemoryReceiveChannel
                  ) -> tuple[list[bytes], Failure | None]:
        """The item plus whatever is already queued, stopping at a Failure or the end."""
        parts: list[bytes] = []
        while True:
            if isinstance(item, Failure):
                return parts, item
            parts.append(item)
            try:
                item = channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return parts, None

    async def _fail(self, error: GatewayError) -> None:
        self.failure = error
        if not self.started:
            return  # run() raises it: the caller can still answer with a proper status
        await self._out(self._error_event(error), more_body=False)

    async def _out(self, data: bytes, *, more_body: bool = True) -> None:
        """One ASGI send under the write deadline (see module docstring)."""
        self._write_guard.deadline = trio.current_time() + self._write_timeout
        if not self.started:
            self.started = True
            await self._send({"type": "http.response.start", "status": 200,
                              "headers": SSE_HEADERS + self._headers()})
        self.finished = not more_body
        await self._send({"type": "http.response.body", "body": data, "more_body": more_body})
        self.bytes_written += len(data)
        self._write_guard.deadline = math.inf
