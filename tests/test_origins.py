"""The Origin allow-list and CORS, against a real server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from conftest import RunningServer, make_settings
from streaming import SSEClient
from tidings.exceptions import ConfigError
from tidings.server import Tidings

APP = "https://app.example.com"

ENDPOINTS = [
    ("GET", "/sse", {"channel": "a"}),
    ("GET", "/poll", {"channel": "a"}),
    ("GET", "/history", {"channel": "a"}),
    ("POST", "/channels/a", {}),
    ("POST", "/publish", {}),
]


@pytest.fixture
def server(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server(http_origins=f"{APP}, http://localhost:3000")


def send(server: RunningServer, method: str, path: str, params: dict[str, str], origin: str):
    body: Any = {"events": [{"channel": "a", "data": 1}]} if path == "/publish" else 1
    kwargs: dict[str, Any] = {"json": body} if method == "POST" else {}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        if path == "/sse":
            with client.stream(method, path, params=params, headers={"Origin": origin}) as r:
                return r.status_code, r.headers, (r.read() if r.status_code != 200 else b"")
        r = client.request(method, path, params=params, headers={"Origin": origin}, **kwargs)
        return r.status_code, r.headers, r.content


@pytest.mark.parametrize(("method", "path", "params"), ENDPOINTS)
def test_an_origin_not_on_the_list_is_refused_with_the_reason(
    server: RunningServer, method: str, path: str, params: dict[str, str]
) -> None:
    status, _, body = send(server, method, path, params, "https://evil.example")
    assert status == 403
    assert b"origin_not_allowed" in body and b"https://evil.example" in body
    assert b"http.origins" in body


@pytest.mark.parametrize(("method", "path", "params"), ENDPOINTS)
def test_an_allowed_origin_gets_cors_headers(
    server: RunningServer, method: str, path: str, params: dict[str, str]
) -> None:
    status, headers, _ = send(server, method, path, params, APP)
    assert status in (200, 201)
    assert headers["access-control-allow-origin"] == APP
    assert "ETag" in headers["access-control-expose-headers"]


def test_null_origin_is_refused_unless_listed(make_server: Callable[..., RunningServer]) -> None:
    strict = make_server(http_origins=APP)
    status, _, body = send(strict, "GET", "/poll", {"channel": "a"}, "null")
    assert status == 403 and b"null" in body
    lenient = make_server(http_origins="null")
    assert send(lenient, "GET", "/poll", {"channel": "a"}, "null")[0] == 200


def test_by_default_no_browser_origin_is_allowed_but_plain_clients_are(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server()
    assert send(server, "GET", "/poll", {"channel": "a"}, "http://localhost:3000")[0] == 403
    with httpx.Client(base_url=server.url, timeout=10) as client:  # no Origin header: curl
        assert client.get("/poll", params={"channel": "a"}).status_code == 200


def test_preflight_from_an_allowed_origin_permits_authorization(server: RunningServer) -> None:
    headers = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    response = httpx.options(f"{server.url}/channels/a", headers=headers, timeout=10)
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "idempotency-key" in allowed
    assert response.headers["access-control-allow-origin"] == APP


def test_an_allowed_origin_streams_sse(server: RunningServer) -> None:
    with SSEClient(server.url, "a", headers={"Origin": APP}) as stream:
        assert stream.response.headers["access-control-allow-origin"] == APP
        assert stream.next().event == "tidings.subscribed"


@pytest.mark.parametrize("bad", ["https://app.example.com/", "app.example.com", "https://a/b"])
def test_malformed_origins_are_a_configuration_error(tmp_path: Any, bad: str) -> None:
    with pytest.raises(ConfigError, match="not an origin"):
        Tidings(make_settings(tmp_path, http_origins=bad))
