"""The version gate every hypercorn patch in proxy/server shares: a patch written against one
hypercorn release refuses any other at start, naming what to re-check, instead of silently
misbehaving after an upgrade."""

from __future__ import annotations

from importlib.metadata import version


def require(supported: tuple[str, ...], patch: str, recheck: str) -> None:
    """Raise unless the installed hypercorn starts with one of `supported` (e.g. ("0.18.",))."""
    installed = version("hypercorn")
    if not installed.startswith(supported):
        raise RuntimeError(f"{patch} patches hypercorn {' / '.join(supported)}x, found {installed}: "
                           f"re-check {recheck}")
