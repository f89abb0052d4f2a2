"""Budgets across processes: `serve --workers 2` on one SQLite file, and two gateway instances
on one Redis. 100 concurrent requests on one key overspend by at most one reservation; a
revocation reaches every process within a second."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from tests.conftest import MASTER_KEY, PROVIDER_KEY, chat_body
from tests.redis_server import redis_url  # noqa: F401 (fixture)
from tests.test_keys_store import flush_redis

MAX_TOKENS = 20
BUDGET = 0.004


def write_config(folder: Path, provider_port: int, state: str, workers: int) -> Path:
    config = folder / f"gateway-{os.urandom(3).hex()}.toml"
    config.write_text(f"""
[server]
port = 0
workers = {workers}
[auth]
master_key_env = "TEST_MASTER_KEY"
[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:{provider_port}/v1"
api_key_env = "TEST_PROVIDER_KEY"
[models."gpt-4o"]
deployments = [{{provider = "fake"}}]
[model_info."gpt-4o"]
input_usd_per_mtok = 10.0
output_usd_per_mtok = 30.0
[budgets]
kill_at = 1.0
[state]
{state}
""")
    return config


class Gateway:
    def __init__(self, config: Path):
        env = {**os.environ, "TEST_MASTER_KEY": MASTER_KEY, "TEST_PROVIDER_KEY": PROVIDER_KEY}
        self.process = subprocess.Popen([sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve",
                                         "--config", str(config)], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env)

    async def url(self) -> str:
        line = await trio.to_thread.run_sync(self.process.stdout.readline)
        assert "gateway on" in line, line
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        async with httpx.AsyncClient() as client:  # every worker runs its lifespan (store open) first
            with trio.fail_after(20):
                while True:
                    try:
                        if (await client.get(url + "/healthz")).status_code == 200:
                            return url
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        finally:
            self.process.kill()
            self.process.wait()


async def overspend(urls: list[str], budget: float = BUDGET, waves: int = 1) -> tuple[int, dict]:
    """`waves` x 100 concurrent requests on one key. BUDGET is per-request reserves throughout (too
    small to lease); a budget of ~200 requests is leased at first (proxy/keys/leases.py)."""
    admin = {"authorization": f"Bearer {MASTER_KEY}"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)  # new connections: every worker
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        created = (await http.post(urls[0] + "/admin/keys", headers=admin,
                                   json={"name": "w", "budget_usd": budget, "budget_period": "total"})).json()
        key = {"authorization": f"Bearer {created['key']}"}
        await trio.sleep(1.0)  # every process sees a new key within its refresh (0.5 s + a round trip)
        for n in range(10):
            assert (await http.get(urls[n % len(urls)] + "/v1/models", headers=key)).status_code == 200
        statuses: list[int] = []

        async def one(n: int) -> None:
            response = await http.post(urls[n % len(urls)] + "/v1/chat/completions", headers=key,
                                       json=chat_body(max_tokens=MAX_TOKENS))
            statuses.append(response.status_code)

        for _ in range(waves):
            async with trio.open_nursery() as nursery:
                for n in range(100):
                    nursery.start_soon(one, n)
        total = 100 * waves
        served = statuses.count(200)
        assert statuses.count(429) == total - served and 0 < served < total, statuses
        with trio.fail_after(10):
            while True:
                rows = (await http.get(urls[0] + "/admin/spend?group_by=key&period=total", headers=admin)).json()
                row = next((r for r in rows["data"] if r["group"] == created["id"]), None)
                if row and row["requests"] == total:
                    break
                await trio.sleep(0.05)
        reservation = (row["input_tokens"] / served * 10 + MAX_TOKENS * 30) / 1e6
        assert row["spend_usd"] <= budget + reservation, row
        assert total * row["spend_usd"] / served > budget + reservation  # unreserved, all would pass
        # revoke through one process: every process refuses the key within a second
        await http.delete(f"{urls[-1]}/admin/keys/{created['id']}", headers=admin)
        start = trio.current_time()
        with trio.fail_after(1.0):
            while True:
                codes = [(await http.get(urls[n % len(urls)] + "/v1/models", headers=key)).status_code
                         for n in range(8)]
                if set(codes) == {401}:
                    break
        print(f"\nserved {served}/{total}, spent {row['spend_usd']:.6f} of {budget} (one reservation "
              f"{reservation:.6f}); revocation seen everywhere after {trio.current_time() - start:.2f} s")
        return served, row


async def test_two_workers_on_one_sqlite_file(fake, tmp_path):
    path = tmp_path / "gateway.db"
    gateway = Gateway(write_config(tmp_path, fake.port, f'path = "{path}"', workers=2))
    try:
        url = await gateway.url()
        await overspend([url])
        await overspend([url], budget=0.05, waves=4)
        owners = sqlite3.connect(path).execute("SELECT COUNT(*) FROM owners").fetchone()[0]
        assert owners == 2  # both workers used the store
    finally:
        gateway.stop()


async def test_two_instances_on_one_redis(fake, tmp_path, redis_url):
    flush_redis(redis_url)
    state = f'backend = "redis"\nurl = "{redis_url}"'
    one = Gateway(write_config(tmp_path, fake.port, state, workers=1))
    two = Gateway(write_config(tmp_path, fake.port, state, workers=2))
    try:
        urls = [await one.url(), await two.url()]
        await overspend(urls)
        await overspend(urls, budget=0.05, waves=4)
    finally:
        one.stop()
        two.stop()
