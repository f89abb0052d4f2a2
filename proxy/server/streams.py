"""The open streams of one process: every streaming response runs through here.

Counted (`/healthz`, drain) and abortable as a set (the drain timeout ends what is left), each
with the pump settings of `[server]`. The endpoints get this object, never the whole app.
"""

from __future__ import annotations

from typing import Callable, Iterator

from proxy.config import ServerConfig
from proxy.core.errors import GatewayError
from proxy.server.asgi import Headers, Receive, Send
from proxy.formats.chat_api import openai_error_event
from proxy.server.pump import Producer, Relay


class Streams:
    def __init__(self, server: ServerConfig):
        self._server = server
        self._open: set[Relay] = set()
        self.ended = 0  # streams that ended since start (proxy/server/serve.py returns memory by it)

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Relay]:
        return iter(list(self._open))

    async def relay(self, send: Send, receive: Receive, produce: Producer, *,
                    headers: Callable[[], Headers], done: Callable[[Relay], None],
                    error_event: Callable[[GatewayError], bytes] = openai_error_event) -> None:
        """One streaming response; `done(relay)` runs at the end whatever happened (the log line).

        Raises the upstream error when it came before any byte (the caller answers with it).
        """
        server = self._server
        relay = Relay(send, receive, write_timeout=server.write_timeout, buffer=server.stream_buffer,
                      keepalive_interval=server.keepalive_interval, headers=headers,
                      error_event=error_event)
        self._open.add(relay)
        try:
            await relay.run(produce)
        finally:
            self._open.discard(relay)
            self.ended += 1
            done(relay)

    def abort_all(self, error: GatewayError) -> None:
        for relay in list(self._open):
            relay.abort(error)
