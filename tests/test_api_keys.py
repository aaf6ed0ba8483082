"""API keys: the store (pure), the CLI, the admin HTTP API, and enforcement on a real server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from conftest import RunningServer
from streaming import wait_for
from tidings.auth import KeyStore
from tidings.exceptions import Forbidden, Unauthorized

SECRET = "api-key-test-jwt-secret-32-bytes-long!"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys_cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env["TIDINGS_AUTH_API_KEYS_FILE"] = str(path)
    return subprocess.run(
        [sys.executable, "-m", "tidings", "keys", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


# -- the store ---------------------------------------------------------------------------


def test_a_created_key_verifies_into_its_grant_and_is_stored_only_hashed(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "keys.json"))
    key, record = store.create("svc", publish=["orders/*"], subscribe=["orders/**"])
    grant = store.verify(key)
    assert grant.subject == "svc"
    grant.check_publish("orders/1")
    with pytest.raises(Forbidden):
        grant.check_publish("users/1")
    text = (tmp_path / "keys.json").read_text()
    assert key not in text and key[17:] not in text
    assert record.hash in text
    assert stat.S_IMODE(os.stat(tmp_path / "keys.json").st_mode) == 0o600
    assert "hash" not in record.public()


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"), "unknown API key"),
        (lambda k: k[:10], "malformed API key"),
        (lambda k: "tdk_000000000000_" + k[17:], "unknown API key"),
    ],
)
def test_tampered_and_unknown_keys_are_refused(
    tmp_path: Path, mangle: Callable[[str], str], reason: str
) -> None:
    store = KeyStore(str(tmp_path / "keys.json"))
    key, _ = store.create("svc", publish=["a"])
    with pytest.raises(Unauthorized, match=reason):
        store.verify(mangle(key))


def test_a_revoked_key_is_refused_with_when(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "keys.json"))
    key, record = store.create("svc", publish=["a"])
    store.revoke(record.id)
    with pytest.raises(Unauthorized, match=f"API key {record.id} was revoked at"):
        store.verify(key)
    # A second store on the same file sees the same state.
    other = KeyStore(str(tmp_path / "keys.json"))
    other.load()
    with pytest.raises(Unauthorized, match="revoked"):
        other.verify(key)


# -- against a real server ---------------------------------------------------------------


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


@pytest.fixture
def server(make_server: Callable[..., RunningServer], keys_file: Path) -> RunningServer:
    return make_server(auth_api_keys_file=str(keys_file))


def test_cli_created_key_is_enforced_and_revocation_takes_effect_on_a_live_server(
    server: RunningServer, keys_file: Path
) -> None:
    created = keys_cli(keys_file, "create", "svc", "--publish", "orders/*")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert "shown once" in created.stderr
    with httpx.Client(base_url=server.url, timeout=10) as client:

        def status(channel: str, headers: dict[str, str] | None = None) -> int:
            return client.post(f"/channels/{channel}", json=1, headers=headers).status_code

        wait_for(lambda: status("orders/1", bearer(key)) == 201, what="the new key accepted")
        assert status("users/1", bearer(key)) == 403
        assert status("orders/1") == 401
        listed = keys_cli(keys_file, "list")
        assert key not in listed.stdout and '"subject":"svc"' in listed.stdout
        key_id = key.split("_")[1]
        assert keys_cli(keys_file, "revoke", key_id).returncode == 0
        wait_for(lambda: status("orders/1", bearer(key)) == 401, what="the revocation seen")
        refused = client.post("/channels/orders/1", json=1, headers=bearer(key))
        assert "revoked" in refused.json()["detail"]


def test_admin_api_creates_lists_and_revokes_keys(server: RunningServer, keys_file: Path) -> None:
    admin_key = keys_cli(keys_file, "create", "ops", "--admin").stdout.strip()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        wait_for(
            lambda: client.get("/keys", headers=bearer(admin_key)).status_code == 200,
            what="the admin key accepted",
        )
        created = client.post(
            "/keys",
            json={"subject": "svc", "publish": ["orders/**"], "description": "billing"},
            headers=bearer(admin_key),
        )
        assert created.status_code == 201, created.text
        new_key = created.json()["key"]
        assert client.post("/channels/orders/1", json=1, headers=bearer(new_key)).status_code == 201
        listed = client.get("/keys", headers=bearer(admin_key)).json()["keys"]
        assert {k["subject"] for k in listed} == {"ops", "svc"}
        assert all("hash" not in k and "key" not in k for k in listed)
        # Not an admin: the key cannot manage keys.
        assert client.get("/keys", headers=bearer(new_key)).status_code == 403
        revoked = client.delete(f"/keys/{created.json()['id']}", headers=bearer(admin_key))
        assert revoked.status_code == 200 and revoked.json()["revoked"] is not None
        assert client.post("/channels/orders/1", json=1, headers=bearer(new_key)).status_code == 401
        missing = client.delete("/keys/000000000000", headers=bearer(admin_key))
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        bad = client.post(
            "/keys", json={"subject": "x", "publish": ["a//b"]}, headers=bearer(admin_key)
        )
        assert bad.status_code == 400


def test_api_keys_and_jwts_work_side_by_side(
    make_server: Callable[..., RunningServer], keys_file: Path
) -> None:
    key, _ = KeyStore(str(keys_file)).create("svc", publish=["a"])
    server = make_server(
        auth_api_keys_file=str(keys_file), auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET
    )
    token = jwt.encode(
        {"sub": "u", "exp": int(time.time()) + 60, "tidings": {"publish": ["a"]}}, SECRET
    )
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/channels/a", json=1, headers=bearer(key)).status_code == 201
        assert client.post("/channels/a", json=1, headers=bearer(token)).status_code == 201


def test_keys_command_without_a_keys_file_exits_2(tmp_path: Path) -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    result = subprocess.run(
        [sys.executable, "-m", "tidings", "keys", "list"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2
    assert "auth.api_keys_file" in result.stderr


def test_a_revoked_key_is_refused_by_every_endpoint(server: RunningServer, keys_file: Path) -> None:
    store = KeyStore(str(keys_file))
    key, record = store.create("ops", subscribe=["**"], publish=["**"], admin=True)
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/channels/a", {"json": 1}),
        ("POST", "/publish", {"json": {"events": [{"channel": "a", "data": 1}]}}),
        ("GET", "/history", {"params": {"channel": "a"}}),
        ("GET", "/poll", {"params": {"channel": "a"}}),
        ("GET", "/sse", {"params": {"channel": "a"}}),
        ("GET", "/metrics", {}),
        ("GET", "/keys", {}),
    ]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        wait_for(
            lambda: client.get("/keys", headers=bearer(key)).status_code == 200,
            what="the key accepted",
        )
        for method, path, kwargs in requests:
            if path == "/sse":
                with client.stream(method, path, headers=bearer(key), **kwargs) as response:
                    assert response.status_code == 200, path
            else:
                assert client.request(method, path, headers=bearer(key), **kwargs).is_success
        store.revoke(record.id)
        wait_for(
            lambda: client.get("/keys", headers=bearer(key)).status_code == 401,
            what="the revocation seen",
        )
        for method, path, kwargs in requests:
            response = client.request(method, path, headers=bearer(key), **kwargs)
            assert response.status_code == 401, (path, response.text)
            assert "revoked" in response.json()["detail"], path


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/keys", {}),
        ("POST", "/keys", {"json": {"subject": "x"}}),
        ("DELETE", "/keys/000000000000", {}),
    ],
)
def test_key_management_needs_an_admin_credential(
    server: RunningServer, keys_file: Path, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    store = KeyStore(str(keys_file))
    user, _ = store.create("svc", subscribe=["**"], publish=["**"])
    admin, _ = store.create("ops", admin=True)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        wait_for(
            lambda: client.get("/keys", headers=bearer(admin)).status_code == 200,
            what="the keys loaded",
        )
        assert client.request(method, path, **kwargs).status_code == 401
        refused = client.request(method, path, headers=bearer(user), **kwargs)
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        allowed = client.request(method, path, headers=bearer(admin), **kwargs)
        assert allowed.status_code in (200, 201, 404)  # 404: no key with that id
        assert allowed.status_code != 404 or "no API key" in allowed.json()["detail"]
