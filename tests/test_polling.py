"""Short and long polling against a real server: resume, ETags, held requests, continuity lost."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from conftest import RunningServer
from streaming import publish, publish_mixed, wait_for

ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def poll(client: httpx.Client, **params: Any) -> dict[str, Any]:
    headers = params.pop("headers", None)
    response = client.get("/poll", params=params, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["etag"] == f'"{body["cursor"]}"'
    return body


def ids(page: dict[str, Any]) -> list[str]:
    return [e["id"] for e in page["events"]]


WAITS = pytest.mark.parametrize("wait", [None, "5"], ids=["short", "long"])


def with_wait(params: dict[str, Any], wait: str | None) -> dict[str, Any]:
    return params if wait is None else {**params, "wait": wait}


# -- resume ----------------------------------------------------------------------------------


@WAITS
def test_poll_from_the_middle_gets_exactly_the_later_events(
    client: httpx.Client, wait: str | None
) -> None:
    published = publish_mixed(client, 20)
    page = poll(client, **with_wait({"channel": "orders/*", "since": published[9][1]}, wait))
    expected = [c for ch, c in published[10:] if ch in ("orders/1", "orders/2")]
    assert ids(page) == expected
    assert page["recovered"] is True
    assert page["more"] is False
    # Caught up: the cursor moves to the head even if the last events were not ours.
    assert page["cursor"] == published[-1][1]


@WAITS
@pytest.mark.parametrize(
    "channels",
    [["orders/*"], ["orders/**"], ["users/1", "orders/1/items"], ["**"]],
    ids=["star", "double-star", "several", "everything"],
)
def test_pattern_and_multi_channel_polls_resume_with_one_cursor(
    client: httpx.Client, wait: str | None, channels: list[str]
) -> None:
    from tidings.events import parse_patterns

    patterns = parse_patterns(channels)
    published = publish_mixed(client, 24)
    expected = [c for ch, c in published[7:] if any(p.matches(ch) for p in patterns)]
    seen: list[str] = []
    cursor = published[6][1]
    for _ in range(20):
        page = poll(client, **with_wait({"channel": channels, "since": cursor, "limit": 4}, wait))
        seen.extend(ids(page))
        cursor = page["cursor"]
        if len(seen) >= len(expected):
            break
    assert seen == expected
    # Nothing more to come (a short poll, so an empty answer does not hold the request).
    assert poll(client, channel=channels, since=cursor)["events"] == []


def test_poll_without_a_cursor_starts_at_the_head(client: httpx.Client) -> None:
    head = publish(client, "a")
    page = poll(client, channel="a")
    assert page == {"events": [], "cursor": head, "recovered": True, "more": False}


def test_poll_pages_with_limit_and_more(client: httpx.Client) -> None:
    first = publish(client, "p", 0)
    cursors = [publish(client, "p", i) for i in range(1, 11)]
    page = poll(client, channel="p", since=first, limit=4)
    assert ids(page) == cursors[:4]
    assert page["more"] is True
    page = poll(client, channel="p", since=page["cursor"], limit=4)
    assert ids(page) == cursors[4:8]
    page = poll(client, channel="p", since=page["cursor"], limit=4)
    assert ids(page) == cursors[8:]


def test_short_poll_loop_while_publishing_sees_every_event_once(
    server: RunningServer, client: httpx.Client
) -> None:
    cursor = poll(client, channel="loop")["cursor"]
    published: list[str] = []

    def publisher() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for i in range(200):
                published.append(publish(c, "loop", i))

    thread = threading.Thread(target=publisher)
    thread.start()
    seen: list[str] = []
    try:
        for _ in range(5000):
            page = poll(client, channel="loop", since=cursor, limit=7)
            seen.extend(ids(page))
            cursor = page["cursor"]
            if len(seen) >= 200:
                break
    finally:
        thread.join(30)
    assert seen == published


# -- short poll: ETag and If-None-Match -----------------------------------------------------


def test_etag_is_the_cursor_and_if_none_match_gives_304_until_new_events(
    client: httpx.Client,
) -> None:
    first = publish(client, "e", 1)
    response = client.get("/poll", params={"channel": "e"})
    assert response.status_code == 200
    assert response.headers["etag"] == f'"{first}"'
    assert response.json()["cursor"] == first
    assert response.headers["cache-control"] == "no-cache"

    unchanged = client.get(
        "/poll", params={"channel": "e"}, headers={"If-None-Match": f'"{first}"'}
    )
    assert unchanged.status_code == 304
    assert unchanged.headers["etag"] == f'"{first}"'
    assert unchanged.content == b""

    publish(client, "other", "does not count")
    still = client.get("/poll", params={"channel": "e"}, headers={"If-None-Match": f'"{first}"'})
    assert still.status_code == 304

    new = [publish(client, "e", i) for i in range(2)]
    changed = client.get("/poll", params={"channel": "e"}, headers={"If-None-Match": f'"{first}"'})
    assert changed.status_code == 200
    assert ids(changed.json()) == new
    assert changed.headers["etag"] == f'"{new[-1]}"'


def test_weak_and_unquoted_if_none_match_are_accepted(client: httpx.Client) -> None:
    first = publish(client, "w", 1)
    for tag in (f'W/"{first}"', first, f'"{first}", "other"'):
        response = client.get("/poll", params={"channel": "w"}, headers={"If-None-Match": tag})
        assert response.status_code == 304, tag


def test_since_wins_over_if_none_match(client: httpx.Client) -> None:
    cursors = [publish(client, "s", i) for i in range(4)]
    response = client.get(
        "/poll", params={"channel": "s", "since": cursors[1]}, headers={"If-None-Match": cursors[3]}
    )
    assert response.status_code == 200
    assert ids(response.json()) == cursors[2:]


def test_if_none_match_star_polls_from_the_head(client: httpx.Client) -> None:
    head = publish(client, "star")
    response = client.get("/poll", params={"channel": "star"}, headers={"If-None-Match": "*"})
    assert response.status_code == 200
    assert response.json()["cursor"] == head


# -- long poll -------------------------------------------------------------------------------


def test_held_long_poll_returns_as_soon_as_an_event_is_published(
    server: RunningServer, client: httpx.Client
) -> None:
    since = publish(client, "hold", 0)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(poll, client, channel="hold", since=since, wait=30)
        wait_for(lambda: server.hub.subscriber_count == 1, what="the long poll to be held")
        assert not held.done()
        publish(client, "hold/other", "not matching")
        publish(client, "elsewhere", "not matching")
        assert not held.done()
        cursor = publish(client, "hold", 1)
        page = held.result(timeout=10)  # well before the 30 s wait
    assert ids(page) == [cursor]
    assert page["cursor"] == cursor
    wait_for(lambda: server.hub.subscriber_count == 0, what="subscriber removed")


def test_long_poll_with_nothing_returns_empty_after_wait(client: httpx.Client) -> None:
    head = publish(client, "idle")
    page = poll(client, channel="idle", since=head, wait="0.3")
    assert page == {"events": [], "cursor": head, "recovered": True, "more": False}


def test_long_poll_with_if_none_match_and_nothing_new_answers_304(client: httpx.Client) -> None:
    head = publish(client, "idle")
    response = client.get(
        "/poll", params={"channel": "idle", "wait": "0.2"}, headers={"If-None-Match": f'"{head}"'}
    )
    assert response.status_code == 304


def test_several_held_long_polls_all_return_on_one_publish(
    server: RunningServer, client: httpx.Client
) -> None:
    since = publish(client, "many/0")
    channels = ["many/1", "many/*", "many/**", "**", "many/1"]
    with ThreadPoolExecutor(len(channels)) as pool:
        clients = [httpx.Client(base_url=server.url, timeout=10) for _ in channels]
        try:
            held = [
                pool.submit(poll, c, channel=ch, since=since, wait=30)
                for c, ch in zip(clients, channels, strict=True)
            ]
            wait_for(lambda: server.hub.subscriber_count == len(channels), what="all polls held")
            cursor = publish(client, "many/1", "once")
            pages = [h.result(timeout=10) for h in held]
        finally:
            for c in clients:
                c.close()
    assert [ids(p) for p in pages] == [[cursor]] * len(channels)


def test_long_poll_counts_as_longpoll_in_metrics(
    server: RunningServer, client: httpx.Client
) -> None:
    since = publish(client, "m")
    publish(client, "m")
    poll(client, channel="m", since=since, wait=5)
    poll(client, channel="m", since=since)
    text = client.get("/metrics").text
    assert 'tidings_delivered_events_total{transport="longpoll"} 1.0' in text
    assert 'tidings_delivered_events_total{transport="poll"} 1.0' in text


# -- continuity lost -------------------------------------------------------------------------


def _trimmed(make_server: ServerFactory) -> tuple[RunningServer, list[str]]:
    server = make_server(log_max_events=5)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        cursors = [publish(c, "keep", i) for i in range(20)]
    server.run_coroutine(server.hub.log.trim())
    return server, cursors


@pytest.mark.parametrize("wait", [None, "30"], ids=["short", "long"])
def test_cursor_older_than_retention_reports_continuity_lost_at_once(
    make_server: ServerFactory, wait: str | None
) -> None:
    server, cursors = _trimmed(make_server)
    with httpx.Client(base_url=server.url, timeout=10) as c:  # a held 30 s poll would time out
        page = poll(c, **with_wait({"channel": "keep", "since": cursors[3]}, wait))
        assert page["events"] == []
        assert page["recovered"] is False
        assert "retention" in page["reason"]
        assert page["cursor"] == cursors[-1]
        # From the head cursor it answers, the client continues normally.
        live = publish(c, "keep", "live")
        page = poll(c, **with_wait({"channel": "keep", "since": page["cursor"]}, wait))
        assert ids(page) == [live]
        assert page["recovered"] is True
        assert "reason" not in page


@pytest.mark.parametrize("wait", [None, "30"], ids=["short", "long"])
@pytest.mark.parametrize("cursor", ["other0epoch:2", "{epoch}:999999"], ids=["epoch", "ahead"])
def test_cursor_from_another_epoch_or_ahead_reports_continuity_lost_at_once(
    server: RunningServer, client: httpx.Client, wait: str | None, cursor: str
) -> None:
    head = [publish(client, "x", i) for i in range(3)][-1]
    since = cursor.format(epoch=server.hub.log.epoch)
    page = poll(client, **with_wait({"channel": "x", "since": since}, wait))
    assert page["events"] == []
    assert page["recovered"] is False
    assert page["reason"]
    assert page["cursor"] == head


def test_if_none_match_from_another_epoch_is_200_with_continuity_lost(
    client: httpx.Client,
) -> None:
    head = publish(client, "x")
    response = client.get("/poll", params={"channel": "x"}, headers={"If-None-Match": '"zz:1"'})
    assert response.status_code == 200
    body = response.json()
    assert body["recovered"] is False
    assert body["cursor"] == head
    assert response.headers["etag"] == f'"{head}"'


def test_long_poll_abandoned_by_its_client_is_released_at_once(server: RunningServer) -> None:
    # A client that gives up on a held request must not keep a subscription for the whole wait.
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            f"GET /poll?channel=gone&wait=60 HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        )
        wait_for(lambda: server.hub.subscriber_count == 1, what="the long poll to be held")
    wait_for(lambda: server.hub.subscriber_count == 0, timeout=5, what="the subscription released")


def test_long_poll_with_if_none_match_returns_events_published_during_the_wait(
    server: RunningServer, client: httpx.Client
) -> None:
    head = publish(client, "inm")
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            client.get,
            "/poll",
            params={"channel": "inm", "wait": "30"},
            headers={"If-None-Match": f'"{head}"'},
        )
        wait_for(lambda: server.hub.subscriber_count == 1, what="the long poll to be held")
        cursor = publish(client, "inm", 1)
        response = held.result(timeout=10)
    assert response.status_code == 200
    assert ids(response.json()) == [cursor]
    assert response.headers["etag"] == f'"{cursor}"'


def test_held_long_poll_that_overflows_its_queue_answers_empty_and_loses_nothing(
    make_server: ServerFactory,
) -> None:
    server = make_server(hub_queue_size=2, log_backend="memory")
    with httpx.Client(base_url=server.url, timeout=10) as c, ThreadPoolExecutor(1) as pool:
        since = publish(c, "burst")
        held = pool.submit(poll, c, channel="burst", since=since, wait=30)
        wait_for(lambda: server.hub.subscriber_count == 1, what="the long poll to be held")
        items = [{"channel": "burst", "data": i} for i in range(10)]
        response = c.post("/publish", json={"events": items})
        assert response.status_code == 201
        cursors = [e["id"] for e in response.json()["events"]]
        page = held.result(timeout=10)
        # Answered at the position it had reached; the next poll reads the burst from history.
        assert page["events"] == []
        assert page["cursor"] == since
        assert ids(poll(c, channel="burst", since=page["cursor"])) == cursors
        text = c.get("/metrics").text
        assert 'tidings_lagged_disconnects_total{transport="longpoll"} 1.0' in text
