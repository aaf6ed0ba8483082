"""Malformed input never gets a 500 or a hang: every case answers a 4xx, JSON where HTTP allows.

Requests go over raw sockets so the request target reaches the server byte for byte (an HTTP
library would normalise ``..`` or refuse bad bytes before sending them).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from conftest import RunningServer, make_settings
from streaming import RawResponse, chunked, http_request, raw_request

MAX_EVENT = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    node = RunningServer(make_settings(tmp_path_factory.mktemp("malformed"))).start()
    yield node
    node.stop()


def assert_json_error(response: RawResponse, status: int | None = None) -> dict[str, Any]:
    assert 400 <= response.status < 500, (response.status, response.body[:300])
    if status is not None:
        assert response.status == status, response.body[:300]
    assert response.headers.get("content-type", "").startswith("application/json")
    body: dict[str, Any] = orjson.loads(response.body)
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# (id, method, request target, headers, body, expected status)
JSON = {"Content-Type": "application/json"}
CASES: list[tuple[str, str, str, dict[str, str], bytes | None, int]] = [
    # channel names in publish
    ("empty-segment", "POST", "/channels/a//b", {}, b"1", 400),
    ("trailing-slash", "POST", "/channels/a/", {}, b"1", 400),
    ("leading-slash", "POST", "/channels//a", {}, b"1", 400),
    ("empty-channel", "POST", "/channels/", {}, b"1", 400),
    ("dot-dot", "POST", "/channels/a/../b", {}, b"1", 400),
    ("dot-dot-encoded", "POST", "/channels/a/%2e%2e/b", {}, b"1", 400),
    ("dot-dot-encoded-upper", "POST", "/channels/a/%2E%2E", {}, b"1", 400),
    ("dot", "POST", "/channels/a/./b", {}, b"1", 400),
    ("wildcard-star", "POST", "/channels/a/*", {}, b"1", 400),
    ("wildcard-double", "POST", "/channels/a/**", {}, b"1", 400),
    ("partial-wildcard", "POST", "/channels/a*", {}, b"1", 400),
    ("too-long", "POST", "/channels/" + "x" * 300, {}, b"1", 400),
    ("too-many-segments", "POST", "/channels/" + "/".join(["s"] * 40), {}, b"1", 400),
    ("bad-character", "POST", "/channels/a%20b", {}, b"1", 400),
    ("non-utf8-path", "POST", "/channels/%ff", {}, b"1", 400),
    ("non-utf8-path-segment", "POST", "/channels/a/b%c3%28", {}, b"1", 400),
    # publish bodies and parameters
    ("invalid-json", "POST", "/channels/a", JSON, b"{bad", 400),
    ("empty-json", "POST", "/channels/a", JSON, b"", 400),
    ("json-too-deep", "POST", "/channels/a", JSON, b"[" * 2000 + b"]" * 2000, 400),
    ("json-lone-surrogate", "POST", "/channels/a", JSON, b'"\\ud800"', 400),
    ("json-infinity", "POST", "/channels/a", JSON, b"1e400", 400),
    ("json-nan", "POST", "/channels/a", JSON, b"NaN", 400),
    ("bad-type", "POST", "/channels/a?type=a%20b", {}, b"1", 400),
    ("long-type", "POST", "/channels/a?type=" + "t" * 200, {}, b"1", 400),
    ("bad-ce-type", "POST", "/channels/a", {"ce-type": "no spaces"}, b"1", 400),
    ("publish-unknown-param", "POST", "/channels/a?colour=red", {}, b"1", 400),
    ("bad-content-type", "POST", "/channels/a", {"Content-Type": "nonsense"}, b"1", 400),
    ("text-not-utf8", "POST", "/channels/a", {"Content-Type": "text/plain"}, b"\xff\xfe", 400),
    ("empty-idempotency-key", "POST", "/channels/a", {"Idempotency-Key": ""}, b"1", 400),
    ("long-idempotency-key", "POST", "/channels/a", {"Idempotency-Key": "k" * 300}, b"1", 400),
    ("huge-body", "POST", "/channels/a", {}, b"x" * (MAX_EVENT + 1), 413),
    # subscription parameters, on every subscribe endpoint
    *[
        (f"{path[1:]}-{name}", "GET", f"{path}?{query}", {}, None, 400)
        for path in ("/poll", "/history", "/sse")
        for name, query in [
            ("missing-channel", ""),
            ("empty-channel", "channel="),
            ("empty-segment", "channel=a//b"),
            ("trailing-slash", "channel=a/"),
            ("dot-dot", "channel=a/%2e%2e"),
            ("inner-double-star", "channel=a/**/b"),
            ("partial-wildcard", "channel=a/b*"),
            ("too-long", "channel=" + "x" * 300),
            ("non-utf8", "channel=%ff"),
            ("non-utf8-since", "channel=a&since=%ff"),
            ("since-abc", "channel=a&since=abc"),
            ("since-x-y", "channel=a&since=x:y"),
            ("since-negative", "channel=a&since=ab:-1"),
            ("since-empty-epoch", "channel=a&since=:1"),
            ("since-superscript", "channel=a&since=ab:%C2%B2"),
            ("since-huge", "channel=a&since=ab:" + "9" * 30),
            ("since-repeated", "channel=a&since=ab:1&since=ab:2"),
            ("since-2-to-the-63", "channel=a&since=ab:9223372036854775808"),
            ("since-epoch-upper-case", "channel=a&since=AB:1"),
            ("since-epoch-too-long", "channel=a&since=" + "a" * 33 + ":1"),
            ("unknown-parameter", "channel=a&colour=red"),
            ("non-utf8-parameter-name", "channel=a&%ff=1"),
            ("too-many-channels", "&".join(f"channel=c{i}" for i in range(100))),
        ]
    ],
    *[
        (f"{path[1:]}-limit-{value}", "GET", f"{path}?channel=a&limit={value}", {}, None, 400)
        for path in ("/poll", "/history")
        for value in ("0", "-1", "1000000000000000000000", "abc", "1.5", "%ff", "")
    ],
    *[
        (f"poll-wait-{value}", "GET", f"/poll?channel=a&wait={value}", {}, None, 400)
        for value in ("-1", "nan", "NaN", "inf", "-inf", "1e400", "100000", "abc", "", "%ff")
    ],
    ("sse-limit-not-accepted", "GET", "/sse?channel=a&limit=5", {}, None, 400),
    ("sse-wait-not-accepted", "GET", "/sse?channel=a&wait=5", {}, None, 400),
    ("history-wait-not-accepted", "GET", "/history?channel=a&wait=5", {}, None, 400),
    ("sse-last-event-id-garbage", "GET", "/sse?channel=a", {"Last-Event-ID": "garbage"}, None, 400),
    ("sse-last-event-id-x-y", "GET", "/sse?channel=a", {"Last-Event-ID": "x:y"}, None, 400),
    (
        "poll-if-none-match-garbage",
        "GET",
        "/poll?channel=a",
        {"If-None-Match": '"junk"'},
        None,
        400,
    ),
    ("poll-if-none-match-bare", "GET", "/poll?channel=a", {"If-None-Match": "zz:"}, None, 400),
    # routing
    ("wrong-method-channel", "GET", "/channels/x", {}, None, 405),
    ("wrong-method-publish", "GET", "/publish", {}, None, 405),
    ("wrong-method-poll", "POST", "/poll?channel=a", {}, b"", 405),
    ("wrong-method-sse", "DELETE", "/sse?channel=a", {}, None, 405),
    ("unknown-path", "GET", "/nope", {}, None, 404),
    ("unknown-path-deep", "POST", "/channelsx/a", {}, b"1", 404),
]


def batch(document: Any) -> bytes:
    return document if isinstance(document, bytes) else orjson.dumps(document)


BATCHES: list[tuple[str, Any, int]] = [
    ("not-json", b"{events: [", 400),
    ("empty-body", b"", 400),
    ("too-deep", b'{"events":[{"channel":"a","data":' + b"[" * 2000 + b"]" * 2000 + b"}]}", 400),
    ("not-an-object", [1, 2], 400),
    ("string", "events", 400),
    ("no-events", {}, 400),
    ("events-not-a-list", {"events": {"channel": "a"}}, 400),
    ("events-null", {"events": None}, 400),
    ("empty-list", {"events": []}, 400),
    ("too-many", {"events": [{"channel": "a", "data": i} for i in range(1001)]}, 400),
    ("item-not-object", {"events": ["a"]}, 400),
    ("unknown-field", {"events": [{"channel": "a", "data": 1, "colour": "red"}]}, 400),
    ("data-and-base64", {"events": [{"channel": "a", "data": 1, "data_base64": "AA=="}]}, 400),
    ("bad-base64", {"events": [{"channel": "a", "data_base64": "***"}]}, 400),
    ("base64-not-string", {"events": [{"channel": "a", "data_base64": 5}]}, 400),
    ("channel-not-string", {"events": [{"channel": 5, "data": 1}]}, 400),
    ("channel-missing", {"events": [{"data": 1}]}, 400),
    ("channel-wildcard", {"events": [{"channel": "a/*", "data": 1}]}, 400),
    ("channel-dot-dot", {"events": [{"channel": "a/..", "data": 1}]}, 400),
    ("type-not-string", {"events": [{"channel": "a", "type": 1}]}, 400),
    ("bad-type", {"events": [{"channel": "a", "type": "a b"}]}, 400),
    ("content-type-not-string", {"events": [{"channel": "a", "datacontenttype": []}]}, 400),
    ("bad-content-type", {"events": [{"channel": "a", "datacontenttype": "x"}]}, 400),
    ("key-not-string", {"events": [{"channel": "a", "idempotency_key": 1}]}, 400),
    ("second-item-bad", {"events": [{"channel": "a", "data": 1}, {"channel": ""}]}, 400),
    (
        "item-too-large",
        {
            "events": [
                {"channel": "a", "data_base64": base64.b64encode(b"x" * (MAX_EVENT + 1)).decode()}
            ]
        },
        413,
    ),
    ("body-too-large", {"events": [{"channel": "a", "data": "x" * (1024 * 1024)}]}, 413),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "status"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_malformed_request_gets_a_json_4xx(
    server: RunningServer,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | None,
    status: int,
) -> None:
    response = http_request(server.url, method, target, headers, body)
    assert_json_error(response, status)


@pytest.mark.parametrize(
    ("document", "status"), [case[1:] for case in BATCHES], ids=[case[0] for case in BATCHES]
)
def test_malformed_batch_gets_a_json_4xx_and_publishes_nothing(
    server: RunningServer, document: Any, status: int
) -> None:
    head = server.run_coroutine(server.hub.log.head())
    response = http_request(server.url, "POST", "/publish", JSON, batch(document))
    assert_json_error(response, status)
    assert server.run_coroutine(server.hub.log.head()) == head


def test_body_over_the_limit_by_chunked_upload_without_content_length_is_413(
    server: RunningServer,
) -> None:
    head = (
        b"POST /channels/big HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    response = raw_request(server.url, head, body_chunks=chunked(b"x" * (4 * MAX_EVENT)))
    assert_json_error(response, 413)


def test_batch_over_the_limit_by_chunked_upload_is_413(server: RunningServer) -> None:
    head = (
        b"POST /publish HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    body = b'{"events":[' + b",".join([b'{"channel":"a","data":1}'] * 200_000) + b"]}"
    response = raw_request(server.url, head, body_chunks=chunked(body))
    assert_json_error(response, 413)


def test_declared_content_length_over_the_limit_is_413_without_waiting_for_the_body(
    server: RunningServer,
) -> None:
    # The client claims 10 MB but sends 5 bytes: the server must answer from the header.
    head = (
        b"POST /channels/a HTTP/1.1\r\nHost: test\r\nContent-Length: 10000000\r\n"
        b"Connection: close\r\n\r\n"
    )
    response = raw_request(server.url, head, body_chunks=[b"hello"])
    assert_json_error(response, 413)


def test_content_length_contradicted_by_chunked_coding_is_refused(server: RunningServer) -> None:
    # RFC 9112 §6.1: a message with both is a smuggling attempt; the HTTP layer refuses it
    # (uvicorn answers in plain text: this is below the API, so only the status is checked).
    head = (
        b"POST /channels/a HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    response = raw_request(server.url, head, body_chunks=chunked(b"x" * (2 * MAX_EVENT)))
    assert 400 <= response.status < 500


@pytest.mark.parametrize(
    "target",
    [b"/channels/a\xff", b"/poll?channel=a\xff", b"/sse?channel=\xc3\x28"],
    ids=["path", "query", "sse-query"],
)
def test_raw_non_ascii_bytes_in_the_request_target_are_refused(
    server: RunningServer, target: bytes
) -> None:
    # RFC 9112 §3.2: a request-target is visible ASCII; the HTTP parser refuses anything else.
    response = http_request(
        server.url, "POST" if b"channels" in target else "GET", target, {}, b"1"
    )
    assert 400 <= response.status < 500


def test_server_still_serves_after_all_the_malformed_input(server: RunningServer) -> None:
    response = http_request(server.url, "POST", "/channels/still/ok", JSON, b'{"ok":true}')
    assert response.status == 201, response.body
    assert orjson.loads(response.body)["data"] == {"ok": True}
