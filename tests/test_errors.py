"""Every client-visible error: status, OpenAI-shaped body, headers — through real sockets."""

import socket

import openai
import pytest
import trio

from .conftest import MASTER_KEY, PROVIDER_KEY, chat_body


def assert_error(response, status: int, code=None, type_=None, param=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if type_ is not None:
        assert error["type"] == type_
    if param is not None:
        assert error["param"] == param
    return error


async def post(http, gw, body=None, **kw):
    return await http.post(gw.v1 + "/chat/completions", json=body, **kw)


async def test_malformed_json_is_400(gw, http):
    response = await http.post(gw.v1 + "/chat/completions", content=b"{not json",
                               headers={"content-type": "application/json"})
    assert_error(response, 400, type_="invalid_request_error")


@pytest.mark.parametrize("body, param", [
    ([1, 2], "body"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "gpt-4o"}, "messages"),
    ({"model": "gpt-4o", "messages": []}, "messages"),
    ({"model": "gpt-4o", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}],
      "stream_options": {"include_usage": True}}, "stream_options"),
])
async def test_schema_violations_are_400_naming_the_param(gw, http, body, param):
    assert_error(await post(http, gw, body), 400, type_="invalid_request_error", param=param)


async def test_unknown_model_is_404_model_not_found(gw, http):
    assert_error(await post(http, gw, chat_body(model="nope")), 404, code="model_not_found", param="model")


async def test_missing_and_bad_keys_are_401(gw, http):
    for headers in ({"authorization": ""}, {"authorization": "Bearer wrong"}, {"authorization": "Basic x"}):
        error = assert_error(await post(http, gw, chat_body(), headers=headers), 401, code="invalid_api_key")
        assert MASTER_KEY not in error["message"]
    assert_error(await http.get(gw.v1 + "/models", headers={"authorization": "Bearer wrong"}), 401)


async def test_sdk_sees_authentication_error(gw):
    def call():
        client = openai.OpenAI(base_url=gw.v1, api_key="wrong", max_retries=0)
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])

    with pytest.raises(openai.AuthenticationError):
        await trio.to_thread.run_sync(call)


async def test_no_master_key_means_open_access(start_gateway, http):
    gw = await start_gateway(master_key=None)
    response = await post(http, gw, chat_body(), headers={"authorization": ""})
    assert response.status_code == 200


async def test_body_too_large_is_413(start_gateway, http):
    gw = await start_gateway(server={"max_body_bytes": 2048})
    assert_error(await post(http, gw, chat_body("x" * 4096)), 413, code="request_too_large")

    async def chunks():  # no content-length: the limit holds while streaming the body in
        for _ in range(8):
            yield b"x" * 1024

    response = await http.post(gw.v1 + "/chat/completions", content=chunks())
    assert_error(response, 413)


async def test_wrong_method_is_405_and_unknown_path_404(gw, http):
    response = await http.get(gw.v1 + "/chat/completions")
    assert_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_error(await http.get(gw.v1 + "/nothing"), 404, code="not_found")


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_429_passes_through_with_retry_after(gw, http, stream):
    # Retry-After 7 s is above retry_after_max (5 s): no waiting, no other deployment -> the 429
    response = await post(http, gw, chat_body('fake: {"status": 429, "retry_after": 7}', stream=stream))
    error = assert_error(response, 429, type_="rate_limit_error")
    assert response.headers["retry-after"] == "7"
    assert "fake provider error 429" in error["message"]


async def test_sdk_sees_rate_limit_error(gw):
    def call():
        client = openai.OpenAI(base_url=gw.v1, api_key=MASTER_KEY, max_retries=0)
        client.chat.completions.create(
            model="gpt-4o", stream=True, messages=[{"role": "user", "content": 'fake: {"status": 429}'}])

    with pytest.raises(openai.RateLimitError):
        await trio.to_thread.run_sync(call)


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_5xx_is_502(gw, http, stream):
    response = await post(http, gw, chat_body('fake: {"status": 503}', stream=stream))
    error = assert_error(response, 502, code="upstream_error")
    assert PROVIDER_KEY not in response.text and "503" in error["message"]


async def test_provider_4xx_keeps_its_status_and_message(gw, http):
    response = await post(http, gw, chat_body('fake: {"status": 400}'))
    assert_error(response, 400)


@pytest.mark.parametrize("stream", [False, True])
async def test_connect_failure_is_502(start_gateway, http, stream):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gw = await start_gateway(provider_port=dead_port)
    error = assert_error(await post(http, gw, chat_body(stream=stream)), 502, code="upstream_error")
    assert "could not connect" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_timeout_is_504(start_gateway, http, stream):
    gw = await start_gateway(provider={"first_byte_timeout": 0.3, "read_timeout": 0.3})
    body = chat_body('fake: {"hang_before_headers": true}', stream=stream)
    assert_error(await post(http, gw, body), 504, code="upstream_timeout")


async def test_read_timeout_mid_stream_is_an_error_event(start_gateway, http, fake):
    gw = await start_gateway(provider={"read_timeout": 0.3})
    body = chat_body('fake: {"stall_after": 2}', stream=True)
    response = await post(http, gw, body)
    assert response.status_code == 200
    assert b"upstream_timeout" in response.content and b"[DONE]" not in response.content
    with trio.fail_after(5):
        await fake.records[-1].closed.wait()
    assert fake.records[-1].peer_closed_early
