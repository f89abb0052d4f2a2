"""Virtual keys end to end: the admin API, auth with them, revocation, bad input, the CLI."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest
import trio

from tests.conftest import MASTER_KEY, chat_body
from tests.keys_gateway import bearer, create_key, keys_gateway  # noqa: F401 (fixture)


async def test_a_key_is_shown_once_stored_hashed_and_works_for_traffic(keys_gateway, http, tmp_path):
    gw = await keys_gateway()
    created = await create_key(http, gw.url, name="svc", team="search", models=["gpt-4o", "gpt-4o-*"],
                               rpm=100, tpm=100000, max_parallel=5, budget_usd=5, budget_period="day",
                               expires_at="2099-01-01T00:00:00Z", metadata={"owner": "ana"})
    key = created["key"]
    assert key.startswith("sk-gw-") and len(key) > 40 and created["id"].startswith("key_")
    assert created["prefix"] == key[:12]
    assert {k: created[k] for k in ("name", "team", "models", "rpm", "tpm", "max_parallel", "budget_usd",
                                    "budget_period", "expires_at", "metadata")} == {
        "name": "svc", "team": "search", "models": ["gpt-4o", "gpt-4o-*"], "rpm": 100, "tpm": 100000,
        "max_parallel": 5, "budget_usd": 5.0, "budget_period": "day", "expires_at": "2099-01-01T00:00:00Z",
        "metadata": {"owner": "ana"}}
    listed = (await http.get(gw.url + "/admin/keys")).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0] and "hash" not in listed[0]
    assert key not in (await http.get(gw.url + "/admin/keys")).text
    assert key.encode() not in (tmp_path / "gateway.db").read_bytes()  # only its sha256 is stored

    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0)
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    one = (await http.get(f"{gw.url}/admin/keys/{created['id']}")).json()
    assert one["id"] == created["id"] and "key" not in one
    with trio.fail_after(5):  # settled spend reaches the store just after the response
        while (await http.get(f"{gw.url}/admin/keys/{created['id']}")).json()["spend_usd"] <= 0:
            await trio.sleep(0.02)


async def test_client_keys_never_reach_admin_and_bad_keys_get_401(keys_gateway, http):
    gw = await keys_gateway()
    key = (await create_key(http, gw.url))["key"]
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/spend"),
                         ("GET", "/admin/routing")):
        response = await http.request(method, gw.url + path, headers=bearer(key), json={"name": "x"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_only", path
    for bad in ("sk-gw-nope", key + "x", MASTER_KEY + "x"):
        response = await http.post(gw.v1 + "/chat/completions", json=chat_body(), headers=bearer(bad))
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    # the master key still administers and (by default) calls models
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body())).status_code == 200
    # Anthropic's header works too, with Anthropic's error shape
    response = await http.post(gw.v1 + "/messages", headers={"authorization": "", "x-api-key": "sk-gw-nope"},
                               json={"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


async def test_master_key_traffic_can_be_switched_off(keys_gateway, http):
    gw = await keys_gateway(auth={"master_key_traffic": False})
    key = (await create_key(http, gw.url))["key"]
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body())).status_code == 403
    assert (await http.post(gw.v1 + "/chat/completions", json=chat_body(), headers=bearer(key))).status_code == 200


async def test_model_not_allowed_is_403_exact_and_glob(keys_gateway, http):
    gw = await keys_gateway()
    key = (await create_key(http, gw.url, models=["alias", "gpt-4o-m*"]))["key"]
    ok = [await http.post(gw.v1 + "/chat/completions", json=chat_body(model=m), headers=bearer(key))
          for m in ("alias", "gpt-4o-mini")]
    assert [r.status_code for r in ok] == [200, 200]
    refused = await http.post(gw.v1 + "/chat/completions", json=chat_body(model="gpt-4o"), headers=bearer(key))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"


async def test_revoke_rotate_expire_and_patch(keys_gateway, http):
    gw = await keys_gateway()
    created = await create_key(http, gw.url)
    key, key_id = created["key"], created["id"]

    async def status(k: str) -> int:
        return (await http.post(gw.v1 + "/chat/completions", json=chat_body(), headers=bearer(k))).status_code

    assert await status(key) == 200
    rotated = (await http.post(f"{gw.url}/admin/keys/{key_id}/rotate")).json()
    assert rotated["id"] == key_id and rotated["key"] != key
    assert await status(key) == 401 and await status(rotated["key"]) == 200
    patched = await http.patch(f"{gw.url}/admin/keys/{key_id}", json={"expires_at": "2001-01-01T00:00:00+00:00"})
    assert patched.status_code == 200 and patched.json()["expires_at"] == "2001-01-01T00:00:00Z"
    response = await http.post(gw.v1 + "/chat/completions", json=chat_body(), headers=bearer(rotated["key"]))
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]
    await http.patch(f"{gw.url}/admin/keys/{key_id}", json={"expires_at": None})
    assert await status(rotated["key"]) == 200
    revoked = await http.delete(f"{gw.url}/admin/keys/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert await status(rotated["key"]) == 401
    assert (await http.patch(f"{gw.url}/admin/keys/{key_id}", json={"rpm": 5})).status_code == 400
    assert (await http.get(f"{gw.url}/admin/keys/key_unknown")).status_code == 404


@pytest.mark.parametrize("body, field", [
    ({}, "name"), ({"name": ""}, "name"), ({"name": "x", "rpm": 0}, "rpm"), ({"name": "x", "tpm": "5"}, "tpm"),
    ({"name": "x", "budget_usd": -1}, "budget_usd"), ({"name": "x", "budget_period": "week"}, "budget_period"),
    ({"name": "x", "expires_at": "tomorrow"}, "expires_at"), ({"name": "x", "expires_at": "2030-01-01T00:00:00"},
                                                               "expires_at"),
    ({"name": "x", "models": "gpt-4o"}, "models"), ({"name": "x", "metadata": [1]}, "metadata"),
    ({"name": "x", "max_parallel": True}, "max_parallel"), ({"name": "x", "colour": "red"}, "colour"),
])
async def test_malformed_admin_bodies_are_400_naming_the_field(keys_gateway, http, body, field):
    gw = await keys_gateway()
    response = await http.post(gw.url + "/admin/keys", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field and field in response.json()["error"]["message"]
    assert (await http.post(gw.url + "/admin/keys", content=b"{not json")).status_code == 400


async def test_revocation_reaches_another_instance_on_the_same_store_within_a_second(keys_gateway, http):
    one = await keys_gateway()
    two = await keys_gateway()
    created = await create_key(http, one.url)
    with trio.fail_after(1.0):  # a key made on one instance works on the other within the refresh
        while (await http.post(two.v1 + "/chat/completions", json=chat_body(),
                               headers=bearer(created["key"]))).status_code != 200:
            await trio.sleep(0.02)
    await http.delete(f"{one.url}/admin/keys/{created['id']}")
    revoked_at = trio.current_time()
    while (await http.post(two.v1 + "/chat/completions", json=chat_body(),
                           headers=bearer(created["key"]))).status_code != 401:
        await trio.sleep(0.02)
    assert trio.current_time() - revoked_at < 1.0


async def test_store_unavailable_is_503_with_a_clear_message(keys_gateway, http, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    gw = await keys_gateway(state={"path": str(tmp_path / "a-file" / "gateway.db")})
    response = await http.post(gw.v1 + "/chat/completions", json=chat_body(), headers=bearer("sk-gw-anything"))
    assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
    admin = await http.get(gw.url + "/admin/keys")
    assert admin.status_code == 503 and "store" in admin.json()["error"]["message"]


def test_cli_creates_lists_rotates_and_revokes_on_the_same_store(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
[models."gpt-4o"]
deployments = [{{provider = "fake"}}]
[state]
path = "{tmp_path / 'cli.db'}"
""")

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "proxy", "keys", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = cli("create", "--name", "batch", "--team", "ml", "--rpm", "10", "--budget-usd", "2.5",
              "--models", "gpt-4o,gpt-4o-*", "--json")
    import json
    created = json.loads(out)
    assert created["key"].startswith("sk-gw-") and created["team"] == "ml" and created["models"] == ["gpt-4o", "gpt-4o-*"]
    listed = cli("list")
    assert created["id"] in listed and created["key"] not in listed and "batch" in listed
    rotated = json.loads(cli("rotate", created["id"], "--json"))
    assert rotated["key"] != created["key"]
    cli("revoke", created["id"])
    assert "revoked" in cli("list")
    bad = subprocess.run([sys.executable, "-m", "proxy", "keys", "revoke", "key_nope", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "key_nope" in bad.stderr


async def test_embeddings_and_messages_with_a_virtual_key(keys_gateway, http):
    gw = await keys_gateway()
    created = await create_key(http, gw.url, models=["gpt-4o"], rpm=100)
    embedded = await http.post(gw.v1 + "/embeddings", headers=bearer(created["key"]),
                               json={"model": "gpt-4o", "input": "hello"})
    assert embedded.status_code == 200 and embedded.headers["x-ratelimit-limit-requests"] == "100"
    refused = await http.post(gw.v1 + "/embeddings", headers=bearer(created["key"]),
                              json={"model": "alias", "input": "hello"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    messages = await http.post(gw.v1 + "/messages", headers={"authorization": "", "x-api-key": created["key"]},
                               json={"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 200 and messages.headers["x-ratelimit-remaining-requests"] == "98"
    forbidden = await http.post(gw.v1 + "/messages", headers={"authorization": "", "x-api-key": created["key"]},
                                json={"model": "alias", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"


def test_state_and_team_config_errors_name_the_key(tmp_path):
    from proxy.config import ConfigError
    from tests.keys_gateway import keys_config

    for state, sections, key in (({"backend": "redis"}, {}, "state.url"),
                                 ({"refresh_interval": 2}, {}, "state.refresh_interval"),
                                 ({"colour": 1}, {}, "state.colour"),
                                 ({}, {"teams": {"ml": {"budget_period": "week"}}}, "teams.ml.budget_period"),
                                 ({}, {"auth": {"master_key_traffic": "no"}}, "auth.master_key_traffic")):
        with pytest.raises(ConfigError) as failed:
            keys_config(9, {"path": str(tmp_path / "x.db"), **state}, **sections)
        assert failed.value.key == key
