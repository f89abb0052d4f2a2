"""The stream pump: one streaming response, upstream reader -> bounded channel -> client writer.

    provider ──> [reader: produce(), in the request's task] ──memory channel (stream_buffer items)──> [writer task] ──ASGI send──> client
                                                       [watchdog: disconnect, write deadline, keep-alive]

Rules:
- The channel is the only buffer of a stream: at most `stream_buffer` items, each the encoded
  events of one upstream read (so at most `stream_buffer` × the largest upstream read, and no
  event larger than `max_event_bytes`, which the SSE decoder refuses). When the client reads
  slowly, `send()` blocks (hypercorn returns once bytes reach the kernel), the channel fills,
  the reader blocks and stops reading the provider's socket: TCP throttles the provider.
- Per-write deadline: hypercorn shields its socket writes from cancellation, so a timeout around
  `send()` never fires. The watchdog holds one alarm (`alarm`); when it rings while a write has
  been pending for `write_timeout`, it marks the stream stalled (`ClientStalled`) and cancels
  the nursery: the reader, and with it the upstream socket, is released at once;
  the stuck write itself is ended by the kernel (TCP_USER_TIMEOUT, `proxy/server/serve.py`).
- The alarm is lazy, so the per-event path moves no deadline and opens no cancel scope: the
  writer only stamps when its write began. The alarm never rings later than `write_timeout`
  after a write could have begun; when it rings early it re-arms for the exact due time (a
  pending write's start + write_timeout, or the next keep-alive). Cost: one wake-up per
  `min(write_timeout, keepalive_interval)` per stream, not one per event.
- Keep-alive: while no event arrives for `keepalive_interval` (a slow first token), the watchdog
  queues a comment, or writes it itself while there is no writer yet (`_write_aside`); when the
  channel is full the writer is busy anyway and none is needed.
- A client disconnect arrives only as `http.disconnect` from `receive()` (a send after it
  silently succeeds), so the watchdog watches `receive()` and cancels the nursery.
- The watchdog is hosted when it can be (under serve.py: `alarms` running, `receive` an app
  queue): no task of its own, its alarm one entry of the process's alarms (one task for all
  streams, proxy/server/alarms.py), the client's events handed over by the app queue as they come
  (`AppQueue.watch`), a keep-alive written by a task that lives only while it writes. Same rules,
  ~2.6 KiB less per stream. Otherwise (a relay outside serve.py) it is a task (`_watch`).
- The stream's tasks run in a nursery of its own, or when hosted, in the connection's (hypercorn's
  per-connection nursery, the one the request's task runs in) under the same rules
  (`ConnectionTasks`, proxy/server/connection_tasks.py: joined before the relay returns, cancelled
  with it, errors raised from it), ~1.1 KB less per stream. "The nursery" below is either.
- Each item is written as soon as it arrives; only items already queued are joined into one
  write (no added latency, ~10x fewer sends under load).
- The first item (headers + first token) is written by the reader itself when the writer is
  idle (`Outlet.put`): one scheduler round less to a new stream's first token, which under
  overload is a turn of every other stream. Everything after goes through the channel.
- A stream waiting for its first token holds no channel and no writer task (~4 KB a held stream):
  both are made when the first item goes through the channel (`Outlet`; keep-alive comments
  before it are written by the watchdog), so a held stream is the reader waiting on the provider
  (and, without the hosted watchdog, the watchdog waiting on the client), however long it waits.
- Errors travel through the channel in order (a `Finish` item), behind the events that preceded them. Before the
  first byte went out, an upstream error is raised to the caller (a proper HTTP status); after,
  it becomes an error event in the client's format (`error_event`) and the stream ends without
  its clean-end marker — never a fake clean end.
- A stream's life is one state (`StreamState`), moved forward in one place each.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from proxy.core.errors import ClientStalled, GatewayError
from proxy.core.sse import encode_comment
from proxy.formats.chat_api import openai_error_event
from proxy.server.alarms import Alarms
from proxy.server.app_queue import AppQueue, queue_of
from proxy.server.asgi import Receive, Send
from proxy.server.connection_tasks import ConnectionTasks

log = logging.getLogger("proxy.server.pump")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
KEEPALIVE = encode_comment("keepalive")


class StreamState(enum.Enum):
    PENDING = "pending"            # nothing sent yet: an error can still be a proper HTTP status
    STREAMING = "streaming"        # headers went out: errors are events from now on
    FINISHED = "finished"          # the last write (more_body=False) has begun
    FAILED = "failed"              # ended by an upstream error (event sent, or raised if PENDING)
    DISCONNECTED = "disconnected"  # the client left
    STALLED = "stalled"            # a write stayed pending past write_timeout


@dataclass(frozen=True, slots=True)
class Finish:
    """The last channel item: the producer is done, cleanly (error None) or with an error that
    travels behind the events that preceded it."""

    error: GatewayError | None = None


class Outlet:
    """What a producer writes to: the relay's channel (`send`, `send_nowait`, as a channel's;
    the first call makes the channel and starts the writer), and `put`, which producers use
    instead of `send`."""

    __slots__ = ("_channel", "_first", "_relay", "send", "send_nowait")

    def __init__(self, relay: Relay):
        self._relay = relay
        self._channel: trio.MemorySendChannel | None = None
        self._first = True
        # The channel and the writer task are made with the first item that goes through the
        # channel: a stream waiting for its first token holds neither (a task, its coroutines,
        # the channel's deque and task sets: ~4 KB).
        self.send, self.send_nowait = self._send_starting, self._send_nowait_starting

    def _start_writer(self) -> None:
        channel = self._channel = self._relay._start_writer()
        self.send, self.send_nowait = channel.send, channel.send_nowait

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.aclose()

    def release(self) -> None:
        """The relay is done: drop what leads back to it and to this outlet (a cycle otherwise)."""
        self._relay = None
        self.send = self.send_nowait = None

    async def _send_starting(self, item: bytes | Finish) -> None:
        self._start_writer()
        await self._channel.send(item)

    def _send_nowait_starting(self, item: bytes | Finish) -> None:
        self._start_writer()
        self._channel.send_nowait(item)

    async def put(self, item: bytes) -> None:
        """No scheduler round trip when there is room: the reader has just yielded in its socket
        receive, so this stays fair, saves a step per event, and under overload a new stream's
        first token waits one batch of other tasks less. The first item may go out from the
        reader itself (`Relay._write_first`)."""
        if self._first:
            self._first = False
            if self._relay._writer_idle(self._channel):
                await self._relay._write_first(item)
                return
        try:
            self.send_nowait(item)
            return
        except trio.WouldBlock:
            pass
        await self.send(item)  # full: the client is slow, wait (outside the handler)


Producer = Callable[[Outlet], Awaitable[None]]


class Relay:
    # Slots: a stream keeps its relay for its whole life (an instance dict is ~0.1 KB more).
    __slots__ = ("_send", "_receive", "_alarms", "_write_timeout", "_buffer", "_keepalive", "_headers",
                 "_error_event", "_reader_scope", "_ended", "_nursery", "_abort", "_write_began",
                 "_last_write", "_headers_sent", "_first_writing", "_aside", "_outlet", "_stalled",
                 "state", "bytes_written", "failure")

    def __init__(self, send: Send, receive: Receive, *, write_timeout: float, buffer: int,
                 keepalive_interval: float,
                 headers: Callable[[], list[tuple[bytes, bytes]]] = list,
                 error_event: Callable[[GatewayError], bytes] = openai_error_event,
                 ended: tuple[Callable[[Relay], None], ...] = (), alarms: Alarms | None = None):
        self._send = send
        self._receive = receive
        self._alarms = alarms  # the process's alarms: the watchdog without a task (see `_watch_from`)
        self._write_timeout = write_timeout
        self._buffer = buffer
        self._keepalive = keepalive_interval
        self._headers = headers  # evaluated at the first write: routing may still be deciding
        self._error_event = error_event  # how a failure after the first byte is told (client format)
        self._reader_scope = trio.CancelScope()
        self._ended = ended  # called with the relay when `run` ends, whatever happened
        self._nursery: trio.Nursery | ConnectionTasks | None = None  # where the stream's tasks run
        self._abort: GatewayError | None = None
        self._write_began: float | None = None  # set while a write is pending
        self._last_write = 0.0
        self._headers_sent = False
        self._first_writing = False  # the reader is writing the first bytes (_write_first)
        self._aside: trio.Event | None = None  # set while the watchdog writes a keep-alive (_write_aside)
        self._outlet: Outlet | None = None  # the reader's, for the watchdog's keep-alives
        self._stalled = False  # the watchdog found a write pending past write_timeout
        self.state = StreamState.PENDING
        self.bytes_written = 0
        self.failure: GatewayError | None = None  # the error the stream ended with, if any

    @property
    def outcome(self) -> str:
        """How the stream ended, for the log line: ok, client_disconnected, client_stalled, error:CODE."""
        if self.state is StreamState.DISCONNECTED:
            return "client_disconnected"
        if self.state is StreamState.STALLED:
            return "client_stalled"
        if self.failure is not None:
            return f"error:{self.failure.code or self.failure.type}"
        return "ok"

    def abort(self, error: GatewayError) -> None:
        """End the stream with `error` (e.g. drain timeout): stop reading, tell the client. During
        the reader's first write, once that write is done (`_write_first`)."""
        self._abort = error
        if not self._first_writing:
            self._reader_scope.cancel()

    async def run(self, produce: Producer) -> None:
        """Relay until the producer finishes, the client leaves, or a write stalls.

        Raises the upstream error if it came before any byte was sent (caller answers with it).
        """
        self._last_write = trio.current_time()
        outlet = Outlet(self)
        hosted = self._watch_from()
        ticket = None
        try:
            # The stream's tasks (the writer, a keep-alive write, the watchdog task) start in a
            # nursery of its own, or hosted, in the connection's (ConnectionTasks: ~1.1 KB less).
            async with (trio.open_nursery() if hosted is None
                        else ConnectionTasks(hosted.nursery, self._reader_scope)) as nursery:
                self._nursery = nursery  # the writer starts in it with the first channel item (Outlet)
                self._outlet = outlet  # the watchdog's, for keep-alives
                if hosted is None:
                    nursery.start_soon(self._watch)
                else:
                    hosted.watch(self._message)
                    ticket = self._alarms.set(self, self._alarm_at(self._last_write))
                # The reader runs in the request's own task: the upstream request goes out now,
                # not one scheduler round later (under load, a round is every other stream's turn).
                # Inline, not a method of its own: one coroutine frame less for the stream's life.
                try:
                    failed: Finish | None = None
                    sent = False
                    with self._reader_scope:
                        try:
                            await produce(outlet)
                        except GatewayError as error:
                            failed = Finish(error)
                        except Exception:
                            log.exception("relay: producer failed")
                            failed = Finish(GatewayError("internal error while streaming"))
                        if failed is not None:
                            await outlet.send(failed)
                            sent = True
                    # A clean end (abort None), or an abort (also during the send above); not when
                    # the stream is being cancelled (the client left, a write stalled).
                    if not sent and not nursery.cancel_scope.cancel_called:
                        await outlet.send(Finish(self._abort))
                finally:
                    await outlet.aclose()  # the writer sees the end once the queue is empty
        finally:
            self._outlet = None
            if hosted is not None:
                hosted.watch(None)
                self._alarms.cancel(ticket)
            if self._stalled:
                self.state = StreamState.STALLED
                self.failure = ClientStalled(f"client did not accept a write for {self._write_timeout} s")
            self._nursery = None
            for end in self._ended:  # the open streams' bookkeeping, the log line (streams.py)
                end(self)
            # No reference cycle may outlive the stream: the cyclic GC would have to find every
            # finished stream's objects (more collections, long pauses under load). The outlet
            # holds bound methods of itself until its writer starts; the failure's traceback
            # holds the frames that hold it (and this relay).
            outlet.release()
            if self.failure is not None:
                self.failure.__traceback__ = None
        if self.state is StreamState.FAILED and not self._headers_sent:
            raise self.failure

    # -- watchdog --

    def _watch_from(self) -> AppQueue | None:
        """The app queue to watch from when the process's alarms serve this stream (the hosted
        watchdog: no task of its own, ~2.6 KiB less per stream; proxy/server/alarms.py), and
        whose connection nursery hosts the stream's tasks, else None (a watchdog task, `_watch`,
        and a nursery of the stream's own). Both follow the same rules (module docstring)."""
        if self._alarms is None or not self._alarms.running:
            return None
        queue = queue_of(self._receive)
        return queue if queue is not None and queue.nursery is not None else None

    def _message(self, message: dict) -> None:
        """The watchdog's `receive()`: every ASGI receive event, as it comes."""
        if message["type"] == "http.disconnect" and self._nursery is not None:
            # After the last write, hypercorn reports the finished response as a disconnect too:
            # that is the end, not a client leaving.
            if self.state in (StreamState.PENDING, StreamState.STREAMING):
                self.state = StreamState.DISCONNECTED
            self._nursery.cancel_scope.cancel()

    def alarm(self, now: float) -> float | None:
        """The watchdog's alarm rang (the process's alarms, or `_watch`'s deadline): a write
        pending past `write_timeout` ends the stream as stalled, a silence of `keepalive_interval`
        gets a comment. Returns when to look next; None once the stream is ending."""
        nursery = self._nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            return None
        if self._write_began is not None:
            if now - self._write_began >= self._write_timeout:
                self._stalled = True
                nursery.cancel_scope.cancel()
                return None
        elif now - self._last_write >= self._keepalive:
            self._last_write = now  # due again one interval from now, written or not
            if self._outlet._channel is None:
                # A task only while it writes. Marked now, not when the task first runs: a first
                # token arriving meanwhile goes through the channel, behind this (_writer_idle).
                self._aside = trio.Event()
                nursery.start_soon(self._write_aside, KEEPALIVE)
            else:
                try:
                    self._outlet.send_nowait(KEEPALIVE)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    pass  # full: the writer has work; closed: the producer is done
        return self._alarm_at(now)

    def _alarm_at(self, now: float) -> float:
        """When the watchdog must look next (see the module docstring)."""
        if self._write_began is not None:
            return self._write_began + self._write_timeout
        return min(self._last_write + self._keepalive, now + self._write_timeout)

    async def _watch(self) -> None:
        """The watchdog as a task (a relay outside serve.py): `receive()` under the alarm's
        deadline, and the very steps of the hosted watchdog (`_message`, `alarm`)."""
        due = self._alarm_at(trio.current_time())
        while due is not None:
            with trio.CancelScope(deadline=due):
                self._message(await self._receive())
                continue
            due = self.alarm(trio.current_time())

    async def _write_aside(self, data: bytes) -> None:
        """A keep-alive comment while nothing went through the channel (a stream waiting for its
        first token), written for the watchdog: starting the writer task and its channel for it
        would add ~4 KB to every stream held past one `keepalive_interval`. Only ever called when no
        write is pending (the alarm looks for a stall then, not for a keep-alive); a writer started
        meanwhile (the reader's first item) waits for this write (`_write_all`), so bytes keep
        their order. It runs as a task of its own for as long as it writes (`alarm` starts it),
        and the watchdog watches it as any write."""
        if self._aside is None:  # `alarm` marks it before the task runs
            self._aside = trio.Event()
        done = self._aside
        try:
            await self._out(data)
        finally:
            self._aside = None
            done.set()

    # -- the first write, from the reader --

    def _writer_idle(self, channel: trio.MemorySendChannel | None) -> bool:
        """Nothing written or being written, nothing queued or handed to the writer (a keep-alive):
        the writer is parked in its `receive()` with nothing to do."""
        if self._headers_sent or self._write_began is not None or self._aside is not None:
            return False
        if channel is None:
            return True  # no writer yet: nothing went through a channel (Outlet)
        stats = channel.statistics()
        return stats.current_buffer_used == 0 and stats.tasks_waiting_receive == 1

    async def _write_first(self, data: bytes) -> None:
        """The stream's first bytes (headers + first token), written by the reader itself when
        the writer is idle: handing them to the writer costs a scheduler round, and under
        overload every round on a new stream's way to its first token is a turn of every other
        stream (bench.md, 2h). Later items go through the channel as before.

        Not shielded: an abort (a drain) that comes meanwhile waits for the write to finish
        (`abort`), since a cancel inside hypercorn's send, after h11 recorded the head and
        before its bytes went out, would leave the connection unable to carry the error event
        that follows. A stall or a disconnect cancels it as it would cancel the writer (the
        connection is done then); a write stuck in hypercorn's own shielded socket send holds
        the reader until the kernel fails it (TCP_USER_TIMEOUT = write_timeout, serve.py): only
        when the socket buffer is already full before a stream's first bytes."""
        self._first_writing = True
        try:
            await self._out(data)
        finally:
            self._first_writing = False
        if self._abort is not None:
            self._reader_scope.cancel()  # the abort that came during the write

    # -- writer --

    def _start_writer(self) -> trio.MemorySendChannel:
        """The channel and its writer (Outlet: on the first item through it); the channel's send end."""
        send_channel, receive_channel = trio.open_memory_channel(self._buffer)
        self._nursery.start_soon(self._write_all, receive_channel, self._nursery.cancel_scope)
        return send_channel

    async def _write_all(self, channel: trio.MemoryReceiveChannel,
                         relay: trio.CancelScope | ConnectionTasks) -> None:
        if self._aside is not None:
            await self._aside.wait()  # the watchdog's keep-alive write goes out first (_write_aside)
        await self._write(channel)
        relay.cancel()  # written to the end: the watchdog (and a reader still closing) can stop

    async def _write(self, channel: trio.MemoryReceiveChannel) -> None:
        async with channel:
            while True:
                try:
                    item = channel.receive_nowait()  # busy stream: no wait at all
                except trio.WouldBlock:
                    item = None  # wait below, outside the handler: it would keep the exception alive
                if item is None:
                    try:
                        item = await channel.receive()
                    except trio.EndOfChannel:  # every sender gone: the nursery is being cancelled
                        return
                parts: list[bytes] = []
                while type(item) is bytes:  # join whatever is already queued
                    parts.append(item)
                    try:
                        item = channel.receive_nowait()
                    except trio.WouldBlock:
                        break
                if parts:
                    await self._out(b"".join(parts) if len(parts) > 1 else parts[0])
                if type(item) is Finish:
                    if item.error is None:
                        await self._out(b"", more_body=False)
                    else:
                        await self._fail(item.error)
                    return

    async def _fail(self, error: GatewayError) -> None:
        self.failure = error
        if self.state is StreamState.PENDING:
            self.state = StreamState.FAILED
            return  # run() raises it: the caller can still answer with a proper status
        await self._out(self._error_event(error), more_body=False, final_state=StreamState.FAILED)

    async def _out(self, data: bytes, *, more_body: bool = True,
                   final_state: StreamState = StreamState.FINISHED) -> None:
        """One ASGI send, stamped for the watchdog (see the module docstring)."""
        self._write_began = trio.current_time()
        if not self._headers_sent:
            self._headers_sent = True
            self.state = StreamState.STREAMING
            await self._send({"type": "http.response.start", "status": 200,
                              "headers": SSE_HEADERS + self._headers()})
        if not more_body:
            self.state = final_state
        await self._send({"type": "http.response.body", "body": data, "more_body": more_body})
        self.bytes_written += len(data)
        self._last_write = self._write_began
        self._write_began = None
