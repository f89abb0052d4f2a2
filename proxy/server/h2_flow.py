"""Backpressure over HTTP/2: a contained fix of hypercorn's h2 send buffer.

The flaw (hypercorn 0.17-0.18, `hypercorn/protocol/h2.py: StreamBuffer`): the send task calls
`pop(window)`; when the client's flow-control window is closed, `window` is 0, `pop` returns b""
and, because 0 bytes is "below the low-water mark", wakes the app's blocked `push`. The app then
keeps "sending" while every byte piles up in server memory (131 MB in < 1 s was measured against
a client that sent no WINDOW_UPDATE). Our relay relies on `send()` blocking, so over h2 a slow
client would no longer throttle the provider.

The fix: wake the writer only when the buffer really drained below the low-water mark, and
re-arm the pause on every push that finds the buffer full (the original could pass one stale
wake-up). Memory per h2 stream is then bounded by BUFFER_HIGH_WATER (32 KiB) plus one push.

The patch is applied to the two methods only, and only to the versions it was written against:
`apply()` refuses any other hypercorn (the test suite runs it, so an upgrade fails loudly rather
than silently losing backpressure). `tests/test_h2.py` proves both the flaw in the stock
class and the fix end to end with a client that never opens its window.
"""

from __future__ import annotations

from hypercorn.protocol import h2 as hypercorn_h2

from proxy.server import hypercorn_version

SUPPORTED = ("0.17.", "0.18.")

_original_push = hypercorn_h2.StreamBuffer.push
_original_pop = hypercorn_h2.StreamBuffer.pop


async def _push(self: hypercorn_h2.StreamBuffer, data: bytes) -> None:
    if self._complete:
        raise hypercorn_h2.BufferCompleteError()
    self.buffer.extend(data)
    await self._is_empty.clear()
    if len(self.buffer) >= hypercorn_h2.BUFFER_HIGH_WATER:
        await self._paused.clear()  # a wake-up from an earlier pop must not let this push through
        await self._paused.wait()


async def _pop(self: hypercorn_h2.StreamBuffer, max_length: int) -> bytes:
    length = min(len(self.buffer), max_length)
    data = bytes(self.buffer[:length])
    del self.buffer[:length]
    if len(self.buffer) < hypercorn_h2.BUFFER_LOW_WATER:  # was: len(data) < LOW_WATER
        await self._paused.set()
    if len(self.buffer) == 0:
        await self._is_empty.set()
    return data


def apply() -> None:
    hypercorn_version.require(SUPPORTED, "proxy.server.h2_flow", "hypercorn/protocol/h2.py StreamBuffer "
                              "against the notes in proxy/server/h2_flow.py")
    hypercorn_h2.StreamBuffer.push = _push
    hypercorn_h2.StreamBuffer.pop = _pop


def revert() -> None:
    """For the test that shows the stock behaviour."""
    hypercorn_h2.StreamBuffer.push = _original_push
    hypercorn_h2.StreamBuffer.pop = _original_pop
