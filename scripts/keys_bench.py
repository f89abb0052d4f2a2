"""Virtual keys' cost per request, for bench.md.

`policy`: CPU of auth + admit + settle of the keys policy against the SQLite store, no sockets:
a key with rpm, tpm, max_parallel and a budget, with leases (admitted from this process's
allowances; a store round trip per renewal) or without (`--leases off`: one atomic reserve in
the store per request), and a key without limits (no store round trip at admission, one settle). CPU is
the whole process's (time.process_time: the store's writer thread included), per request.
Requests run `--concurrency` at a time (1 = one after the other: no batching in the store).

`e2e`: a gateway process in front of the fake provider; C clients send N chat requests; the
gateway process's CPU per request (psutil, user + system) with the master key (keys off: no
[state]) and with a limited virtual key (keys on, SQLite). Loopback only.

    python scripts/keys_bench.py policy [--requests 5000] [--concurrency 1 100] [--leases on off]
    python scripts/keys_bench.py e2e [--requests 2000] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import httpx
import psutil
import trio

from proxy.config import parse_config
from proxy.core.request import parse_chat_request
from proxy.core.usage import Usage
from proxy.keys.policy import KeysPolicy
from proxy.keys.records import new_record
from proxy.routing.failover import Served
from proxy.server.exchange import Exchange

MASTER = "sk-bench-master"
RAW = {"providers": {"fake": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
       "models": {"gpt-4o": {"deployments": [{"provider": "fake"}]}},
       "model_info": {"gpt-4o": {"input_usd_per_mtok": 2.5, "output_usd_per_mtok": 10.0}}}
BODY = b'{"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "Hello there"}]}'


async def _policy_run(limited: bool, requests: int, concurrency: int, folder: str, redis: str | None,
                      leases: bool = True, stream: bool = False, tight: bool = False) -> tuple[float, float]:
    """tight: max_parallel twice the concurrency and each stream open 10 ms (slot leases churn: a
    lease gets half of the free slots, gives back the unused ones every tick)."""
    state = ({"backend": "redis", "url": redis} if redis else
             {"path": os.path.join(folder, f"bench-{limited}-{concurrency}-{os.urandom(3).hex()}.db")})
    config = parse_config({**RAW, "state": state})
    policy = KeysPolicy(config)
    policy.use_leases = leases
    await policy.open()
    fields = {"name": "bench"}
    if limited:
        fields.update(rpm=10**9, tpm=10**12, max_parallel=2 * concurrency if tight else 10**6, budget_usd=10**6)
    record, secret = new_record(fields)
    await policy.store.put_key(record)
    await policy.refresh()
    request = parse_chat_request(BODY)
    token = secret.encode()

    async def one(n: int) -> None:
        x = Exchange(f"r{n}", "/v1/chat/completions", policy.authenticate(token), time.perf_counter(),
                     endpoint="chat", model="gpt-4o")
        x.served, x.usage = Served(), Usage(prompt_tokens=12, completion_tokens=40)
        x.stream = stream  # a stream of a key with max_parallel also takes a stream slot (a slot lease)
        x.notes["prompt_tokens"], x.notes["max_tokens"] = 12, 50
        await policy.admit(x, request)
        if tight:
            await trio.sleep(0.01)
        policy.settle(x)

    async def worker(ids: range) -> None:
        for n in ids:
            await one(n)

    for n in range(200):  # warm up: caches, the store's pages
        await one(n)
    await policy.store.flush()
    local = policy.leases.local if policy.leases else 0
    cpu = time.process_time()
    async with trio.open_nursery() as nursery:
        for w in range(concurrency):
            nursery.start_soon(worker, range(w, requests, concurrency))
    await policy.store.flush()  # the settles' commits count too
    used = time.process_time() - cpu
    local = (policy.leases.local - local) / requests if policy.leases else 0.0
    await policy.aclose()
    return used / requests * 1e6, local


def _redis_server(folder: str) -> tuple[subprocess.Popen, str]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return process, f"redis://127.0.0.1:{port}/0"


def policy(args: argparse.Namespace) -> None:
    print(f"keys policy CPU per request (auth + admit + settle), {args.requests} requests, median of "
          f"{args.repeat}; this process's CPU (Redis server's not included); {platform.python_version()}, "
          f"{os.cpu_count()} cores, shared machine")
    print("| store | key | leases | concurrency | µs CPU / request | admitted from leases |\n"
          "|---|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        server, url = _redis_server(folder) if "redis" in args.backend else (None, None)
        try:
            for backend in args.backend:
                for limited, leases, stream, tight in ((True, "on", False, False), (True, "on", True, False),
                                                       (True, "on", True, True), (True, "off", False, False),
                                                       (False, "-", False, False)):
                    if leases not in args.leases and leases != "-":
                        continue
                    for concurrency in args.concurrency:
                        requests = min(args.requests, 1000 * concurrency) if tight else args.requests
                        runs = [trio.run(_policy_run, limited, requests, concurrency, folder,
                                         url if backend == "redis" else None, leases == "on", stream, tight)
                                for _ in range(args.repeat)]
                        name = "rpm+tpm+parallel+budget" if limited else "no limits"
                        name += ", streamed" if stream else ""
                        name += (f" (max_parallel {2 * concurrency}, 10 ms each; less the same loop without "
                                 f"limits)") if tight else ""
                        cpu = statistics.median(r[0] for r in runs)
                        if tight:  # the 10 ms waits cost the event loop CPU too: less the same loop, no limits
                            cpu -= statistics.median(
                                trio.run(_policy_run, False, requests, concurrency, folder,
                                         url if backend == "redis" else None, True, True, True)[0]
                                for _ in range(args.repeat))
                        local = statistics.median(r[1] for r in runs)
                        print(f"| {backend} | {name} | {leases} | {concurrency} | {cpu:.1f} | {local:.0%} |")
        finally:
            if server is not None:
                server.terminate()


# -- end to end --

def _config(folder: str, provider_port: int, keys: bool) -> str:
    path = os.path.join(folder, f"e2e-{keys}.toml")
    with open(path, "w") as f:
        f.write(f"""[server]\nport = 0\n[auth]\nmaster_key_env = "BENCH_MASTER"
