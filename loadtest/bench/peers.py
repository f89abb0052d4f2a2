"""Installing the peer gateways (LiteLLM, Portkey) into a cache folder, on request only.

Recipes from ../shared/PLATFORM-NOTES.md: LiteLLM in its own venv with certifi pinned (newer
litellm wants a certifi the index lacks); Portkey from npm with `@hono/node-server` pinned to
1.13.5 (newer breaks streaming with HTTP 500). An install that fails is reported, never fatal:
the benchmark then skips that peer with the reason in bench.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LITELLM_PIP = ["litellm[proxy]", "certifi<=2026.10.18"]
PORTKEY_VERSION = "1.15.2"
HONO_NODE_SERVER = "1.13.5"


def litellm_venv(cache: Path) -> Path:
    return cache / "litellm" / "venv"


def portkey_root(cache: Path) -> Path:
    return cache / "portkey"


def litellm_installed(cache: Path) -> bool:
    return (litellm_venv(cache) / "bin" / "litellm").exists()


def portkey_installed(cache: Path) -> bool:
    return (portkey_root(cache) / "node_modules" / "@portkey-ai" / "gateway" / "build"
            / "start-server.js").exists()


def install_litellm(cache: Path) -> str | None:
    """None on success, else why not."""
    venv = litellm_venv(cache)
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *LITELLM_PIP], check=True,
                       capture_output=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return f"LiteLLM install failed: {exc}"
    return None


def install_portkey(cache: Path) -> str | None:
    root = portkey_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(json.dumps({
        "name": "portkey-peer", "private": True,
        "dependencies": {"@portkey-ai/gateway": PORTKEY_VERSION},
        "overrides": {"@hono/node-server": HONO_NODE_SERVER},
    }, indent=2))
    try:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=root, check=True,
                       capture_output=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return f"Portkey install failed: {exc}"
    return None


def litellm_version(cache: Path) -> str:
    try:
        out = subprocess.run([str(litellm_venv(cache) / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def portkey_version(cache: Path) -> str:
    try:
        pkg = portkey_root(cache) / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
        hono = portkey_root(cache) / "node_modules" / "@hono" / "node-server" / "package.json"
        return (f"{json.loads(pkg.read_text())['version']} "
                f"(@hono/node-server {json.loads(hono.read_text())['version']})")
    except (OSError, KeyError, ValueError):
        return "?"
