"""Serving the gateway: sockets, hypercorn (trio worker), TLS/HTTP-2, signals and drain.

Rules:
- We make the listening socket ourselves so we can set TCP_USER_TIMEOUT on it (accepted sockets
  inherit it on Linux). hypercorn shields its socket writes from cancellation; with this option
  the kernel fails a write the client has not acknowledged for `write_timeout`, which unblocks
  the shielded write and reclaims the connection (the relay has already released the upstream).
- Plain ports speak HTTP/1.1 and h2c (prior knowledge or Upgrade); with certfile/keyfile, TLS
  with ALPN h2 + http/1.1. `proxy.server.h2_flow` restores backpressure over HTTP/2.
- hypercorn's `read_timeout` stays off (SSE clients send nothing after the request) and
  `max_app_queue_size` bounds what a client can push at us before the app reads it.
- Shutdown (SIGTERM/SIGINT): stop accepting, let open requests finish for `drain_timeout`, then
  end the remaining streams with an error event, then exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
from functools import partial
from typing import Awaitable, Callable

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig, Sockets
from hypercorn.trio import worker_serve

from proxy.server import h2_flow, hypercorn_fast
from proxy.server.app import Gateway
from proxy.config import Config
from proxy.core.errors import ShuttingDown

log = logging.getLogger("proxy.server.serve")

BACKLOG = 4096
FINAL_WRITE_GRACE = 2.0  # seconds for aborted streams to write their error event before exit


def make_socket(host: str, port: int, write_timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(write_timeout * 1000))
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
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


async def serve(config: Config, gateway: Gateway | None = None, *, sock: socket.socket | None = None,
                shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM/SIGINT (or `shutdown_trigger` returns), then drain and return.

    `task_status.started` gets the bound URLs, e.g. ["http://127.0.0.1:41234"].
    """
    h2_flow.apply()
    hypercorn_fast.apply()  # HTTP/1.1 body writes without h11 and lock round trips
    gateway = gateway or Gateway(config)
    server = config.server
    sock = sock or make_socket(server.host, server.port, server.write_timeout)
    hc = hypercorn_config(config)
    secure = hc.ssl_enabled
    sockets = Sockets(secure_sockets=[sock] if secure else [], insecure_sockets=[] if secure else [sock],
                      quic_sockets=[])
    stop = trio.Event()

    async def stopped() -> None:
        await stop.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wait_for_stop, stop, shutdown_trigger)
        binds = await nursery.start(lambda task_status: worker_serve(
            ASGIWrapper(gateway), hc, sockets=sockets, shutdown_trigger=stopped, task_status=task_status))
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
    sock.close()


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


def run(config: Config, gateway: Gateway) -> int:
    """Run the gateway in the foreground: one process, or `[server] workers` forked processes.

    Workers share one listening socket made before the fork (the kernel spreads accepted
    connections over them); each runs its own trio loop and its own copy of the gateway, so
    per-process state (open streams, pools, limits) is per worker. The parent only forwards
    SIGTERM/SIGINT and waits, so shutdown drains every worker.
    """
    server = config.server
    sock = make_socket(server.host, server.port, server.write_timeout)
    host, port = sock.getsockname()[:2]
    scheme = "https" if server.certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    auth = "master key required" if gateway.auth_enabled else "no master key set: open access"
    print(f"gateway on {scheme}://{shown}:{port} ({server.workers} worker"
          f"{'s' if server.workers > 1 else ''}, {auth})", flush=True)
    if server.workers == 1:
        trio.run(partial(serve, config, gateway, sock=sock))
        return 0
    context = multiprocessing.get_context("fork")
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
    return max(abs(w.exitcode or 0) for w in workers)


def _worker(config: Config, gateway: Gateway, sock: socket.socket) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # trio installs its own handlers in serve()
    try:
        trio.run(partial(serve, config, gateway, sock=sock))
    except KeyboardInterrupt:
        pass
    sys.exit(0)
