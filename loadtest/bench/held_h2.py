"""Held streams over HTTP/2 (h2c, prior knowledge): scenario b with many streams per connection.

Why: over HTTP/1.1 a relay holds two descriptors per stream (client and upstream), so a target
whose open-file limit is 20,000 cannot hold 10,000 streams. Over HTTP/2 the client side needs one
descriptor per connection: 10,000 streams as 100 connections x 100 streams need ~10,100 in the
target. It is a different per-stream profile (one TCP connection, one h2 state machine and one
send task shared by 100 streams), so its rows are never mixed with the HTTP/1.1 ones.

How: `HeldH2` opens `connections` TCP connections to the target, sends the h2 preface, waits for
the server's SETTINGS and opens its share of the streams (stream i on connection i % C, due at
`ramp * i / n` s), each a POST of the very body and headers the HTTP/1.1 client sends
(`loadtest.prompts.body`, `loadtest.apis.request_headers`). One task per connection reads frames
(`h2.connection.H2Connection`, sans-IO) and acknowledges every DATA byte, so flow control never
stalls.

Open, answered, held: a stream is open (`live.open_streams`) from the moment its request is
written (END_STREAM sent) until it ends or fails, as in the HTTP/1.1 client. It is answered once
its response headers said 200 and its first DATA bytes arrived. It is held when the target
confirms it (`hold`): the hypercorn floor relays the provider's headers and role chunk at once,
so there answered = held; the gateway writes nothing (headers included) before a stream's first
token or its keep-alive comment (`keepalive_interval`, 15 s), so its streams are held but not
answered within a short hold, and its own count (`/healthz` `open_streams`) says how many it holds.

Bounds: at most `MAX_STREAMS_PER_CONNECTION` (and never more than the server's
MAX_CONCURRENT_STREAMS: hypercorn's `h2_max_concurrent_streams`, 100, which neither the gateway
nor the hypercorn floor changes) streams per connection; one `Sample` per stream; response bytes
are counted, never kept (an error's first bytes: `MAX_DETAIL`); one read of `RECV_BYTES` at a time.

Outcomes per stream: "cancelled" (held until the stop: not an error); errors: "http_<status>",
"reset" (RST_STREAM), "connect" (no connection, or it broke before the stream was sent),
"closed" (the connection ended under it), "ended" (a held stream that ended: it should not),
"over_limit" (more streams asked of a connection than the server allows), "protocol".
"""

from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass
from typing import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

from .. import apis
from ..client import Live, Sample
from ..memory import MemorySampler
from ..prompts import Prompt, body as request_body
from ..settings import Target as LoadTarget
from ..stats import Summary, summarize

MAX_STREAMS_PER_CONNECTION = 100  # hypercorn's default h2_max_concurrent_streams
RECV_BYTES = 65536
SETTINGS_TIMEOUT = 10.0  # s for the server's SETTINGS frame after the preface
MAX_DETAIL = 200  # bytes of an error response kept for the report


@dataclass(frozen=True)
class H2Request:
    """One held stream's request: host to connect to, h2 header block and body (built once)."""

    host: str
    port: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    @classmethod
    def of(cls, target: LoadTarget) -> "H2Request":
        e = target.endpoints[0]
        prompt = Prompt(({"role": "user", "content": target.prompt},), target.max_tokens, 0)
        body = request_body(target.api, target.model, prompt, target.stream, target.stream_usage)
        headers = [(b":method", b"POST"), (b":scheme", b"http"),
                   (b":authority", b"%s:%d" % (e.host.encode(), e.port)),
                   (b":path", e.base_path + apis.request_path(target.api))]
        headers += apis.request_headers(target.api, target.api_key)
        headers += [(k.lower().encode(), v.encode()) for k, v in target.extra_headers]
        headers.append((b"content-length", str(len(body)).encode()))
        return cls(e.host, e.port, tuple(headers), body)


def answered(s: Sample) -> bool:
    return s.status == 200 and s.events > 0


def is_sent(s: Sample) -> bool:
    return not math.isnan(s.sent)


