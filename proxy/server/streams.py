"""The open streams of one process: every streaming response runs through here.

Counted (`/healthz`, drain) and abortable as a set (the drain timeout ends what is left), each
with the pump settings of `[server]`. The endpoints get this object, never the whole app.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterator

from proxy.config import ServerConfig
from proxy.core.errors import GatewayError
from proxy.server.asgi import Headers, Receive, Send
from proxy.formats.chat_api import openai_error_event
from proxy.server.alarms import Alarms
from proxy.server.pump import Producer, Relay


class Streams:
    def __init__(self, server: ServerConfig):
        self._server = server
        self._open: set[Relay] = set()
        self.ended = 0  # streams that ended since start (proxy/server/serve.py returns memory by it)
        self.alarms = Alarms()  # every stream's watchdog alarm, while serve.py runs it

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Relay]:
        return iter(list(self._open))

    def relay(self, send: Send, receive: Receive, produce: Producer, *,
              headers: Callable[[], Headers], done: Callable[[Relay], None],
              error_event: Callable[[GatewayError], bytes] = openai_error_event) -> Awaitable[None]:
        """One streaming response, for the caller to await at once; `done(relay)` runs at the end
        whatever happened (the log line).

        Raises the upstream error when it came before any byte (the caller answers with it).
        Not a coroutine of its own: the caller awaits the relay's `run`, which calls `_end` and
        `done` as it ends (one coroutine frame less for a stream's whole life).
        """
        server = self._server
        relay = Relay(send, receive, write_timeout=server.write_timeout, buffer=server.stream_buffer,
                      keepalive_interval=server.keepalive_interval, headers=headers,
                      error_event=error_event, ended=(self._end, done), alarms=self.alarms)
        self._open.add(relay)
        return relay.run(produce)

    def _end(self, relay: Relay) -> None:
        self._open.discard(relay)
        self.ended += 1

    def abort_all(self, error: GatewayError) -> None:
        for relay in list(self._open):
            relay.abort(error)
