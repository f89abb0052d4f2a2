"""The fake provider over real sockets: httpx as the client, raw trio sockets where bytes matter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from proxy.testing.fake import FakeProvider, FakeSettings, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def provider(nursery):
    fp = FakeProvider()
    await nursery.start(fp.serve)
    return fp


@pytest.fixture
async def client(provider):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{provider.port}", timeout=5) as c:
        yield c


def chat(content="hello there world", **extra):
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **extra}


async def sse(response: httpx.Response) -> list:
    """The stream's events: parsed JSON objects, and the string "[DONE]"."""
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def stream_events(client, body):
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        return r, await sse(r)


async def closed(record):
    with trio.fail_after(5):
        await record.closed.wait()


# -- responses --

async def test_non_stream_shape_and_usage(client, provider):
    r = await client.post("/v1/chat/completions", json=chat(),
                          headers={"authorization": "Bearer pk"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "chatcmpl-fake-1"
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-test"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith(" The quick brown")
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}

    [rec] = provider.records
    await closed(rec)
    assert rec.completed and not rec.peer_closed_early
    assert rec.authorization == "Bearer pk"
    assert rec.model == "gpt-test" and rec.stream is False and rec.status == 200
    assert rec.body == chat()
    assert rec.bytes_sent == len(r.content)
    assert rec.tokens_sent == 16
    assert rec.ended_at >= rec.started_at


async def test_stream_chunks(client, provider):
    body = chat(stream=True, stream_options={"include_usage": True})
    r, events = await stream_events(client, body)
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        assert c["id"] == "chatcmpl-fake-1" and c["object"] == "chat.completion.chunk"
        assert c["model"] == "gpt-test" and isinstance(c["created"], int)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    content = chunks[1:-2]
    assert len(content) == 16
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text.startswith(" The quick brown fox")
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}

    [rec] = provider.records
    await closed(rec)
    assert rec.stream and rec.completed and rec.tokens_sent == 16
    assert not rec.peer_closed_early


async def test_stream_without_usage_and_exact_bytes_sent(client, provider):
    async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"  # no usage chunk
    rec = provider.records[0]
    await closed(rec)
    assert rec.bytes_sent == len(raw)


async def test_max_tokens_caps_with_length(client, provider):
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=5))
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 5

    _, events = await stream_events(client, chat(stream=True, max_completion_tokens=3))
    assert len(events) == 1 + 3 + 1 + 1  # role, tokens, finish, [DONE]
    assert events[-2]["choices"][0]["finish_reason"] == "length"

    # A cap above the token count is not a truncation.
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=100))
    assert r.json()["choices"][0]["finish_reason"] == "stop"


