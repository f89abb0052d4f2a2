"""One socket receive with trio's semantics and fewer frames: what a held stream waits in.

Why: trio's `SocketStream.receive_some` -> `_translate_socket_errors_to_stream_errors` (a
generator context manager) -> the socket method wrapper -> `_nonblocking_helper` -> the wait keeps
four coroutine frames and a generator alive for as long as the socket is quiet. A stream waiting
for its first token waits in two such receives (the client's socket, read by the server for a
disconnect; the provider's socket): ~1.5 KB of every held stream, and the same layers are walked
on every relayed read. `receive` is those semantics in one frame, on public trio API only.

Semantics kept (trio's `_try_sync` / `_nonblocking_helper`): a checkpoint either way (cancelled
before the read if the scope is already cancelled; a successful read yields once, shielded, so a
busy socket cannot starve other tasks); `ClosedResourceError` if the socket is closed before or
while waiting (trio's `close()` wakes waiters through `notify_closing`); other socket errors are
the kernel's `OSError`. POSIX: `read(2)` on a stream socket is `recv(2)` without flags.
"""

from __future__ import annotations

import os
from typing import Awaitable

import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled, wait_readable


async def receive(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """`await sock.recv(max_bytes)` for a non-blocking trio socket; b"" at EOF."""
    await checkpoint_if_cancelled()
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was closed")
    try:
        data = os.read(fd, max_bytes)
    except BlockingIOError:
        pass
    else:
        await cancel_shielded_checkpoint()
        return data
    while True:
        await wait_readable(sock)  # ClosedResourceError if closed meanwhile
        # Re-read the descriptor: a socket closed and its number reused meanwhile must not be read.
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass


def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int) -> Awaitable[bytes]:
    """`stream.receive_some(max_bytes)`, in one frame (`receive`) when it is a plain TCP stream.
    Not a coroutine of its own: it returns the receive to await, so no frame of this function is
    kept while a stream waits."""
    if type(stream) is trio.SocketStream:
        return receive(stream.socket, max_bytes)
    return stream.receive_some(max_bytes)
