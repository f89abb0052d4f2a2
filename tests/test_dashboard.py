"""GET /dashboard in a real headless chromium (DevTools protocol): the page loads, its numbers are live
and change while load runs, no console errors; the events need the master key; a screenshot."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
from functools import partial

import httpx
import pytest
import trio

from tests.conftest import MASTER_KEY, chat_body
from tests.test_metrics import start_with

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = pathlib.Path(__file__).parent.parent / "docs" / "dashboard.png"


async def first_event(url: str, **kw) -> dict:
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", url + "/dashboard/events", **kw) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"] == "text/event-stream"
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return json.loads(line[6:])
    raise AssertionError("no event")


async def test_page_and_events_need_the_master_key(nursery, fake, http):
    url, _ = await start_with(nursery, fake)
    async with httpx.AsyncClient(timeout=30) as anonymous:
        assert (await anonymous.get(url + "/dashboard")).status_code == 401
        assert (await anonymous.get(url + "/dashboard/events")).status_code == 401
        assert (await anonymous.get(url + "/dashboard?key=wrong")).status_code == 401
        page = await anonymous.get(url + f"/dashboard?key={MASTER_KEY}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
    await http.post(url + "/v1/chat/completions", json=chat_body())
    event = await first_event(url, params={"key": MASTER_KEY})
    assert event["models"][0]["model"] == "gpt-4o" and event["models"][0]["requests"] == 1
    assert {o["name"] for o in event["slo"]["objectives"]} == {"availability", "latency", "cost_per_request"}
    assert event["deployments"][0] == {"name": "fake/gpt-4o", "breaker": "closed", "attempts": 1, "failures": 0}
    event = await first_event(url, headers={"authorization": f"Bearer {MASTER_KEY}"})
    assert event["open_streams"] == 0


async def test_without_a_master_key_the_dashboard_is_open(nursery, fake):
    url, _ = await start_with(nursery, fake, master_key=None)
    async with httpx.AsyncClient(timeout=30) as anonymous:
        assert (await anonymous.get(url + "/dashboard")).status_code == 200
    assert (await first_event(url))["bypass"] is False


async def test_events_end_when_the_client_leaves_and_viewers_are_bounded(nursery, fake, monkeypatch):
    from proxy.observability import dashboard

    monkeypatch.setattr(dashboard, "MAX_VIEWERS", 1)
    url, gateway = await start_with(nursery, fake, master_key=None)
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", url + "/dashboard/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
            assert (await client.get(url + "/dashboard/events")).status_code == 429
    with trio.fail_after(5):
        while gateway._active:  # the event stream ended when its client left
            await trio.sleep(0.05)


class DevTools:
    """A minimal DevTools-protocol client: one websocket (wsproto over a trio TCP stream)."""

    def __init__(self, stream: trio.SocketStream, ws):
        self._stream, self._ws = stream, ws
        self._parts: list[str] = []
        self._messages: list[str] = []

    @classmethod
    async def connect(cls, ws_url: str) -> "DevTools":
        from urllib.parse import urlsplit

        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request

        where = urlsplit(ws_url)
        stream = await trio.open_tcp_stream(where.hostname, where.port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=where.netloc, target=where.path)))
        while True:
            ws.receive_data(await stream.receive_some(65536))
            if any(isinstance(event, AcceptConnection) for event in ws.events()):
                return cls(stream, ws)

    async def send(self, text: str) -> None:
        from wsproto.events import TextMessage

        await self._stream.send_all(self._ws.send(TextMessage(data=text)))

    async def receive(self) -> str:
        from wsproto.events import Ping, TextMessage

        while not self._messages:
            self._ws.receive_data(await self._stream.receive_some(1 << 20))
            for event in self._ws.events():
                if isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        self._messages.append("".join(self._parts))
                        self._parts = []
                elif isinstance(event, Ping):
                    await self._stream.send_all(self._ws.send(event.response()))
        return self._messages.pop(0)

    async def aclose(self) -> None:
        await self._stream.aclose()


def chromium_available() -> None:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI")
        pytest.skip("chromium not installed")


async def cdp_session(port: int):
    """The first page target's DevTools websocket (chromium's --remote-debugging-port)."""
    with trio.fail_after(20):
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                pages = [t for t in targets if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except httpx.HTTPError:
                pass
            await trio.sleep(0.2)


async def test_live_dashboard_in_headless_chromium(nursery, fake, http, tmp_path):
    chromium_available()
    url, _ = await start_with(nursery, fake, metrics={"per_key": True})
    profile = tempfile.mkdtemp(dir=tmp_path)
    port_file = pathlib.Path(profile) / "DevToolsActivePort"
    browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1000",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(30):
            while not port_file.exists() or not port_file.read_text().strip():
                await trio.sleep(0.1)
        ws_url = await cdp_session(int(port_file.read_text().split()[0]))
        ws = await DevTools.connect(ws_url)
        try:
            ids = iter(range(1, 1_000_000))
            console_errors: list[str] = []
            pending: dict[int, dict] = {}

            async def call(method: str, **params) -> dict:
                message_id = next(ids)
                await ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
                while message_id not in pending:
                    message = json.loads(await ws.receive())
                    if "id" in message:
                        pending[message["id"]] = message
                    elif message.get("method") == "Runtime.consoleAPICalled" and message["params"]["type"] == "error":
                        console_errors.append(json.dumps(message["params"]["args"])[:500])
                    elif message.get("method") == "Runtime.exceptionThrown":
                        console_errors.append(json.dumps(message["params"]["exceptionDetails"])[:500])
                    elif message.get("method") == "Log.entryAdded" and message["params"]["entry"]["level"] == "error":
                        console_errors.append(message["params"]["entry"]["text"][:500])
                reply = pending.pop(message_id)
                assert "error" not in reply, reply
                return reply["result"]

            async def text(element: str) -> str:
                result = await call("Runtime.evaluate",
                                    expression=f"(document.getElementById('{element}') || {{}}).textContent || ''")
                return result["result"].get("value", "")

            await call("Runtime.enable")
            await call("Log.enable")
            await call("Page.enable")
            await call("Page.navigate", url=f"{url}/dashboard?key={MASTER_KEY}")
            with trio.fail_after(20):
                while not (await text("status")).startswith("live"):
                    await trio.sleep(0.2)
            assert (await call("Runtime.evaluate", expression="location.search"))["result"]["value"] == ""
            before = await text("models")

            async def load() -> None:  # streams and plain answers, one failing now and then
                async with trio.open_nursery() as inner:
                    for i in range(60):
                        content = 'fake: {"status": 500}' if i % 10 == 9 else 'fake: {"itl": 0.02}'
                        inner.start_soon(partial(http.post, url + "/v1/chat/completions",
                                                 json=chat_body(content, stream=i % 2 == 0)))
                        await trio.sleep(0.05)

            nursery.start_soon(load)
            seen: set[str] = set()
            with trio.fail_after(30):
                while len(seen) < 3:  # the numbers change while the load runs
                    await trio.sleep(1.0)
                    seen.add(await text("models") + await text("rps"))
            after = await text("models")
            assert after != before and "gpt-4o" in after
            assert await text("avail") not in ("", "–")
            await trio.sleep(1.5)
            shot = await call("Page.captureScreenshot", format="png")
            import base64

            png = base64.b64decode(shot["data"])
            assert png.startswith(b"\x89PNG") and len(png) > 20_000
            # docs/dashboard.png (the README's) is made by this test with UPDATE_SCREENSHOT=1
            target = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "dashboard.png"
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(png)
            assert console_errors == []
        finally:
            await ws.aclose()
    finally:
        browser.kill()
        browser.wait()
