"""The gateway's socket receive (proxy/transport/sockets.py): trio's recv semantics, one frame."""

import socket
import struct

import pytest
import trio
import trio.testing

from proxy.transport.sockets import receive


def pair():
    a, b = socket.socketpair()
    return trio.socket.from_stdlib_socket(a), b


async def test_reads_what_is_there_waits_for_more_and_returns_empty_at_eof():
    sock, peer = pair()
    with sock, peer:
        peer.sendall(b"hello")
        with trio.testing.assert_checkpoints():  # data at once still yields once
            assert await receive(sock, 100) == b"hello"
        got = []

        async def read():
            got.append(await receive(sock, 100))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # waiting
            peer.sendall(b"world")
        assert got == [b"world"]
        peer.shutdown(socket.SHUT_WR)
        assert await receive(sock, 100) == b""


async def test_at_most_max_bytes_per_call():
    sock, peer = pair()
    with sock, peer:
        peer.sendall(b"abcdef")
        assert await receive(sock, 4) == b"abcd"
        assert await receive(sock, 4) == b"ef"


async def test_a_closed_socket_raises_closed_resource_error_before_and_while_waiting():
    sock, peer = pair()
    with peer:
        async with trio.open_nursery() as nursery:
            async def read():
                with pytest.raises(trio.ClosedResourceError):
                    await receive(sock, 100)

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            sock.close()  # wakes the waiting reader (trio's notify_closing)
        with pytest.raises(trio.ClosedResourceError):
            await receive(sock, 100)


async def test_cancellation_while_waiting_loses_nothing():
    sock, peer = pair()
    with sock, peer:
        with trio.move_on_after(0.05) as scope:
            await receive(sock, 100)
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            peer.sendall(b"later")
            with pytest.raises(trio.Cancelled):
                await receive(sock, 100)  # cancelled before reading: the bytes stay in the socket
        assert await receive(sock, 100) == b"later"


async def test_a_reset_is_the_kernels_oserror():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    with trio.socket.from_stdlib_socket(client) as sock:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # linger 0: RST instead of FIN
        await trio.sleep(0.01)
        with pytest.raises(ConnectionResetError):
            await receive(sock, 100)