async def test_directive_overrides_settings(client, provider):
    content = [{"type": "text", "text": "Say hi.\nfake: {\"tokens\": 3, \"token_bytes\": 7}"}]
    body = {"model": "m", "stream": True, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": content}]}
    _, events = await stream_events(client, body)
    tokens = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
    assert tokens == ["abcdefg"] * 3
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert provider.settings == FakeSettings()  # the server default is untouched


async def test_bad_directives_are_400(client, provider):
    bad = ('{"nope": 1}', '{"tokens": -1}', '{"status": "x"}', '{bad}', '{"stall_after": 1.5}')
    for directive in bad:
        r = await client.post("/v1/chat/completions", json=chat(f"hi\nfake: {directive}"))
        assert r.status_code == 400, directive
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert [rec.status for rec in provider.records] == [400] * 5


async def test_token_bytes(client, provider):
    provider.settings = FakeSettings(token_bytes=100, tokens=4)
    _, events = await stream_events(client, chat(stream=True))
    tokens = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
    assert [len(t.encode()) for t in tokens] == [100] * 4
    r = await client.post("/v1/chat/completions", json=chat())
    assert len(r.json()["choices"][0]["message"]["content"]) == 400


async def test_timing_is_applied(client, provider):
    # Loose bound only: the stream cannot be faster than ttft + (n-1) * itl.
    provider.settings = FakeSettings(ttft=0.05, itl=0.02, tokens=5)
    start = trio.current_time()
    await stream_events(client, chat(stream=True))
    assert trio.current_time() - start >= 0.05 + 4 * 0.02 - 0.01


# -- errors --

async def test_429_with_retry_after(client, provider):
    provider.settings = FakeSettings(status=429, retry_after=3)
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json() == {"error": {"message": "fake provider error 429", "type": "rate_limit_error",
                                  "param": None, "code": "rate_limit_exceeded"}}
    r = await client.post("/v1/chat/completions",
                          json=chat('fake: {"status": 429, "retry_after": 0.5}'))
    assert r.headers["retry-after"] == "0.5"
    assert provider.records[-1].status == 429 and provider.records[-1].completed


async def test_503_and_401(client, provider):
    r = await client.post("/v1/chat/completions", json=chat('fake: {"status": 503}'))
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "server_error"
    assert "retry-after" not in r.headers
    r = await client.post("/v1/chat/completions", json=chat('fake: {"status": 401}'))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


async def test_malformed_json_is_400(client, provider):
    r = await client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    [rec] = provider.records
    assert rec.status == 400 and rec.body == {}
    # The connection survives a bad request.
    assert (await client.get("/healthz")).status_code == 200


async def test_routes(client, provider):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/v1/models")).json() == {
        "object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                    "owned_by": "fake"}]}
    r = await client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert provider.records == []


async def test_fake_requests_and_reset(client, provider):
    await client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer k"})
    listed = (await client.get("/_fake/requests")).json()
    assert len(listed) == 1
    assert listed[0]["authorization"] == "Bearer k"
    assert listed[0]["completed"] is True and "closed" not in listed[0]
    assert (await client.post("/_fake/reset")).status_code == 200
    assert provider.records == []
    assert (await client.get("/_fake/requests")).json() == []


# -- faults and peer closes --

async def test_drop_after_breaks_the_stream(client, provider):
    seen = []
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat('fake: {"drop_after": 3}', stream=True)) as r:
            async for line in r.aiter_lines():
                seen.append(line)
    assert not any("[DONE]" in line for line in seen)
    [rec] = provider.records
    await closed(rec)
    assert rec.tokens_sent == 3
    assert not rec.completed and not rec.peer_closed_early


async def test_drop_after_non_stream(client, provider):
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await client.post("/v1/chat/completions", json=chat('fake: {"drop_after": 0}'))
    await closed(provider.records[0])
    assert not provider.records[0].completed


async def test_stall_after_then_client_closes(client, provider):
    provider.settings = FakeSettings(stall_after=2, tokens=10)
    async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        lines = r.aiter_lines()
        contents = 0
        while contents < 2:
            line = await lines.__anext__()
            contents += '"content":" ' in line  # content tokens, not the role chunk
        rec = provider.records[0]
        assert not rec.closed.is_set()  # stalled, not finished
    # Leaving the block closes the response mid-body: httpx closes the connection.
    await closed(rec)
    assert rec.peer_closed_early and not rec.completed and rec.tokens_sent == 2


async def test_hang_before_headers_until_client_gives_up(client, provider):
    provider.settings = FakeSettings(hang_before_headers=True)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/chat/completions", json=chat(), timeout=0.2)
    rec = provider.records[0]
    await closed(rec)
    assert rec.peer_closed_early and rec.bytes_sent == 0


async def test_peer_close_during_long_itl_is_seen_promptly(client, provider):
    # The next token is 100 s away: only the watcher can end this request.
    provider.settings = FakeSettings(itl=100, tokens=5)
    async with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        async for line in r.aiter_lines():
            if '"content":" The"' in line:
                break
    await closed(provider.records[0])
    assert provider.records[0].peer_closed_early
    assert provider.records[0].ended_at - provider.records[0].started_at < 5


async def test_wait_for_records(client, provider):
    provider.settings = FakeSettings(hang_before_headers=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: client.post("/v1/chat/completions", json=chat(), timeout=0.5))
        with trio.fail_after(5):
            [rec] = await provider.wait_for_records(1)
        assert provider.record_for(lambda r: r.model == "gpt-test") is rec
        nursery.cancel_scope.cancel()
    await closed(rec)
    assert rec.peer_closed_early


