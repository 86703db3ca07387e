"""Keys, per-key limits, size caps and CORS, in-process (a scripted backend behind the real app)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from gateway.demo import DemoModels
from gateway.keys import KeyRing, parse_key
from gateway.settings import Settings, SettingsError
from tests.gateway.scripted import ScriptedBackend, app_client
from tests.gateway.test_metrics import WHO, settings_for, value

ALICE = {"Authorization": "Bearer sk-alice"}
BOB = {"Authorization": "Bearer sk-bob"}
CHAT = {"model": "pku-assistant", "messages": WHO}


@pytest.fixture
def backend(demo_models: DemoModels) -> ScriptedBackend:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_models.base_dir))
    return ScriptedBackend(tokenizer.encode("我是北大助手", add_special_tokens=False))


def test_key_entries_and_files(tmp_path: Path) -> None:
    assert parse_key("alice:sk-1", "x").name == "alice"
    bare = parse_key("sk-2", "x")
    assert bare.name.startswith("key-") and "sk-2" not in bare.name
    assert bare.name == parse_key("sk-2", "y").name  # stable across restarts
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nalice:sk-1\n\nsk-2\n", encoding="utf-8")
    ring = KeyRing.from_settings(entries=["carol:sk-3"], key_file=str(keyfile), admin_key="adm")
    assert [k.name for k in ring.keys] == ["carol", "alice", bare.name]
    assert ring.match("sk-1").name == "alice"  # type: ignore[union-attr]
    assert ring.match("sk-") is None and ring.match("adm") is None and ring.is_admin("adm")
    with pytest.raises(SettingsError, match="unique"):
        KeyRing.from_settings(entries=["a:1", "a:2"], key_file=None, admin_key=None)
    with pytest.raises(SettingsError, match="api-key-file"):
        KeyRing.from_settings(entries=[], key_file=str(tmp_path / "missing"), admin_key=None)


async def test_keys_names_and_the_admin_key(demo_models: DemoModels, backend: ScriptedBackend, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    keyfile = tmp_path / "keys"
    keyfile.write_text("bob:sk-bob\n", encoding="utf-8")
    settings = settings_for(demo_models, api_keys=("alice:sk-alice",), api_key_file=str(keyfile), admin_key="adm")
    async with app_client(settings, backend) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401
        wrong = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-alic"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=ALICE)).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=BOB)).status_code == 200
        assert (await client.get("/v1/models", headers=BOB)).status_code == 200
        # the admin key is its own: client keys do not open the admin API, the admin key does not open /v1
        assert (await client.get("/v1/adapters", headers=ALICE)).status_code == 401
        assert (await client.get("/v1/adapters", headers={"Authorization": "Bearer adm"})).status_code == 200
        admin_chat = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer adm"})
        assert admin_chat.status_code == 401
        for open_path in ("/health", "/ready", "/metrics"):
            assert (await client.get(open_path)).status_code == 200, open_path
        text = (await client.get("/metrics")).text
    assert value(text, "gateway:key_requests_total", key="alice") == 1
    assert value(text, "gateway:key_requests_total", key="bob") == 1
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert [line["key"] for line in logged if line["status"] == 200 and line["path"] == "/v1/chat/completions"] == [
        "alice", "bob"]
    assert not any("sk-alice" in r.getMessage() or "sk-bob" in r.getMessage() for r in caplog.records)
    assert "sk-alice" not in text and "sk-bob" not in text


async def test_metrics_auth_flag(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    settings = settings_for(demo_models, api_keys=("alice:sk-alice",), admin_key="adm", metrics_auth=True)
    async with app_client(settings, backend) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=ALICE)).status_code == 200
        assert (await client.get("/metrics", headers={"Authorization": "Bearer adm"})).status_code == 200
        assert (await client.get("/ready")).status_code == 200


def assert_limited(response, code: str = "rate_limit_exceeded") -> int:  # type: ignore[no-untyped-def]
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == code
    retry = int(response.headers["retry-after"])
    assert 1 <= retry <= 60
    return retry


async def test_requests_per_minute_per_key(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    settings = settings_for(demo_models, api_keys=("alice:sk-alice", "bob:sk-bob"), rate_limit_rpm=2)
    async with app_client(settings, backend) as client:
        for _ in range(2):
            assert (await client.post("/v1/chat/completions", json=CHAT, headers=ALICE)).status_code == 200
        retry = assert_limited(await client.post("/v1/chat/completions", json=CHAT, headers=ALICE))
        assert retry >= 55  # the window opened a moment ago
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=BOB)).status_code == 200  # per key
        assert (await client.get("/v1/models", headers=ALICE)).status_code == 200  # only generation is limited
        text = (await client.get("/metrics")).text
    assert value(text, "gateway:rate_limited_total", key="alice", limit="requests_per_minute") == 1


async def test_tokens_per_minute_count_what_was_used(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    settings = settings_for(demo_models, api_keys=("alice:sk-alice",), rate_limit_tpm=20)
    async with app_client(settings, backend) as client:
        first = await client.post("/v1/chat/completions", json=CHAT, headers=ALICE)
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 20  # admitted under the limit
        assert_limited(await client.post("/v1/chat/completions", json=CHAT, headers=ALICE))


async def test_concurrent_requests_per_key(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    settings = settings_for(demo_models, api_keys=("alice:sk-alice", "bob:sk-bob"), max_concurrent_per_key=1)
    backend.hold = asyncio.Event()
    async with app_client(settings, backend) as client:
        held = asyncio.ensure_future(client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                                 headers=ALICE))
        while backend.arrived == 0:
            await asyncio.sleep(0.01)
        assert assert_limited(await client.post("/v1/chat/completions", json=CHAT, headers=ALICE)) == 1
        bob = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT, headers=BOB))
        while backend.arrived < 2:
            await asyncio.sleep(0.01)
        backend.hold.set()
        assert (await held).status_code == 200 and (await bob).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=ALICE)).status_code == 200


async def test_caps_on_messages_and_tools(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    settings = settings_for(demo_models, max_messages=2, max_tools=1, max_tools_bytes=200)
    async with app_client(settings, backend) as client:
        many = [*WHO, {"role": "assistant", "content": "x"}, *WHO]
        response = await client.post("/v1/chat/completions", json={"model": "pku-assistant", "messages": many})
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
        response = await client.post("/v1/chat/completions", json={**CHAT, "tools": [tool, tool]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
        big = {"type": "function", "function": {**tool["function"], "description": "d" * 300}}
        response = await client.post("/v1/chat/completions", json={**CHAT, "tools": [big]})
        assert response.status_code == 400 and "bytes" in response.json()["error"]["message"]
        assert (await client.post("/v1/chat/completions", json={**CHAT, "tools": [tool]})).status_code == 200


PREFLIGHT = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


async def test_cors_preflight_with_keys(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    settings = settings_for(demo_models, api_keys=("alice:sk-alice",), cors_origins=("http://ui.example",))
    async with app_client(settings, backend) as client:
        response = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://ui.example"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        assert "POST" in response.headers["access-control-allow-methods"]
        other = await client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        answer = await client.post("/v1/chat/completions", json=CHAT, headers={**ALICE, "Origin": "http://ui.example"})
        assert answer.headers["access-control-allow-origin"] == "http://ui.example"
        assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()


async def test_cors_is_off_by_default(demo_models: DemoModels, backend: ScriptedBackend) -> None:
    async with app_client(settings_for(demo_models), backend) as client:
        response = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in response.headers


def test_bad_limit_storage_is_a_setting_error(demo_models: DemoModels) -> None:
    from gateway.app import create_app

    with pytest.raises(SettingsError, match="rate-limit-storage"):
        create_app(Settings(model=str(demo_models.base_dir), rate_limit_rpm=1, rate_limit_storage="nosuch://x"))
