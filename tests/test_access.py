"""Access control on every endpoint, against a real server with JWT (HS256) configured."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest

from conftest import RunningServer, make_settings
from streaming import SSEClient
from tidings.exceptions import ConfigError
from tidings.server import Tidings

SECRET = "test-secret-with-at-least-32-bytes-of-key"


def token(
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
    admin: bool = False,
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {
        "sub": "tester",
        "exp": int(time.time()) + 600,
        "tidings": {"subscribe": subscribe or [], "publish": publish or [], "admin": admin},
    }
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server(auth_jwt_algorithms="HS256", auth_jwt_secret=SECRET)


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


# Every endpoint that takes a credential: (method, path, params, body, what the grant needs).
SUBSCRIBE = [
    ("GET", "/history", {"channel": "orders/*"}),
    ("GET", "/poll", {"channel": "orders/*"}),
]


def assert_refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == ("unauthorized" if status == 401 else "forbidden")
    assert words in body["detail"], body["detail"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path", "params"), SUBSCRIBE)
def test_subscribe_endpoints_refuse_missing_wrong_and_accept_right_credentials(
    client: httpx.Client, method: str, path: str, params: dict[str, str]
) -> None:
    assert_refused(client.request(method, path, params=params), 401, "credential")
    other = bearer(token(subscribe=["news/*"]))
    assert_refused(client.request(method, path, params=params, headers=other), 403, "orders/*")
    right = bearer(token(subscribe=["orders/**"]))
    assert client.request(method, path, params=params, headers=right).status_code == 200
    # EventSource and plain links cannot set headers: the token query parameter and the cookie.
    query = {**params, "token": token(subscribe=["orders/*"])}
    assert client.request(method, path, params=query).status_code == 200
    cookies = {"tidings_token": token(subscribe=["orders/*"])}
    response = httpx.request(method, client.base_url.join(path), params=params, cookies=cookies)
    assert response.status_code == 200, response.text


def test_publish_refuses_missing_wrong_and_accepts_right_credentials(client: httpx.Client) -> None:
    assert_refused(client.post("/channels/orders/1", json=1), 401, "credential")
    other = bearer(token(publish=["orders/2"], subscribe=["orders/**"]))
    assert_refused(client.post("/channels/orders/1", json=1, headers=other), 403, "orders/1")
    right = bearer(token(publish=["orders/*"]))
    assert client.post("/channels/orders/1", json=1, headers=right).status_code == 201


def test_publish_never_takes_a_cookie_or_query_token(client: httpx.Client) -> None:
    # A cookie on POST would let any web page publish with a visitor's credential (CSRF).
    good = token(publish=["**"])
    response = httpx.post(
        client.base_url.join("/channels/a"), json=1, cookies={"tidings_token": good}
    )
    assert_refused(response, 401, "credential")
    assert_refused(client.post("/channels/a", params={"token": good}, json=1), 401, "credential")


def test_batch_publish_checks_every_channel(client: httpx.Client) -> None:
    events = {"events": [{"channel": "orders/1", "data": 1}, {"channel": "users/1", "data": 2}]}
    assert_refused(client.post("/publish", json=events), 401, "credential")
    only_orders = bearer(token(publish=["orders/*"]))
    assert_refused(client.post("/publish", json=events, headers=only_orders), 403, "users/1")
    both = bearer(token(publish=["orders/*", "users/*"]))
    assert client.post("/publish", json=events, headers=both).status_code == 201
    # Nothing of the refused batch was published.
    page = client.get("/history", params={"channel": "**"}, headers=bearer(token(["**"])))
    assert [e["channel"] for e in page.json()["events"]] == ["orders/1", "users/1"]


def test_sse_refuses_without_credential_and_streams_with_a_query_token(
    server: RunningServer, client: httpx.Client
) -> None:
    assert_refused(client.get("/sse", params={"channel": "orders/*"}), 401, "credential")
    other = {"channel": "orders/*", "token": token(subscribe=["news/*"])}
    assert_refused(client.get("/sse", params=other), 403, "orders/*")
    query = {"token": token(subscribe=["orders/*"])}
    with SSEClient(server.url, "orders/*", params=query) as stream:
        assert stream.next().event == "tidings.subscribed"
        client.post("/channels/orders/1", json={"n": 1}, headers=bearer(token(publish=["**"])))
        assert stream.next().data.endswith('"data":{"n":1}}')


def test_metrics_need_an_admin_grant(client: httpx.Client) -> None:
    assert_refused(client.get("/metrics"), 401, "credential")
    assert_refused(client.get("/metrics", headers=bearer(token(["**"], ["**"]))), 403, "admin")
    assert client.get("/metrics", headers=bearer(token(admin=True))).status_code == 200
    assert client.get("/healthz").status_code == 200  # liveness stays open


@pytest.mark.parametrize(
    ("credential", "words"),
    [
        (token(["**"], exp=int(time.time()) - 3600), "expired"),
        (token(["**"], aud="someone-else"), ""),
        (
            jwt.encode(
                {"sub": "x", "exp": int(time.time()) + 60}, "wrong-secret-32-bytes-long-xxxxx"
            ),
            "signature",
        ),
        ("not-a-jwt", ""),
    ],
)
def test_invalid_tokens_are_refused_with_the_reason(
    client: httpx.Client, credential: str, words: str
) -> None:
    response = client.get("/poll", params={"channel": "a"}, headers=bearer(credential))
    assert_refused(response, 401, words)
    assert SECRET not in response.text


def test_a_non_bearer_authorization_header_is_refused(client: httpx.Client) -> None:
    response = client.get("/poll", params={"channel": "a"}, headers={"Authorization": "Basic eDp5"})
    assert_refused(response, 401, "Bearer")


def test_with_auth_off_every_endpoint_is_open(make_server: Callable[..., RunningServer]) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.post("/channels/a", json=1).status_code == 201
        assert c.get("/poll", params={"channel": "a"}).status_code == 200
        assert c.get("/metrics").status_code == 200


def test_serving_a_public_address_without_auth_is_refused(tmp_path: Any) -> None:
    settings = make_settings(tmp_path, server_host="0.0.0.0")
    with pytest.raises(ConfigError, match="without authentication"):
        asyncio.run(Tidings(settings).run())


def test_serve_on_a_public_address_without_auth_exits_2(tmp_path: Any) -> None:
    db = os.path.join(str(tmp_path), "x.db")
    result = subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--host", "0.0.0.0", "--port", "0", "--db", db],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TIDINGS_CONFIG": ""},
    )
    assert result.returncode == 2
    assert "without authentication" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_token_command_mints_a_token_the_server_accepts(
    server: RunningServer, client: httpx.Client
) -> None:
    env = {
        **os.environ,
        "TIDINGS_AUTH_JWT_ALGORITHMS": "HS256",
        "TIDINGS_AUTH_JWT_SECRET": SECRET,
    }
    result = subprocess.run(
        [sys.executable, "-m", "tidings", "token", "svc", "--publish", "orders/*", "--ttl", "5m"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    minted = result.stdout.strip()
    assert client.post("/channels/orders/9", json=1, headers=bearer(minted)).status_code == 201
    assert client.post("/channels/users/9", json=1, headers=bearer(minted)).status_code == 403