# -- HTTP/1.1 connection handling --

async def test_keep_alive_reuses_the_connection(client, provider):
    addrs = []
    for body in (chat(), chat(stream=True)):
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            await r.aread()
            addrs.append(r.extensions["network_stream"].get_extra_info("client_addr"))
    assert addrs[0] == addrs[1]


async def read_until(stream, marker: bytes, buf=b"") -> bytes:
    with trio.fail_after(5):
        while marker not in buf:
            data = await stream.receive_some(65536)
            assert data, f"EOF before {marker!r}; got {buf!r}"
            buf += data
    return buf


async def test_pipelined_requests_on_a_raw_socket(provider):
    stream = await trio.open_tcp_stream("127.0.0.1", provider.port)
    body = json.dumps(chat(stream=True, max_tokens=2)).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(body), body))
    # Both requests at once: the second one arrives while the first response is running.
    await stream.send_all(request + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    buf = await read_until(stream, b'{"status":"ok"}')
    assert buf.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in buf.lower()
    assert buf.index(b"data: [DONE]") < buf.index(b"0\r\n\r\n") < buf.index(b"HTTP/1.1 200 ", 1)
    await stream.aclose()
    await closed(provider.records[0])
    assert provider.records[0].completed and not provider.records[0].peer_closed_early


async def test_malformed_http_is_400_and_closed(provider):
    stream = await trio.open_tcp_stream("127.0.0.1", provider.port)
    await stream.send_all(b"NONSENSE\r\n\r\n")
    buf = await read_until(stream, b"}")
    assert buf.startswith(b"HTTP/1.1 400 ")
    with trio.fail_after(5):
        while await stream.receive_some(65536):
            pass  # the server closes the connection
    await stream.aclose()


# -- settings and CLI --

def test_settings_are_checked():
    with pytest.raises(ValueError, match="tokens"):
        FakeSettings(tokens=-1)
    with pytest.raises(ValueError, match="status"):
        FakeSettings(status=100)
    with pytest.raises(SystemExit):
        main(["--itl", "-1"])


def test_cli_help_names_the_command_users_type(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m proxy fake-provider ")
    assert "--token-bytes N" in out and "/_fake/control" in out


async def test_cli_serves_until_terminated():
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy", "fake-provider", "--port", "0", "--tokens", "3",
         "--ttft", "0", "--itl", "0", "--token-bytes", "4"],
        cwd=ROOT, stdout=subprocess.PIPE)
    try:
        line = await read_until(proc.stdout, b"\n")
        prefix = b"fake provider listening on http://127.0.0.1:"
        assert line.startswith(prefix) and line.strip().endswith(b"/v1")
        base = line.strip().decode().removeprefix("fake provider listening on ")
        async with httpx.AsyncClient(base_url=base, timeout=5) as c:
            assert (await c.get(base.removesuffix("/v1") + "/healthz")).json() == {"status": "ok"}
            r = await c.post(base + "/chat/completions", json=chat())
            assert r.json()["choices"][0]["message"]["content"] == "abcd" * 3
    finally:
        proc.terminate()
        with trio.fail_after(5):
            assert await proc.wait() == 0  # SIGTERM is a clean stop


async def test_expect_100_continue_and_http10(provider):
    body = json.dumps(chat(stream=True, max_tokens=1)).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", provider.port)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                          b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
    assert (await read_until(stream, b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
    await stream.send_all(body)
    assert b"data: [DONE]" in await read_until(stream, b"0\r\n\r\n")
    await stream.aclose()
    # An HTTP/1.0 client gets no chunked framing: the body ends when the connection does.
    stream = await trio.open_tcp_stream("127.0.0.1", provider.port)
    await stream.send_all(b"POST /v1/chat/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%s"
                          % (len(body), body))
    buf = await read_until(stream, b"data: [DONE]\n\n")
    assert b"transfer-encoding" not in buf.lower()
    with trio.fail_after(5):
        assert await stream.receive_some(65536) == b""
    await stream.aclose()