class HeldH2:
    """`streams` held streams over `connections` h2c connections; `run` holds them until cancelled."""

    def __init__(self, request: H2Request, streams: int, connections: int, *, ramp: float = 0.0,
                 per_connection: int = MAX_STREAMS_PER_CONNECTION) -> None:
        if streams < 1 or connections < 1:
            raise ValueError(f"streams ({streams}) and connections ({connections}) must be >= 1")
        if math.ceil(streams / connections) > per_connection:
            raise ValueError(f"{streams} streams over {connections} connections: more than "
                             f"{per_connection} per connection")
        self.request, self.n, self.connections, self.ramp = request, streams, connections, ramp
        self.live = Live()
        self.samples = [Sample(i, 0, math.nan) for i in range(streams)]
        self.peak = 0  # most streams open at once
        self.answered = 0  # streams that got 200 + their first DATA bytes
        self.answered_open = 0  # of those, not ended or failed since
        self.settled = 0  # streams sent or failed
        self.all_sent = trio.Event()  # every stream sent or failed
        self.goaways = 0  # GOAWAY frames received (a server shutting down or refusing more)
        self.target_open: int | None = None  # streams the target held at the end of a `hold`
        self.held_after: float | None = None  # s from the first stream until every one was held or failed

    async def run(self) -> None:
        """Until cancelled (then every connection is closed); returns early only if all connections ended."""
        start = time.perf_counter()
        for i, s in enumerate(self.samples):
            s.scheduled = start + self.ramp * i / self.n
        async with trio.open_nursery() as nursery:
            for c in range(min(self.connections, self.n)):
                nursery.start_soon(self._connection, self.samples[c::self.connections])

    def finish(self) -> None:
        """After the stop: a stream still open was held to the end ("cancelled", as the HTTP/1.1 runs)."""
        now = time.perf_counter()
        for s in self.samples:
            if not s.outcome:
                s.outcome = "cancelled"
            if math.isnan(s.ended):
                s.ended = now
        self.live.open_streams = 0

    def summary(self, memory) -> Summary:
        """The run's figures (`loadtest.stats`: RSS idle/peak, KB per open stream over the plateau)."""
        # the open-stream peak is the memory trace's (held streams, what the sampler was fed), not `peak` (sent)
        held_peak = max((m.open_streams for m in memory), default=0)
        return summarize(self.samples, array("d"), memory, open_loop=False, peak_open=held_peak,
                         load={"streams": self.n, "connections": self.connections})

    def error_kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            if s.outcome and s.outcome != "cancelled":
                out[s.outcome] = out.get(s.outcome, 0) + 1
        return out

    # -- one connection --------------------------------------------------------------------

    def _settle(self) -> None:
        self.settled += 1
        if self.settled >= self.n:
            self.all_sent.set()

    def _fail(self, s: Sample, outcome: str, detail: str = "") -> None:
        if s.outcome:
            return
        if answered(s):
            self.answered_open -= 1
        s.outcome, s.detail, s.ended = outcome, detail[:MAX_DETAIL], time.perf_counter()
        if is_sent(s):
            self.live.open_streams -= 1  # settled when it was sent
        else:
            self._settle()
        self.live.errors += 1

    async def _connection(self, mine: list[Sample]) -> None:
        live, r = self.live, self.request
        await trio.sleep(max(0.0, mine[0].scheduled - time.perf_counter()))
        try:
            stream = await trio.open_tcp_stream(r.host, r.port)
        except OSError as exc:
            for s in mine:
                self._fail(s, "connect", f"{type(exc).__name__}: {exc}")
            return
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        lock = trio.Lock()  # one writer at a time; whoever holds it sends everything pending, in order
        by_id: dict[int, Sample] = {}
        settings = trio.Event()

        async def flush() -> None:
            async with lock:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)

        def handle(event: h2.events.Event, now: float) -> None:
            if isinstance(event, h2.events.RemoteSettingsChanged):
                settings.set()
                return
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaways += 1
                return
            s = by_id.get(getattr(event, "stream_id", 0) or 0)
            if s is None:
                return
            if isinstance(event, h2.events.ResponseReceived):
                s.headers = now
                s.status = int(dict(event.headers).get(b":status", b"0"))
                if s.status != 200:
                    self._fail(s, f"http_{s.status}")
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                s.events += 1
                s.bytes_in += len(event.data)
                live.bytes_in += len(event.data)
                if s.status != 200 and len(s.detail) < MAX_DETAIL:
                    s.detail += event.data[:MAX_DETAIL - len(s.detail)].decode("utf-8", "replace")
                elif s.events == 1 and s.status == 200 and not s.outcome:
                    self.answered += 1
                    self.answered_open += 1
            elif isinstance(event, h2.events.StreamEnded):
                if s.status == 0:
                    self._fail(s, "protocol", "stream ended without response headers")
                else:
                    self._fail(s, "ended", "a held stream ended")
            elif isinstance(event, h2.events.StreamReset):
                self._fail(s, "reset", f"RST_STREAM error code {event.error_code}")

        async def reader(cancel: trio.CancelScope) -> None:
            why = "connection closed by the server"
            try:
                while True:
                    data = await stream.receive_some(RECV_BYTES)
                    if not data:
                        break
                    now = time.perf_counter()
                    for event in conn.receive_data(data):
                        handle(event, now)
                    await flush()  # window updates, SETTINGS and PING acknowledgements
            except (OSError, trio.BrokenResourceError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            except h2.exceptions.ProtocolError as exc:
                why = f"h2 protocol error: {exc}"
            for s in mine:  # the connection is gone: so is every stream on it
                self._fail(s, "closed" if is_sent(s) else "connect", why)
            cancel.cancel()

        async with stream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, nursery.cancel_scope)
                try:
                    await flush()  # the preface and our SETTINGS
                    with trio.move_on_after(SETTINGS_TIMEOUT):
                        await settings.wait()
                    if not settings.is_set():
                        for s in mine:
                            self._fail(s, "protocol", f"no SETTINGS from the server in {SETTINGS_TIMEOUT:.0f} s")
                        nursery.cancel_scope.cancel()
                        return
                    for s in mine:
                        await trio.sleep(max(0.0, s.scheduled - time.perf_counter()))
                        if conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
                            self._fail(s, "over_limit", "server MAX_CONCURRENT_STREAMS "
                                       f"{conn.remote_settings.max_concurrent_streams}")
                            continue
                        sid = conn.get_next_available_stream_id()
                        conn.send_headers(sid, r.headers)
                        conn.send_data(sid, r.body, end_stream=True)
                        by_id[sid] = s
                        s.sent = time.perf_counter()
                        live.started += 1
                        live.open_streams += 1
                        self.peak = max(self.peak, live.open_streams)
                        self._settle()
                        await flush()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    for s in mine:
                        self._fail(s, "closed" if is_sent(s) else "connect", f"{type(exc).__name__}: {exc}")
                    nursery.cancel_scope.cancel()
                # the reader holds the streams until the run is cancelled or the connection ends


