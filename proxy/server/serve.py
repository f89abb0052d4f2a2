"""Serving the gateway: sockets, hypercorn (trio worker), TLS/HTTP-2, signals and drain.

Rules:
- We make the listening socket ourselves so we can set TCP_USER_TIMEOUT on it (accepted sockets
  inherit it on Linux). hypercorn shields its socket writes from cancellation; with this option
  the kernel fails a write the client has not acknowledged for `write_timeout`, which unblocks
  the shielded write and reclaims the connection (the relay has already released the upstream).
- Plain ports speak HTTP/1.1 and h2c (prior knowledge or Upgrade); with certfile/keyfile, TLS
  with ALPN h2 + http/1.1. `proxy.server.h2_flow` restores backpressure over HTTP/2.
- hypercorn's `read_timeout` stays off (SSE clients send nothing after the request); request
  head and body deadlines, the open-connection bound and the close rules are
  `proxy.server.connections`, and `max_app_queue_size` bounds what a client can push at us
  before the app reads it.
- At start the open-file limit is raised to its hard limit (the figure is in the start line) and
  `max_connections` is lowered to what it allows; failed accepts are logged at most every 10 s.
- Shutdown (SIGTERM/SIGINT): stop accepting, let open requests finish for `drain_timeout`
  (requests on already-open connections are still answered, with `Connection: close`), then end
  the remaining streams with an error event, then close idle connections and exit.
- Memory: when many streams have ended, free heap pages go back to the OS (glibc `malloc_trim`,
  at most every TRIM_EVERY seconds, in a thread): without it RSS stays at its high-water mark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
from functools import partial
from typing import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig, Sockets
from hypercorn.trio import worker_serve

from proxy.server import app_queue, connections, h2_flow, hypercorn_fast, idle_timer
from proxy.server.app import Gateway
from proxy.config import Config, ServerConfig
from proxy.core.encodings import ENCODINGS, encoding
from proxy.core.errors import ShuttingDown
from proxy.observability.metrics import remove_shared, share_across_workers
from proxy.server.streams import Streams

log = logging.getLogger("proxy.server.serve")

BACKLOG = 4096
FINAL_WRITE_GRACE = 2.0  # seconds for aborted streams to write their error event before exit
FD_RESERVE = 100         # open files kept free of connections (listening socket, logs, DNS, ...)
NOFILE_CEILING = 1 << 20  # the soft limit asked for when the hard one is unlimited (Linux nr_open)
TRIM_EVERY = 5.0         # seconds between looks at whether memory should go back to the OS
TRIM_AFTER = 100         # ... which it does once this many streams ended since the last trim


class ListenError(Exception):
    """The listening socket could not be made; the message is the one line to show."""


def make_socket(host: str, port: int, write_timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(write_timeout * 1000))
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise ListenError(f"{where} is in use") from None
        raise ListenError(f"cannot listen on {where}: {e.strerror}") from None
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. above the kernel's nr_open: keep what we have
    return NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def connection_limit(server: ServerConfig) -> int:
    """`max_connections`, lowered to what the open-file limit allows."""
    open_files = raise_open_file_limit()
    return max(1, min(server.max_connections, (open_files - FD_RESERVE) // 2))


def connection_rules(server: ServerConfig) -> connections.ConnectionRules:
    return connections.ConnectionRules(
        header_timeout=server.header_timeout, body_timeout=server.body_timeout,
        min_body_rate=server.min_body_rate, max_connections=connection_limit(server))


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


async def return_memory(streams: Streams, until: trio.Event, *, every: float = TRIM_EVERY,
                        after: int = TRIM_AFTER, trim: Callable[[], Awaitable[object]] | None = None) -> None:
    """Until `until` is set: give free heap pages back to the OS once `after` streams ended since
    the last time (looked at every `every` seconds).

    Measured (2,000 concurrent streams through one process, RSS 38 MB before): 95 MB after without
    this, 92 MB with it; CPython's small-object allocator keeps most of the rest (an arena goes back
    only when every object in it is gone). With PYTHONMALLOC=malloc: 100 MB without, 70 MB with.
    """
    if trim is None:
        malloc_trim = _malloc_trim()
        if malloc_trim is None:
            return
        trim = partial(trio.to_thread.run_sync, malloc_trim, 0)  # walks the heap (ms): off the loop
    trimmed_at = streams.ended
    while not until.is_set():
        with trio.move_on_after(every):
            await until.wait()
        if streams.ended - trimmed_at >= after:
            trimmed_at = streams.ended
            await trim()


def hypercorn_config(config: Config, rules: connections.ConnectionRules | None = None) -> HypercornConfig:
    hc = HypercornConfig()
    setattr(hc, connections.RULES_ATTR, rules or connection_rules(config.server))
    hc.backlog = BACKLOG
    hc.read_timeout = None
    hc.keep_alive_timeout = 75.0  # longer than common client/LB idle timeouts
    hc.graceful_timeout = config.server.drain_timeout + FINAL_WRITE_GRACE + 1.0
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    if config.server.certfile:
        hc.certfile = config.server.certfile
        hc.keyfile = config.server.keyfile
    return hc


class AppWrapper:
    """hypercorn's app wrapper (its `AppWrapper` protocol) for the gateway: the call of hypercorn's
    `ASGIWrapper` without its coroutine: that one awaits the app, this returns the app's coroutine
    for hypercorn to await, so an open stream keeps one frame less for its whole life."""

    __slots__ = ("app",)

    def __init__(self, app: Gateway):
        self.app = app

    def __call__(self, scope, receive, send, sync_spawn, call_soon) -> Awaitable[None]:
        return self.app(scope, receive, send)


async def serve(config: Config, gateway: Gateway | None = None, *, sock: socket.socket | None = None,
                shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM/SIGINT (or `shutdown_trigger` returns), then drain and return.

    `task_status.started` gets the bound URLs, e.g. ["http://127.0.0.1:41234"].
    """
    h2_flow.apply()
    hypercorn_fast.apply()  # HTTP/1.1 body writes without h11 and lock round trips
    connections.apply()
    idle_timer.apply()  # keep-alive timer without scheduler round trips (new connections)
    app_queue.apply()  # the app's receive queue in ~0.13 KB instead of a memory channel's ~1.8 KB
    _quiet_accept_errors()
    gateway = gateway or Gateway(config)
    server = config.server
    sock = sock or make_socket(server.host, server.port, server.write_timeout)
    rules = connection_rules(server)
    log.info("open-file limit %d: at most %d open connections", raise_open_file_limit(), rules.max_connections)
    hc = hypercorn_config(config, rules)
    secure = hc.ssl_enabled
    sockets = Sockets(secure_sockets=[sock] if secure else [], insecure_sockets=[] if secure else [sock],
                      quic_sockets=[])
    stop = trio.Event()

    async def stopped() -> None:
        await stop.wait()

    served = trio.Event()  # hypercorn returned: no connection, no stream is left

    async def hypercorn(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await worker_serve(AppWrapper(gateway), hc, sockets=sockets, shutdown_trigger=stopped,
                               task_status=task_status)
        finally:
            served.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wait_for_stop, stop, shutdown_trigger)
        nursery.start_soon(return_memory, gateway.streams, rules.drained)
        # The streams' watchdog alarms (pump, alarms.py), for as long as a stream can be open.
        nursery.start_soon(gateway.streams.alarms.run, served)
        binds = await nursery.start(hypercorn)
        task_status.started(binds)
        await stop.wait()
        gateway.draining = True
        log.info("shutting down: draining %d open requests for up to %.1f s",
                 len(gateway.streams), server.drain_timeout)
        with trio.move_on_after(server.drain_timeout):
            await gateway.wait_idle()
        if len(gateway.streams):
            log.warning("drain timeout: ending %d open streams", len(gateway.streams))
            gateway.abort_streams(ShuttingDown("the gateway is shutting down; retry the request"))
            with trio.move_on_after(FINAL_WRITE_GRACE):
                await gateway.wait_idle()
        rules.drained.set()  # idle keep-alive connections close now; hypercorn then returns
        log.info("drain done: %d streams left open", len(gateway.streams))
    sock.close()


