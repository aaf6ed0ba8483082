"""The HTTP API against a real server: publish, batch publish, idempotency, history, health."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from conftest import RunningServer
from streaming import raw_request
from tidings.events import Cursor


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def publish(client: httpx.Client, channel: str, data: Any = None, **kwargs: Any) -> dict[str, Any]:
    if data is not None:
        kwargs["json"] = data
    response = client.post(f"/channels/{channel}", **kwargs)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def history(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/history", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- single publish --------------------------------------------------------------------------


def test_publish_json_returns_201_with_the_cloudevents_envelope(client: httpx.Client) -> None:
    response = client.post("/channels/orders/42", json={"total": 9.5, "items": [1, 2]})
    assert response.status_code == 201
    assert response.headers["content-type"].startswith("application/json")
    assert "idempotent-replayed" not in response.headers
    event = response.json()
    assert event["specversion"] == "1.0"
    assert event["channel"] == "orders/42"
    assert event["source"] == "/channels/orders/42"
    assert event["type"] == "message"
    assert event["datacontenttype"] == "application/json"
    assert event["data"] == {"total": 9.5, "items": [1, 2]}
    assert event["time"].endswith("Z")
    cursor = Cursor.parse(event["id"])
    assert cursor.seq == 1


def test_publish_cursors_increase_by_one_and_share_the_epoch(client: httpx.Client) -> None:
    cursors = [Cursor.parse(publish(client, f"c/{i}", i)["id"]) for i in range(5)]
    assert len({c.epoch for c in cursors}) == 1
    assert [c.seq for c in cursors] == [cursors[0].seq + i for i in range(5)]


def test_publish_type_from_query_or_ce_type_header(client: httpx.Client) -> None:
    assert publish(client, "a", 1, params={"type": "order.created"})["type"] == "order.created"
    assert publish(client, "a", 1, headers={"ce-type": "order.paid"})["type"] == "order.paid"


def test_publish_type_query_parameter_wins_over_ce_type_header(client: httpx.Client) -> None:
    event = publish(client, "a", 1, params={"type": "from.query"}, headers={"ce-type": "x.y"})
    assert event["type"] == "from.query"


def test_publish_with_an_empty_body_is_allowed(client: httpx.Client) -> None:
    response = client.post("/channels/empty", content=b"")
    assert response.status_code == 201, response.text
    event = response.json()
    assert event["data"] == ""
    assert event["datacontenttype"].startswith("text/plain")


def test_publish_text_is_a_string_and_binary_is_base64(client: httpx.Client) -> None:
    text = publish(client, "t", content="héllo", headers={"Content-Type": "text/plain"})
    assert text["data"] == "héllo"
    assert text["datacontenttype"] == "text/plain"
    blob = bytes(range(256))
    binary = publish(
        client, "b", content=blob, headers={"Content-Type": "application/octet-stream"}
    )
    assert "data" not in binary
    assert base64.b64decode(binary["data_base64"]) == blob


def test_publish_without_content_type_recognises_json_text_and_binary(
    client: httpx.Client,
) -> None:
    # curl -d sends application/x-www-form-urlencoded: treated like no content type.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert publish(client, "s", content=b'{"a": 1}', headers=form)["data"] == {"a": 1}
    assert publish(client, "s", content=b"plain words", headers=form)["data"] == "plain words"
    binary = publish(client, "s", content=b"\xff\x00", headers=form)
    assert binary["datacontenttype"] == "application/octet-stream"


def test_published_event_is_in_history_with_the_same_cursor(client: httpx.Client) -> None:
    event = publish(client, "h/1", {"n": 1})
    page = history(client, channel="h/1")
    assert page["events"] == [event]
    assert page["recovered"] is True
    assert page["more"] is False
    assert page["cursor"] == event["id"]


# -- idempotency -----------------------------------------------------------------------------


def test_same_idempotency_key_twice_is_one_event_with_the_same_cursor(
    client: httpx.Client,
) -> None:
    headers = {"Idempotency-Key": "order-42-created"}
    first = client.post("/channels/orders/42", json={"n": 1}, headers=headers)
    second = client.post("/channels/orders/42", json={"n": 1}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    page = history(client, channel="orders/42")
    assert [e["id"] for e in page["events"]] == [first.json()["id"]]


def test_same_idempotency_key_on_another_channel_is_another_event(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "k1"}
    first = publish(client, "orders/1", 1, headers=headers)
    other = client.post("/channels/orders/2", json=1, headers=headers)
    assert other.status_code == 201
    assert "idempotent-replayed" not in other.headers
    assert other.json()["id"] != first["id"]
    assert len(history(client, channel="orders/*")["events"]) == 2


def test_concurrent_publishes_with_one_idempotency_key_make_one_event(
    server: RunningServer,
) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.post("/channels/race", json=1, headers={"Idempotency-Key": "once"})
            assert r.status_code == 201
            with lock:
                ids.append(r.json()["id"])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(ids) == 8
    assert len(set(ids)) == 1
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert len(history(c, channel="race")["events"]) == 1


# -- batch publish ---------------------------------------------------------------------------


def test_batch_publish_is_in_order_with_consecutive_cursors(client: httpx.Client) -> None:
    publish(client, "before", 0)
    items = [
        {"channel": "b/1", "data": {"n": 1}},
        {"channel": "b/2", "type": "x.y", "data": "text", "datacontenttype": "text/plain"},
        {"channel": "b/1", "data_base64": base64.b64encode(b"\x00\x01").decode()},
        {"channel": "b/3"},
    ]
    response = client.post("/publish", json={"events": items})
    assert response.status_code == 201, response.text
    events = response.json()["events"]
    assert [e["channel"] for e in events] == ["b/1", "b/2", "b/1", "b/3"]
    cursors = [Cursor.parse(e["id"]) for e in events]
    assert [c.seq for c in cursors] == list(range(cursors[0].seq, cursors[0].seq + 4))
    assert events[0]["data"] == {"n": 1}
    assert events[1]["type"] == "x.y" and events[1]["data"] == "text"
    assert base64.b64decode(events[2]["data_base64"]) == b"\x00\x01"
    assert events[3]["data"] is None
    assert history(client, channel="b/**")["events"] == events


def test_batches_stay_contiguous_under_concurrent_publishers(server: RunningServer) -> None:
    errors: list[BaseException] = []
    batches: list[list[dict[str, Any]]] = []
    lock = threading.Lock()

    def send(worker: int) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=10) as c:
                for n in range(5):
                    items = [{"channel": f"w/{worker}", "data": [n, i]} for i in range(10)]
                    r = c.post("/publish", json={"events": items})
                    assert r.status_code == 201, r.text
                    with lock:
                        batches.append(r.json()["events"])
                    c.post(f"/channels/w/{worker}/single", json=n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(batches) == 30
    for events in batches:
        seqs = [Cursor.parse(e["id"]).seq for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + 10))
        assert [e["data"][1] for e in events] == list(range(10))


def test_batch_with_one_bad_item_publishes_nothing(client: httpx.Client) -> None:
    items = [{"channel": "ok", "data": 1}, {"channel": "not ok", "data": 2}]
    response = client.post("/publish", json={"events": items})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_channel"
    assert "events[1]" in body["detail"]
    assert history(client, channel="**")["events"] == []


def test_batch_with_a_repeated_key_on_one_channel_makes_one_event(client: httpx.Client) -> None:
    items = [
        {"channel": "dup", "data": 1, "idempotency_key": "k"},
        {"channel": "dup", "data": 2, "idempotency_key": "k"},
        {"channel": "dup2", "data": 3, "idempotency_key": "k"},
    ]
    events = client.post("/publish", json={"events": items}).json()["events"]
    assert events[0] == events[1]
    assert events[2]["id"] != events[0]["id"]
    assert [e["data"] for e in history(client, channel=["dup", "dup2"])["events"]] == [1, 3]


def test_batch_idempotency_keys_replay_per_item(client: httpx.Client) -> None:
    items = [{"channel": "i", "data": 1, "idempotency_key": "a"}]
    first = client.post("/publish", json={"events": items}).json()["events"]
    items.append({"channel": "i", "data": 2, "idempotency_key": "b"})
    second = client.post("/publish", json={"events": items}).json()["events"]
    assert second[0] == first[0]
    assert Cursor.parse(second[1]["id"]).seq == Cursor.parse(first[0]["id"]).seq + 1
    assert len(history(client, channel="i")["events"]) == 2


# -- history ---------------------------------------------------------------------------------


def test_history_pages_through_everything_with_limit_and_since(client: httpx.Client) -> None:
    published = [publish(client, f"p/{i % 3}", i)["id"] for i in range(25)]
    seen: list[str] = []
    since: str | None = None
    for _ in range(20):
        params: dict[str, Any] = {"channel": "p/*", "limit": 7}
        if since is not None:
            params["since"] = since
        page = history(client, **params)
        seen.extend(e["id"] for e in page["events"])
        since = page["cursor"]
        if not page["more"]:
            break
    assert seen == published


def test_history_filters_by_several_channels_and_patterns(client: httpx.Client) -> None:
    ids = {name: publish(client, name, 1)["id"] for name in ["a/1", "a/1/x", "b/2", "c/3", "d"]}
    page = history(client, channel=["a/*", "c/3"])
    assert [e["id"] for e in page["events"]] == [ids["a/1"], ids["c/3"]]
    page = history(client, channel=["a/**", "d"])
    assert [e["id"] for e in page["events"]] == [ids["a/1"], ids["a/1/x"], ids["d"]]


def test_history_on_an_empty_log_answers_the_head_cursor(
    client: httpx.Client, server: RunningServer
) -> None:
    page = history(client, channel="nothing")
    assert page == {
        "events": [],
        "cursor": f"{server.hub.log.epoch}:0",
        "recovered": True,
        "more": False,
    }


# -- health ----------------------------------------------------------------------------------


def test_healthz_reports_ok_epoch_cursor_and_subscribers(
    client: httpx.Client, server: RunningServer
) -> None:
    event = publish(client, "h", 1)
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body == {
        "status": "ok",
        "epoch": server.hub.log.epoch,
        "cursor": event["id"],
        "subscribers": 0,
    }


PUBLISHES = {
    "created": ("orders/1", b'{"a":1}', "content-type: application/json\r\n"),
    "replayed": ("orders/1", b'{"a":1}', "idempotency-key: same\r\n"),
    "invalid channel": ("orders//1", b"1", ""),
    "form encoded": ("orders/1", b"a=b", "content-type: application/x-www-form-urlencoded\r\n"),
    "bad json": ("orders/1", b'{"a":', "content-type: application/json\r\n"),
    "system channel": ("_tidings/x", b"1", ""),
    "bad credential": ("orders/1", b"1", "authorization: Basic abc\r\n"),
    "too large": ("orders/1", b"x" * 70_000, ""),
}


@pytest.mark.parametrize("case", PUBLISHES)
def test_publish_answers_alike_below_starlette_and_through_it(
    server: RunningServer, case: str
) -> None:
    # Without a query string or an Origin header, POST /channels/{c} is answered below
    # Starlette (http.publish_direct); "?type=message" (the default type) takes the app's route.
    channel, body, headers = PUBLISHES[case]
    answers = []
    for query in ("", "?type=message"):
        request = (
            f"POST /channels/{channel}{query} HTTP/1.1\r\nhost: tidings\r\n{headers}"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        if case == "replayed":  # both answers are replays
            raw_request(server.url, request, body_chunks=[body])
        answer = raw_request(server.url, request, body_chunks=[body])
        answer.headers.pop("date", None)
        content = answer.json()
        if answer.status == 201:  # another event each time
            del content["id"], content["time"]
        answers.append((answer.status, list(answer.headers.items()), content))
    assert answers[0] == answers[1]
    assert (answers[0][0] == 201) == (case in ("created", "replayed", "form encoded"))


def test_error_bodies_are_json_with_error_and_detail(client: httpx.Client) -> None:
    response = client.post("/channels/a//b", json=1)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_channel"
    response = client.get("/channels/a")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert orjson.loads(response.content)["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/cloudevents+json",
     "application/vnd.api+json; charset=utf-8"],
)  # fmt: skip
def test_batch_string_data_with_a_json_content_type_is_a_json_string(
    client: httpx.Client, content_type: str
) -> None:
    item = {"channel": "j", "data": "hello", "datacontenttype": content_type}
    response = client.post("/publish", json={"events": [item]})
    assert response.status_code == 201, response.text
    [event] = response.json()["events"]
    assert event["data"] == "hello"
    assert event["datacontenttype"] == content_type


def test_history_with_a_cursor_older_than_retention_reports_continuity_lost(
    make_server: Any,
) -> None:
    server = make_server(log_max_events=3)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        cursors = [publish(c, "old", i)["id"] for i in range(10)]
        server.run_coroutine(server.hub.log.trim())
        page = history(c, channel="old", since=cursors[0])
        assert page["recovered"] is False
        assert "retention" in page["reason"]
        assert page["events"] == []
        assert page["cursor"] == cursors[-1]
        # Without a cursor, history starts at the oldest retained event.
        page = history(c, channel="old")
        assert [e["id"] for e in page["events"]] == cursors[-3:]
        assert page["recovered"] is True


def test_publish_while_the_hub_is_draining_is_503_json(server: RunningServer) -> None:
    async def drain() -> None:
        server.hub.drain()

    server.run_coroutine(drain())
    with httpx.Client(base_url=server.url, timeout=10) as c:
        response = c.post("/channels/late", json=1)
    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"
