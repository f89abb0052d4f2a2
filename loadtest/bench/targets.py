"""The processes a benchmark measures: the fake provider, the two floors, this gateway, LiteLLM, Portkey.

Rules:
- Every target is a child process on loopback with a port picked here; the load generator runs
  in the benchmark's own process (one more process, never inside a target).
- Children get RLIMIT_NOFILE raised (we run as whoever runs us; root may raise the hard limit):
  a gateway holding 10,000 streams needs 20,000+ descriptors (client side + upstream side).
- A target is ready when a real chat request through it succeeds, not when its port opens.
- `stop()` sends SIGTERM, waits, then SIGKILL: always, even when a scenario failed.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .. import apis
from ..runner import run
from ..settings import RunSettings, Shape, Target as LoadTarget

CHILD_NOFILE = 200_000
MASTER_KEY = "sk-bench-master-0000"
PROVIDER_KEY = "sk-bench-provider-0000"
MODEL = "fake-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_child_limits() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (CHILD_NOFILE, CHILD_NOFILE))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def child_fd_limit() -> int:
    """The RLIMIT_NOFILE the children get: CHILD_NOFILE where we may raise the hard limit, else the hard limit.

    A relay holds two sockets per stream (client and upstream): a sandbox that refuses to raise
    the hard limit (root without CAP_SYS_RESOURCE) caps every target near limit / 2 streams.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= CHILD_NOFILE:
        return CHILD_NOFILE
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, CHILD_NOFILE))  # our own hard limit: harmless
    except (ValueError, OSError):
        return hard
    return CHILD_NOFILE


@dataclass
class Running:
    name: str
    urls: tuple[str, ...]
    procs: list[subprocess.Popen]
    headers: tuple[tuple[str, str], ...] = ()
    api_key: str | None = None
    command: str = ""
    notes: list[str] = field(default_factory=list)
    _logs: list = field(default_factory=list)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)

    def load_target(self, prompt: str, *, stream: bool = True, max_tokens: int | None = None) -> LoadTarget:
        return LoadTarget(urls=self.urls, model=MODEL, api=apis.OPENAI, api_key=self.api_key,
                          prompt=prompt, stream=stream, max_tokens=max_tokens, extra_headers=self.headers)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: str | None = None
           ) -> tuple[subprocess.Popen, object]:
    f = open(log, "ab")
    proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=cwd, preexec_fn=_raise_child_limits, start_new_session=True)
    return proc, f


async def wait_ready(target: Running, timeout: float = 90.0) -> None:
    """Until one streamed chat request through the target succeeds."""
    deadline = trio.current_time() + timeout
    last = ""
    while trio.current_time() < deadline:
        for p in target.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{target.name} exited with {p.returncode} (see its log)")
        settings = RunSettings(target=target.load_target('fake: {"tokens": 2}'),
                               shape=Shape(concurrency=1, requests=len(target.urls), timeout=5),
                               progress=False)
        result = await run(settings)
        if result.summary.ok == len(target.urls):
            return
        last = str(result.summary.outcomes) + " " + str(result.summary.error_details)[:300]
        await trio.sleep(0.5)
    raise RuntimeError(f"{target.name} not ready after {timeout:.0f} s: {last}")


def start_provider(workdir: Path) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "fake-provider", "--port", str(port)]
    proc, log = _spawn(argv, workdir / "provider.log")
    return Running("fake provider (direct)", (f"http://127.0.0.1:{port}/v1",), [proc],
                   command=" ".join(argv[1:]), _logs=[log])


FLOORS = {  # bench target key -> (module, display name)
    "floor-trio": ("loadtest.bench.floor_trio", "floor: raw trio"),
    "floor-hypercorn": ("loadtest.bench.floor_hypercorn", "floor: hypercorn"),
}