async def hold(pids: tuple[int, ...], request: H2Request, streams: int, *,
               per_connection: int = MAX_STREAMS_PER_CONNECTION, ramp: float = 1.0, settle: float = 60.0,
               hold_for: float = 6.0, interval: float = 0.25, idle_wait: float = 0.3,
               count_open: Callable[[], Awaitable[int | None]] | None = None
               ) -> tuple[HeldH2, Summary]:
    """Hold `streams` streams on ceil(streams / per_connection) connections while sampling `pids`.

    Held streams are the ones the target confirms: `count_open()` (the gateway's own count) when
    given, else the streams answered and still open. The RSS sampler (`loadtest.memory`, as in the
    HTTP/1.1 runs) is fed that count, so KB per stream divides by streams the target really holds,
    never by requests it has not read yet (at 10,000 streams on two shared cores a target lags the
    client by seconds). Idle RSS for `idle_wait` s first; the streams start over `ramp` s; once
    every stream is held or failed (or `settle` s after the ramp, whichever is first) they are held
    `hold_for` s more, then every connection is closed. `client.target_open`: held at the end;
    `client.held_after`: s until every stream was held or failed (None: not within `settle`).
    """
    connections = math.ceil(streams / per_connection)
    client = HeldH2(request, streams, connections, ramp=ramp, per_connection=per_connection)
    held = Live()  # only its open_streams is used: what the sampler records per sample
    sampler = MemorySampler(pids, interval, held)

    async def sample() -> None:
        counted = await count_open() if count_open is not None else None
        held.open_streams = counted if counted is not None else client.answered_open
        sampler.sample()

    async def sample_all() -> None:
        while True:
            await sample()
            await trio.sleep(sampler.interval)  # doubles when the trace is thinned (MAX_SAMPLES)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_all)
        await trio.sleep(idle_wait)
        nursery.start_soon(client.run)
        started = time.perf_counter()
        with trio.move_on_after(ramp + settle):
            while held.open_streams + client.live.errors < streams:
                await trio.sleep(interval)
            client.held_after = round(time.perf_counter() - started, 1)
        await trio.sleep(hold_for)
        await sample()  # the state at the end, streams still open
        client.target_open = held.open_streams
        nursery.cancel_scope.cancel()
    client.finish()
    return client, client.summary(sampler.samples)