def _quiet_accept_errors() -> None:
    accept_log = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, connections.AcceptErrorFilter) for f in accept_log.filters):
        accept_log.addFilter(connections.AcceptErrorFilter())


async def _wait_for_stop(stop: trio.Event, trigger: Callable[[], Awaitable[None]] | None) -> None:
    if trigger is not None:
        await trigger()
        stop.set()
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()
            return


def run(config: Config, gateway: Gateway, *, pid_file: str | None = None) -> int:
    """Run the gateway in the foreground: one process, or `[server] workers` forked processes.

    Workers share one listening socket made before the fork (the kernel spreads accepted
    connections over them); each runs its own trio loop and its own copy of the gateway, so
    per-process state (open streams, pools, limits) is per worker. The parent only forwards
    SIGTERM/SIGINT and waits, so shutdown drains every worker. `pid_file` gets this process's
    PID (the one to signal) once the port is bound, and is removed on a clean exit.
    Raises ListenError when the port cannot be bound.
    """
    server = config.server
    sock = make_socket(server.host, server.port, server.write_timeout)
    host, port = sock.getsockname()[:2]
    scheme = "https" if server.certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    auth = "master key required" if gateway.auth_enabled else "no master key set: open access"
    open_files = raise_open_file_limit()
    if pid_file:
        write_pid_file(pid_file)  # before the start line: whoever waits for it can use the file
    print(f"gateway on {scheme}://{shown}:{port} (pid {os.getpid()}, {server.workers} worker"
          f"{'s' if server.workers > 1 else ''}, {auth}; open-file limit {open_files}, "
          f"max_connections {connection_limit(server)} per worker)", flush=True)
    try:
        return _run_workers(config, gateway, sock)
    finally:
        if pid_file:
            remove_pid_file(pid_file)


