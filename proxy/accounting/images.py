"""Image input tokens by OpenAI's rule (platform.openai.com/docs/guides/vision, "Calculating costs").

    detail "low": 85 tokens.
    detail "high" / "auto": fit within 2048 x 2048, then shrink so the shortest side is at most 768,
    then 85 + 170 per 512-pixel tile.

The size is read from the image's header when the image is inline (a data: URL or Anthropic's
base64 source: PNG, GIF, WebP, JPEG); a remote URL is never fetched, so it is counted at the most
a high-detail image can cost (UNKNOWN_IMAGE_TOKENS: 768 x 2048, 8 tiles). Anthropic's own rule
(about w x h / 750, at most ~1,600) stays within the same range.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct

LOW_DETAIL_TOKENS = 85
TILE_TOKENS = 170
UNKNOWN_IMAGE_TOKENS = 85 + 170 * 8
_HEAD_BASE64 = 87_384  # base64 characters decoded to find a size: 64 KiB (JPEG headers can be long)


def tile_tokens(width: int, height: int) -> int:
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return LOW_DETAIL_TOKENS + TILE_TOKENS * math.ceil(w / 512) * math.ceil(h / 512)


def image_tokens(url: str | None, detail: str | None = None) -> int:
    """Tokens of an OpenAI `image_url` part."""
    if detail == "low":
        return LOW_DETAIL_TOKENS
    size = None
    if isinstance(url, str) and url.startswith("data:"):
        _, _, data = url.partition(",")
        size = base64_image_size(data)
    return UNKNOWN_IMAGE_TOKENS if size is None else tile_tokens(*size)


def base64_image_size(data: str) -> tuple[int, int] | None:
    head = data[:_HEAD_BASE64]
    head = head[: len(head) - len(head) % 4]
    try:
        return image_size(base64.b64decode(head))
    except (binascii.Error, ValueError):
        return None


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, GIF, WebP or JPEG file, else None."""
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return struct.unpack(">II", head[16:24])
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:2] == b"\xff\xd8":
            return _jpeg(head)
    except struct.error:
        return None
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8 ":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg(head: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame
            h, w = struct.unpack(">HH", head[i + 5:i + 9])
            return w, h
        i += 2 + struct.unpack(">H", head[i + 2:i + 4])[0]
    return None
