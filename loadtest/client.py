"""One request on the wire: raw trio sockets + `loadtest.http1` + `proxy.core.sse`, timed as it happens.

Why not httpx: per open stream httpx/httpcore keeps a pool entry, a response object, an async
generator chain and an h11 connection; measured here it reads ~48k events/s per core, about the
gateway's own relay rate, so it would have measured itself. This client is a socket, a ~100-byte
response decoder and an SSE decoder per stream, and one `recv` per arrival: it waits for
readability first and then reads the plain socket (trio's `receive_some` tries a read first,
which on a stream that is usually idle costs a second, failing syscall per event; profiled).

Timing rules (all `time.perf_counter()`: CLOCK_MONOTONIC, ns resolution):
- `sent` is taken just before the first byte of the request is written.
- Every arrival is stamped right after `receive_some` returns, before any decoding; each event
  decoded from that arrival gets that stamp. The first *content* event is the first token (see
  `loadtest.apis.classify`: a role-only chunk does not count).
- Inter-token latency: the gap between consecutive content events' stamps (events that arrive in
  one receive have a gap of 0: that is what the client saw).

Behaviours: `read_rate` paces reads (a slow reader: the kernel buffer then fills and TCP pushes
back on the server); `stall_after` K events stops reading and holds the socket; `abort_after` K
events closes it. K counts every SSE event, the role-only first chunk included.

Outcomes: "ok"; "aborted" / "stalled" (asked for); "cancelled" (cut by the end of a --duration
run); errors: "connect", "http_<status>", "timeout", "closed" (connection ended mid-response),
"protocol", "stream_error" (an error event), "incomplete" (clean close without [DONE]).

Tokens: `tokens` counts content events (what ITL is made of); `output_tokens` is the run's
tokenizer count of the text, made once after the response ended (`loadtest.tokens`): on the hot
path a content event's bytes are only appended to a per-request list.
"""

from __future__ import annotations

import math
import socket
import time
from array import array
from dataclasses import dataclass
from typing import Any, Callable

import trio

from proxy.core.sse import SSEDecoder, SSEError

from . import apis
from .http1 import ProtocolError, ResponseDecoder, encode_request
from .prompts import Length, Prompt, body as request_body, build as build_prompts
from .settings import Behaviour, Target
from .tokens import TokenCounter

RECV_BYTES = 65536
MAX_BODY = 16 * 1024 * 1024  # a non-streaming body we keep to count its tokens
MAX_ERROR_BODY = 2048  # of an error response, kept for the report


@dataclass(slots=True)
class Sample:
    """One request's timeline and result; the CSV has one row of these per request."""

    index: int
    endpoint: int
    scheduled: float  # when it was due to start (open loop) or started (closed loop)
    connect_start: float = math.nan
    sent: float = math.nan
    headers: float = math.nan
    first_token: float = math.nan
    last_token: float = math.nan
    ended: float = math.nan
    stalled_at: float = math.nan
    status: int = 0
    outcome: str = ""
    events: int = 0
    tokens: int = 0
    bytes_in: int = 0
    reused: bool = False
    detail: str = ""  # error text, short
    warmup: bool = False  # sent during the warm-up: not in the step's figures
    prompt: Any = None  # the loadtest.prompts.Prompt sent (None: the target's first)
    input_tokens: int = 0
    output_tokens: int = 0  # counted with the run's tokenizer (events with `events`)
    usage_tokens: int = -1  # output tokens the server reported; -1: no usage in the response


class Live:
    """Counters the progress line and the memory sampler read while the run goes on."""

    __slots__ = ("started", "done", "ok", "errors", "open_streams", "in_flight", "tokens", "bytes_in")

    def __init__(self) -> None:
        self.started = self.done = self.ok = self.errors = 0
        self.open_streams = 0  # request written, response not finished (stalled ones included)
        self.in_flight = 0  # started, not finished (connecting ones included)
        self.tokens = 0
        self.bytes_in = 0