def start_floor(workdir: Path, upstream: str, key: str) -> Running:
    """A floor target (see floor_trio / floor_hypercorn): a bare relay to the provider at `upstream`."""
    module, name = FLOORS[key]
    port = free_port()
    host_port = upstream.split("://", 1)[1].split("/", 1)[0]
    argv = [sys.executable, "-m", module, "--port", str(port), "--upstream", host_port]
    proc, log = _spawn(argv, workdir / f"{key}-{port}.log")
    return Running(name, (f"http://127.0.0.1:{port}/v1",), [proc], command=" ".join(argv[1:]), _logs=[log])


GATEWAY_TOML = """\
[server]
host = "127.0.0.1"
port = {port}

[auth]
master_key_env = "BENCH_MASTER_KEY"

[providers.fake]
kind = "openai"
base_url = "{upstream}"
api_key_env = "BENCH_PROVIDER_KEY"
max_concurrency = 100000

[models."*"]
deployments = [{{provider = "fake"}}]
"""


def start_gateway(workdir: Path, upstream: str, workers: int = 1) -> Running:
    """`workers` > 1: the gateway's own `--workers N` (forked processes sharing one socket)."""
    port = free_port()
    config = workdir / f"gateway-{port}.toml"
    config.write_text(GATEWAY_TOML.format(port=port, upstream=upstream))
    argv = [sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--config", str(config),
            "--workers", str(workers)]
    proc, log = _spawn(argv, workdir / f"gateway-{port}.log",
                       env={"BENCH_MASTER_KEY": MASTER_KEY, "BENCH_PROVIDER_KEY": PROVIDER_KEY})
    name = "this gateway" if workers == 1 else f"this gateway --workers {workers}"
    return Running(name, (f"http://127.0.0.1:{port}/v1",), [proc], api_key=MASTER_KEY,
                   command=" ".join(argv[1:]), _logs=[log])


LITELLM_YAML = """\
model_list:
  - model_name: "*"
    litellm_params:
      model: "openai/*"
      api_base: "{upstream}"
      api_key: "{key}"
"""


def start_litellm(workdir: Path, upstream: str, venv: Path) -> Running:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(LITELLM_YAML.format(upstream=upstream, key=PROVIDER_KEY))
    argv = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER_KEY,
           "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True",
           # The fake provider's fixed-size tokens are identical chunks; LiteLLM would end such a
           # stream after 100 of them (its repetition guard) and retry upstream.
           "REPEATED_STREAMING_CHUNK_LIMIT": "1000000000"}
    proc, log = _spawn(argv, workdir / "litellm.log", env=env)
    return Running("LiteLLM", (f"http://127.0.0.1:{port}/v1",), [proc], api_key=MASTER_KEY,
                   command="litellm " + " ".join(argv[1:]), _logs=[log])


# Portkey listens on every interface: this preload pins its listen() to loopback.
PORTKEY_PRELOAD = """\
import net from 'node:net';
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'object' && args[0] !== null) { args[0] = { ...args[0], host: '127.0.0.1' }; }
  else if (typeof args[0] === 'number' || typeof args[0] === 'string') {
    if (typeof args[1] !== 'string') { args.splice(1, 0, '127.0.0.1'); } else { args[1] = '127.0.0.1'; }
  }
  return listen.apply(this, args);
};
"""


def start_portkey(workdir: Path, upstream: str, root: Path) -> Running:
    port = free_port()
    preload = workdir / "loopback.mjs"
    preload.write_text(PORTKEY_PRELOAD)
    script = root / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    argv = ["node", "--import", str(preload), str(script), f"--port={port}", "--headless"]
    proc, log = _spawn(argv, workdir / "portkey.log", cwd=str(root))
    headers = (("x-portkey-provider", "openai"), ("x-portkey-custom-host", upstream))
    return Running("Portkey", (f"http://127.0.0.1:{port}/v1",), [proc], headers=headers,
                   api_key=PROVIDER_KEY, command="node " + " ".join(argv[1:]), _logs=[log])


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="loadtest-bench-"))