[providers.fake]\nkind = "openai"\nbase_url = "http://127.0.0.1:{provider_port}/v1"
[models."gpt-4o"]\ndeployments = [{{provider = "fake"}}]
[model_info."gpt-4o"]\ninput_usd_per_mtok = 2.5\noutput_usd_per_mtok = 10.0\n""")
        if keys:
            f.write(f'[state]\npath = "{os.path.join(folder, f"e2e-{os.urandom(4).hex()}.db")}"\n')  # a fresh store
    return path


async def _e2e_run(keys: str, requests: int, concurrency: int, provider_port: int, folder: str) -> float:
    env = {**os.environ, "BENCH_MASTER": MASTER}
    process = subprocess.Popen([sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--config",
                                _config(folder, provider_port, keys != "off")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = await trio.to_thread.run_sync(process.stdout.readline)
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:
            auth = {"authorization": f"Bearer {MASTER}"}
            if keys != "off":
                limits = {"rpm": 10**9, "tpm": 10**12, "max_parallel": 10**6, "budget_usd": 10**6}
                created = (await http.post(url + "/admin/keys", headers=auth, json={
                    "name": "bench", **(limits if keys == "limited" else {})})).json()
                auth = {"authorization": f"Bearer {created['key']}"}

            async def worker(count: int) -> None:
                for _ in range(count):
                    response = await http.post(url + "/v1/chat/completions", headers=auth, content=BODY)
                    assert response.status_code == 200, response.text

            await worker(100)  # warm up
            gateway = psutil.Process(process.pid)
            before = gateway.cpu_times()
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker, requests // concurrency)
            await trio.sleep(0.3)  # the last settles' commits
            after = gateway.cpu_times()
        return ((after.user + after.system) - (before.user + before.system)) / requests * 1e6
    finally:
        process.terminate()
        process.wait(timeout=30)


async def _e2e(args: argparse.Namespace) -> None:
    from proxy.testing.fake import FakeProvider, FakeSettings

    fake = FakeProvider(FakeSettings(tokens=20, ttft=0, itl=0))
    with tempfile.TemporaryDirectory() as folder:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(fake.serve, "127.0.0.1", 0))
            print(f"gateway CPU per request, {args.requests} chat requests (20 tokens, not streamed), "
                  f"{args.concurrency} clients, median of {args.repeat}; shared 2-core machine")
            print("| auth | µs CPU / request |\n|---|---:|")
            names = {"off": "master key, keys off", "plain": "virtual key without limits (SQLite)",
                     "limited": "virtual key with rpm+tpm+parallel+budget (SQLite)"}
            runs: dict[str, list[float]] = {keys: [] for keys in names}
            for _ in range(args.repeat):  # the modes in turn within each repeat: a change in the
                for keys in names:         # machine's load falls on all of them, not on one
                    runs[keys].append(await _e2e_run(keys, args.requests, args.concurrency, port, folder))
            results = {keys: statistics.median(values) for keys, values in runs.items()}
            for keys in names:
                print(f"| {names[keys]} | {results[keys]:.0f} |")
            for keys in ("plain", "limited"):
                print(f"{names[keys]}: +{results[keys] - results['off']:.0f} µs CPU per request end to end")
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("policy")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 100])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backend", nargs="+", default=["sqlite", "redis"], choices=("sqlite", "redis"))
    p.add_argument("--leases", nargs="+", default=["on", "off"], choices=("on", "off"))
    e = sub.add_parser("e2e")
    e.add_argument("--requests", type=int, default=2000)
    e.add_argument("--concurrency", type=int, default=20)
    e.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if args.command == "policy":
        policy(args)
    else:
        trio.run(_e2e, args)


if __name__ == "__main__":
    main()