class Connection:
    """A connected non-blocking socket; reads and writes go straight to it after trio's wait."""

    __slots__ = ("sock", "endpoint")

    def __init__(self, sock: socket.socket, endpoint: int) -> None:
        self.sock, self.endpoint = sock, endpoint

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]
        await trio.lowlevel.checkpoint_if_cancelled()

    async def recv(self, max_bytes: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:  # spurious wakeup
                continue

    def close(self) -> None:
        self.sock.close()  # synchronous: safe in finally blocks and under cancellation


class _Stale(Exception):
    """A kept-alive connection the server had already closed: retried once on a fresh one."""


_NOT_ERRORS = frozenset({"ok", "aborted", "stalled", "cancelled"})


def is_error(outcome: str) -> bool:
    return outcome not in _NOT_ERRORS


class Client:
    """Everything a run's requests share: request bytes (built once), sinks and live counters."""

    def __init__(self, target: Target, behaviour: Behaviour, live: Live, itl: array,
                 trio_offset: float, timeout: float = 300.0) -> None:
        self.target, self.behaviour, self.live, self.itl = target, behaviour, live, itl
        self.timeout = timeout
        self._offset = trio_offset  # trio.current_time() - time.perf_counter()
        self.counter = TokenCounter(target.tokenizer)
        prompts = target.prompts
        if prompts is None:
            cap = Length("constant", target.max_tokens) if target.max_tokens is not None else None
            prompts = build_prompts(self.counter, prompt=target.prompt, max_tokens=cap)
        self.prompts = prompts
        self.default_prompt: Prompt = prompts.conversations[0][0]
        headers = apis.request_headers(target.api, target.api_key)
        headers += [(k.lower().encode(), v.encode()) for k, v in target.extra_headers]
        # Every request's bytes, built once: per prompt, one per endpoint.
        self._wires: dict[int, list[bytes]] = {}
        for prompt in prompts.prompts:
            body = request_body(target.api, target.model, prompt, target.stream, target.stream_usage)
            self._wires[id(prompt)] = [
                encode_request(b"POST", b"%s:%d" % (e.host.encode(), e.port),
                               e.base_path + apis.request_path(target.api), headers, body)
                for e in target.endpoints]
        self._addresses: list[tuple] = []
        self.on_done: Callable[[Sample], None] | None = None  # the run's fail-fast guard

    async def resolve(self) -> None:
        """Once per run: no DNS (or thread) per connection."""
        for e in self.target.endpoints:
            infos = await trio.socket.getaddrinfo(e.host, e.port, type=socket.SOCK_STREAM)
            self._addresses.append(infos[0])

    async def sleep_until(self, when: float) -> None:
        await trio.sleep_until(when + self._offset)

    async def connect(self, endpoint: int) -> Connection:
        family, type_, proto, _, address = self._addresses[endpoint]
        raw = socket.socket(family, type_, proto)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the request goes out at once
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            await sock.connect(address)
        except BaseException:
            raw.close()
            raise
        return Connection(raw, endpoint)

    async def request(self, sample: Sample, conn: Connection | None, *, keep: bool = True
                      ) -> Connection | None:
        """Run one request; returns the connection if it may carry the next one."""
        live = self.live
        live.started += 1
        live.in_flight += 1
        reusable = False
        box = [conn]  # the connection in use, whoever opened it: closed below unless reusable
        try:
            with trio.move_on_after(self.timeout) as timer:
                try:
                    reusable = await self._exchange(sample, box)
                except _Stale:
                    box[0].close()
                    box[0] = None
                    live.open_streams -= 1
                    sample.sent, sample.reused = math.nan, False
                    reusable = await self._exchange(sample, box)
            if timer.cancelled_caught:
                sample.outcome, reusable = "timeout", False
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            sample.outcome = "connect" if math.isnan(sample.sent) else "closed"
            sample.detail = f"{type(exc).__name__}: {exc}"[:200]
        except (ProtocolError, SSEError) as exc:
            sample.outcome, sample.detail = "protocol", str(exc)[:200]
        finally:
            if not sample.outcome:
                sample.outcome = "cancelled"
            if math.isnan(sample.ended):
                sample.ended = time.perf_counter()
            live.in_flight -= 1
            if not math.isnan(sample.sent):
                live.open_streams -= 1
            live.done += 1
            if sample.outcome == "ok":
                live.ok += 1
            elif is_error(sample.outcome):
                live.errors += 1
            if box[0] is not None and not (reusable and keep):
                box[0].close()  # also when cancelled: nothing is left to the garbage collector
            if self.on_done is not None:
                self.on_done(sample)
        return box[0] if reusable and keep else None

    async def _exchange(self, sample: Sample, box: list[Connection | None]) -> bool:
        conn = box[0]
        if conn is None:
            sample.connect_start = time.perf_counter()
            conn = box[0] = await self.connect(sample.endpoint)
        else:
            sample.reused = True
        api, stream_mode, live = self.target.api, self.target.stream, self.live
        itl = self.itl if not sample.warmup else array("d")  # warm-up gaps are not measured
        prompt = sample.prompt if sample.prompt is not None else self.default_prompt
        sample.input_tokens = prompt.input_tokens
        counting = self.counter.counts_text
        kept: list[bytes] = []  # content events (when counting text) and usage events
        behaviour = self.behaviour
        rate = behaviour.read_rate
        recv_bytes = RECV_BYTES if rate is None else max(256, min(RECV_BYTES, int(rate / 20)))
        decoder, sse, body = ResponseDecoder(), SSEDecoder(), bytearray()
        classify, Kind = apis.classify, apis.Kind
        done = False

        try:
            sample.sent = time.perf_counter()
            live.open_streams += 1
            try:
                await conn.send_all(self._wires[id(prompt)][sample.endpoint])
            except OSError:
                if sample.reused:
                    raise _Stale from None
                raise
            read_start = time.perf_counter()
            while True:
                if rate is not None and sample.bytes_in:
                    await self.sleep_until(read_start + sample.bytes_in / rate)
                try:
                    data = await conn.recv(recv_bytes)
                except ConnectionResetError:
                    if sample.reused and not sample.bytes_in:
                        raise _Stale from None
                    raise
                now = time.perf_counter()
                if not data:
                    if sample.reused and not sample.bytes_in:
                        raise _Stale
                    decoder.close()  # raises unless the body ends with the connection
                    break
                sample.bytes_in += len(data)
                live.bytes_in += len(data)
                pieces = decoder.feed(data)
                head = decoder.head
                if head is None:
                    continue
                if not sample.status:
                    sample.headers, sample.status = now, head.status
                if head.status != 200 or not stream_mode:
                    for piece in pieces:
                        if len(body) < MAX_BODY:
                            body += piece
                    if decoder.done:
                        break
                    continue
                for piece in pieces:
                    for event in sse.feed(piece):
                        sample.events += 1
                        kind = classify(api, event.data)
                        if kind is Kind.TOKEN:
                            if sample.tokens:
                                itl.append(now - sample.last_token)
                            else:
                                sample.first_token = now
                            sample.last_token = now
                            sample.tokens += 1
                            live.tokens += 1
                            if counting:
                                kept.append(event.data)
                        elif kind is Kind.DONE:
                            done = True
                        elif kind is Kind.OTHER and b'"usage"' in event.data:
                            kept.append(event.data)
                        elif kind is Kind.ERROR:
                            sample.outcome, sample.detail = "stream_error", event.data[:200].decode("utf-8", "replace")
                        if behaviour.abort_after is not None and sample.events >= behaviour.abort_after:
                            sample.outcome, sample.ended = "aborted", now
                            return False
                        if behaviour.stall_after is not None and sample.events >= behaviour.stall_after:
                            sample.outcome, sample.stalled_at = "stalled", now
                            await trio.sleep(behaviour.hold)
                            return False
                if decoder.done:
                    break
            sample.ended = time.perf_counter()
            if sample.status != 200:
                sample.outcome = f"http_{sample.status}"
                sample.detail = bytes(body[:MAX_ERROR_BODY]).decode("utf-8", "replace")
            elif not stream_mode:
                sample.first_token = sample.last_token = sample.ended
                sample.tokens = apis.completion_tokens(api, bytes(body))
                live.tokens += sample.tokens
                sample.output_tokens, usage = self.counter.body(api, bytes(body))
                sample.usage_tokens = -1 if usage is None else usage
                sample.outcome = "ok"
            elif not sample.outcome:
                for event in sse.close():
                    if classify(api, event.data) is Kind.DONE:
                        done = True
                sample.outcome = "ok" if done else "incomplete"
            head = decoder.head
            return decoder.done and head is not None and head.keep_alive
        finally:
            # Counted whatever the outcome (aborted, stalled, cut): what arrived was received.
            if stream_mode and sample.status == 200:
                sample.output_tokens, usage = self.counter.stream(api, kept, sample.tokens)
                sample.usage_tokens = -1 if usage is None else usage
