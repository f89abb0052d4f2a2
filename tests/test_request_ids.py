"""x-request-id: the client's when sane, else a fresh one; on every response, error bodies too."""

import pytest

from proxy.server.exchange import MAX_REQUEST_ID, request_id


def test_a_sane_id_is_kept_and_anything_else_replaced():
    assert request_id(b"abc-123_X.y:z") == "abc-123_X.y:z"
    for bad in (None, b"", b"a" * (MAX_REQUEST_ID + 1), b"has space", b"new\nline", b"\xff\xfe", b"<script>"):
        made = request_id(bad)
        assert made.startswith("req_") and len(made) == 28
    assert request_id(None) != request_id(None)


@pytest.mark.parametrize("path,method,status", [
    ("/v1/chat/completions", "POST", 200),
    ("/v1/models", "GET", 200),
    ("/healthz", "GET", 200),
    ("/nope", "GET", 404),
])
async def test_every_response_carries_the_request_id(gw, http, path, method, status):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]} if method == "POST" else None
    response = await http.request(method, gw.url + path, json=body, headers={"x-request-id": "trace-42"})
    fresh = await http.request(method, gw.url + path, json=body)
    assert response.status_code == status
    assert response.headers["x-request-id"] == "trace-42"
    assert fresh.headers["x-request-id"].startswith("req_")
    if status >= 400:
        assert response.json()["request_id"] == "trace-42"


async def test_a_stream_and_an_error_before_it_carry_the_id(gw, http):
    async with http.stream("POST", gw.url + "/v1/chat/completions", headers={"x-request-id": "s-1"},
                           json={"model": "gpt-4o", "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.headers["x-request-id"] == "s-1"
        assert b"[DONE]" in b"".join([part async for part in response.aiter_bytes()])
    bad = await http.post(gw.url + "/v1/chat/completions", headers={"x-request-id": "bad one"}, content=b"{")
    assert bad.status_code == 400
    assert bad.headers["x-request-id"] == bad.json()["request_id"] != "bad one"