def write_pid_file(path: str) -> None:
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_pid_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def share_tokenizers() -> None:
    """Before the fork: load the token pre-count's tables (~79 MB o200k_base, ~34 MB cl100k_base,
    0.45 s; each worker would otherwise load its own at its first count) so that the workers share
    them copy-on-write, and freeze what exists so far (`gc.freeze`): the collector then never
    writes to those objects' pages in a worker. Total PSS after 40 requests: 2 workers 211 -> 165
    MB, 4 workers 389 -> 189 MB (bench.md; the sum of RSS grows, as it counts shared pages in
    every process). tests/test_shared_tokenizers.py: a worker's first count adds 5.5 MB of private
    memory, 82 MB without this."""
    for name in ENCODINGS:
        encoding(name)
    gc.freeze()


def _run_workers(config: Config, gateway: Gateway, sock: socket.socket) -> int:
    server = config.server
    if server.workers == 1:
        trio.run(partial(serve, config, gateway, sock=sock))
        return 0
    context = multiprocessing.get_context("fork")
    metrics_dir = share_across_workers()  # before the fork: every worker's metrics in one scrape
    share_tokenizers()
    workers = [context.Process(target=_worker, args=(config, gateway, sock), daemon=False)
               for _ in range(server.workers)]
    for worker in workers:
        worker.start()
    sock.close()  # the children hold it now

    def forward(signum: int, frame: object) -> None:
        for worker in workers:
            if worker.pid and worker.exitcode is None:
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    remove_shared(metrics_dir)
    return max(abs(w.exitcode or 0) for w in workers)


def _worker(config: Config, gateway: Gateway, sock: socket.socket) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # trio installs its own handlers in serve()
    try:
        trio.run(partial(serve, config, gateway, sock=sock))
    except KeyboardInterrupt:
        pass
    sys.exit(0)
