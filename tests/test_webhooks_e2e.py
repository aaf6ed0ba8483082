"""Webhooks end to end: a real server delivering to a real HTTP receiver on 127.0.0.1.

Every request the receiver gets is checked with the ``standardwebhooks`` and ``svix`` packages'
own verifiers. Retries run on a compressed schedule (0, 50 ms, 50 ms, 50 ms: four attempts), so
the receiver behaviours of issue 6 (500, timeout, 429 + Retry-After, 301, 410) take well under
a second each. The crash test (``kill -9`` mid-delivery) is in test_webhooks_crash.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import orjson
import pytest

from conftest import RunningServer
from streaming import SSEClient, envelope
from tidings.events import Cursor
from tidings.webhooks.store import WebhookStore
from webhook_receiver import Answer, Received, Receiver, poll, refused, verify

HOOKS: dict[str, Any] = {
    "webhooks_allow_http": True,
    "webhooks_allowed_networks": ("127.0.0.1/32",),
    "webhooks_schedule": ("0", "50ms", "50ms", "50ms"),
}
ATTEMPTS = 4  # len(HOOKS["webhooks_schedule"])
JWT_SECRET = "test-secret-with-at-least-32-bytes-of-key"
TIMER_SLACK = 0.02  # seconds: event loop timers may fire this much early


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def hub(make_server: Callable[..., RunningServer]) -> RunningServer:
    return make_server(**HOOKS)


@pytest.fixture
def api(hub: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hub.url, timeout=10) as client:
        yield client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def create(api: httpx.Client, url: str, channels: tuple[str, ...] = ("orders/**",),
           **fields: Any) -> dict[str, Any]:  # fmt: skip
    response = api.post("/webhooks", json={"url": url, "channels": list(channels), **fields})
    assert response.status_code == 201, response.text
    endpoint: dict[str, Any] = response.json()
    return endpoint


def publish(api: httpx.Client, channel: str, data: Any, type: str | None = None) -> str:
    params = {"type": type} if type else None
    response = api.post(f"/channels/{channel}", json=data, params=params)
    assert response.status_code == 201, response.text
    cursor: str = response.json()["id"]
    return cursor


def show(api: httpx.Client, id: str) -> dict[str, Any]:
    response = api.get(f"/webhooks/{id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def attempts(api: httpx.Client, id: str, **params: Any) -> list[dict[str, Any]]:
    """The endpoint's attempts, oldest first (the API lists them newest first)."""
    response = api.get(f"/webhooks/{id}/attempts", params=params)
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["attempts"]))


def wait_attempts(api: httpx.Client, id: str, count: int, timeout: float = 10) -> list[Any]:
    def enough() -> list[dict[str, Any]] | None:
        found = attempts(api, id)
        return found if len(found) >= count else None

    return poll(enough, timeout, lambda: f"{count} attempts; have {attempts(api, id)}")


def failed(api: httpx.Client, id: str) -> list[dict[str, Any]]:
    response = api.get(f"/webhooks/{id}/failed")
    assert response.status_code == 200, response.text
    marks: list[dict[str, Any]] = response.json()["failed"]
    return marks


def history(api: httpx.Client, channel: str) -> list[dict[str, Any]]:
    response = api.get("/history", params={"channel": channel, "limit": 1000})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def operational(api: httpx.Client, id: str, type: str, timeout: float = 10) -> dict[str, Any]:
    """The first operational event ``type`` on the endpoint's system channel."""
    channel = f"_tidings/webhooks/{id}"

    def found() -> dict[str, Any] | None:
        return next((e for e in history(api, channel) if e["type"] == type), None)

    return poll(found, timeout, lambda: f"{type} on {channel}: {history(api, channel)}")


def health(api: httpx.Client, id: str, state: str, timeout: float = 10) -> dict[str, Any]:
    return poll(lambda: (v := show(api, id))["health"] == state and v, timeout,
                lambda: f"health {state!r}; endpoint is {show(api, id)}")  # fmt: skip


def received(receiver: Receiver, event: str) -> Received:
    """The first request for ``event`` the receiver got."""

    def first() -> Received | None:
        return next((r for r in receiver.requests if r.id == event), None)

    return poll(first, what=f"a request for {event}")


def past(view: dict[str, Any], event: str) -> bool:
    """Whether an endpoint view's cursor (its stored delivery position) is at or past
    ``event``: an idle endpoint's position follows the head, past events not for it."""
    cursor = view["cursor"]
    return cursor is not None and Cursor.parse(cursor).seq >= Cursor.parse(event).seq


def refusal(response: httpx.Response, status: int, *words: str) -> str | None:
    """None when ``response`` is ``status`` with every word in its detail; else what it was."""
    if response.status_code != status:
        return f"status {response.status_code}, not {status}: {response.text}"
    body = response.json()
    missing = [w for w in words if w not in body.get("detail", "")]
    return f"detail {body.get('detail')!r} does not name {missing}" if missing else None


# -- 1. signing and the body ----------------------------------------------------------------------


def test_every_request_verifies_with_both_libraries_and_carries_the_history_envelope(
    api: httpx.Client, receiver: Receiver
) -> None:
    endpoint = create(api, receiver.url)
    secret = endpoint["secret"]
    assert secret.startswith("whsec_")
    answers = {}
    for n in range(3):
        response = api.post("/channels/orders/1", json={"n": n}, params={"type": "order.paid"})
        assert response.status_code == 201
        answers[response.json()["id"]] = response.content
    publish(api, "users/1", {"n": 0})  # not this endpoint's channel

    got = receiver.wait_for(3)
    envelopes = {e["id"]: e for e in history(api, "orders/**")}
    assert sorted(r.id for r in got) == sorted(answers)
    for request in got:
        verify(secret, request)
        assert request.method == "POST" and request.path == "/hook"
        assert request.headers["content-type"] == "application/json"
        assert request.body == answers[request.id]  # byte for byte what publish answered
        assert orjson.loads(request.body) == envelopes[request.id]  # the history envelope
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
    last = max(answers, key=lambda c: int(c.split(":")[1]))
    poll(lambda: past(show(api, endpoint["id"]), last), what="the cursor to reach the last")
    time.sleep(0.1)
    assert len(receiver.requests) == 3  # users/1 was not sent


def test_rotation_signs_with_both_secrets_during_grace_and_only_the_new_after_grace_0(
    api: httpx.Client, receiver: Receiver
) -> None:
    endpoint = create(api, receiver.url)
    id, old = endpoint["id"], endpoint["secret"]

    response = api.post(f"/webhooks/{id}/rotate", json={})  # the default grace: 24 h
    assert response.status_code == 200, response.text
    new = response.json()["secret"]
    assert new.startswith("whsec_") and new != old
    assert [s["expires"] is None for s in response.json()["secrets"]] == [True, False]
    publish(api, "orders/1", {"n": 1})
    [during] = receiver.wait_for(1)
    verify(new, during)
    verify(old, during)  # a receiver still on the old secret verifies during the grace
    assert len(during.headers["webhook-signature"].split(" ")) == 2

    response = api.post(f"/webhooks/{id}/rotate", json={"grace": 0})
    assert response.status_code == 200, response.text
    newest = response.json()["secret"]
    assert len(response.json()["secrets"]) == 1
    publish(api, "orders/1", {"n": 2})
    after = receiver.wait_for(2)[1]
    verify(newest, after)
    assert refused(new, after), "grace 0: the rotated-out secret must no longer verify"
    assert refused(old, after)
    assert len(after.headers["webhook-signature"].split(" ")) == 1


def test_rotation_to_a_given_secret(api: httpx.Client, receiver: Receiver) -> None:
    endpoint = create(api, receiver.url)
    chosen = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    response = api.post(f"/webhooks/{endpoint['id']}/rotate", json={"secret": chosen, "grace": 0})
    assert response.status_code == 200, response.text
    assert response.json()["secret"] == chosen
    publish(api, "orders/1", 1)
    verify(chosen, receiver.wait_for(1)[0])
    bad = api.post(f"/webhooks/{endpoint['id']}/rotate", json={"secret": "whsec_short"})
    assert refusal(bad, 400, "secret") is None


def test_a_custom_header_never_duplicates_one_tidings_sets(
    api: httpx.Client, receiver: Receiver
) -> None:
    """A custom header named (in any case) like one tidings sets on every request is refused
    at registration, or the request carries that header once."""
    cases = [{"User-Agent": "custom/1"}, {"Accept-Encoding": "gzip"}]
    problems = []
    for n, headers in enumerate(cases):
        body = {"url": receiver.url, "channels": [f"h/{n}"], "headers": headers}
        made = api.post("/webhooks", json=body)
        if made.status_code == 400:
            continue  # refused: fine
        assert made.status_code == 201, made.text
        request = received(receiver, publish(api, f"h/{n}", n))
        names = [name.lower() for name, _ in request.fields]
        for name in {h.lower() for h in headers}:
            if names.count(name) != 1:
                sent = [f"{k}: {v}" for k, v in request.fields if k.lower() == name]
                problems.append(f"custom {headers}: {name} sent {names.count(name)} times: {sent}")
    assert not problems, "\n".join(problems)


# -- startup --------------------------------------------------------------------------------------


def test_the_admin_api_takes_endpoints_as_soon_as_the_server_is_ready(
    make_server: Callable[..., RunningServer], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk at startup: the webhook tables take half a second to open. Once the server
    says it is ready (``on_ready``; ``/healthz`` answers), registering an endpoint works."""
    opening = WebhookStore.open

    async def slow_open(self: WebhookStore) -> None:
        await asyncio.sleep(0.5)
        await opening(self)

    monkeypatch.setattr(WebhookStore, "open", slow_open)
    hub = make_server(**HOOKS)
    with httpx.Client(base_url=hub.url, timeout=10) as api:
        assert api.get("/healthz").status_code == 200
        response = api.post("/webhooks", json={"url": receiver.url, "channels": ["orders/**"]})
        assert response.status_code == 201, response.text


# -- 2. receiver behaviours -----------------------------------------------------------------------


def test_500_then_200_is_delivered_with_the_same_id_and_both_attempts_logged(
    api: httpx.Client, receiver: Receiver
) -> None:
    receiver.script(Answer(500, body=b"x" * 3000))
    endpoint = create(api, receiver.url)
    id = endpoint["id"]
    event = publish(api, "orders/1", {"n": 1})

    got = receiver.wait_for(2)
    assert [r.id for r in got] == [event, event]
    for request in got:
        verify(endpoint["secret"], request)
    listed = wait_attempts(api, id, 2)
    assert [(a["event"], a["number"], a["status"], a["outcome"], a["trigger"]) for a in listed] == [
        (event, 0, 500, "retry", "delivery"),
        (event, 1, 200, "delivered", "delivery"),
    ]
    assert all(a["error"] is None and a["duration"] >= 0 for a in listed)
    assert listed[0]["response"] == "x" * 1024  # the first KiB of the receiver's body
    assert listed[1]["response"] == "ok"
    assert [a["number"] for a in attempts(api, id, event=event)] == [0, 1]
    view = poll(lambda: past(v := show(api, id), event) and v, what="the cursor past it")
    assert view["health"] == "healthy"
    assert failed(api, id) == []
    recovered = operational(api, id, "webhook.endpoint_recovered")
    assert recovered["data"]["endpoint"] == id


def test_timeouts_are_failed_attempts_and_the_last_one_fails_the_event(
    api: httpx.Client, receiver: Receiver
) -> None:
    receiver.delay = 0.6
    endpoint = create(api, receiver.url, timeout=0.2)
    id = endpoint["id"]
    event = publish(api, "orders/1", {"n": 1})

    listed = wait_attempts(api, id, ATTEMPTS)
    assert [(a["number"], a["status"], a["error"]) for a in listed] == [
        (n, None, "timeout") for n in range(ATTEMPTS)
    ]
    assert all(0.15 <= a["duration"] < 0.6 for a in listed), listed
    marks = poll(lambda: failed(api, id), what="the event in /failed")
    assert [m["event"] for m in marks] == [event]
    assert "timeout" in marks[0]["reason"]
    exhausted = operational(api, id, "webhook.attempt_exhausted")
    assert exhausted["channel"] == f"_tidings/webhooks/{id}"
    assert exhausted["data"]["event"] == event
    assert exhausted["data"]["attempts"] == ATTEMPTS
    assert show(api, id)["health"] == "failing"
    assert [r.id for r in receiver.requests] == [event] * ATTEMPTS
    for request in receiver.requests:
        verify(endpoint["secret"], request)


def test_429_with_retry_after_is_retried_no_sooner_than_asked(
    api: httpx.Client, receiver: Receiver
) -> None:
    receiver.script(Answer(429, {"Retry-After": "1"}))
    endpoint = create(api, receiver.url)
    event = publish(api, "orders/1", {"n": 1})

    first, second = receiver.wait_for(2)
    assert first.id == second.id == event
    assert second.time - first.time >= 1.0 - TIMER_SLACK, second.time - first.time
    for request in (first, second):  # webhook-timestamp is each attempt's own time
        verify(endpoint["secret"], request)
        stamp = int(request.headers["webhook-timestamp"])
        assert request.time - 2 < stamp <= request.time, (stamp, request.time)
    listed = wait_attempts(api, endpoint["id"], 2)
    assert [(a["status"], a["outcome"]) for a in listed] == [(429, "retry"), (200, "delivered")]


def failed_as_redirects(
    api: httpx.Client, receiver: Receiver, status: int
) -> tuple[str, list[dict[str, Any]]]:
    """One event to an endpoint at ``receiver``, set to answer ``status`` with a ``Location``:
    every attempt fails as a redirect, and the event is given up on. (event, attempts)"""
    endpoint = create(api, receiver.url)
    id = endpoint["id"]
    event = publish(api, "orders/1", {"n": 1})
    marks = poll(lambda: failed(api, id), what="the event in /failed")
    assert [m["event"] for m in marks] == [event]
    listed = wait_attempts(api, id, ATTEMPTS)
    assert [a["status"] for a in listed] == [status] * ATTEMPTS
    assert all("redirect" in a["reason"] for a in listed), listed
    return event, listed


def test_a_301_is_a_failure_and_its_location_is_never_requested(
    api: httpx.Client, receiver: Receiver
) -> None:
    with Receiver() as elsewhere:
        receiver.default = Answer(301, {"Location": elsewhere.url})
        failed_as_redirects(api, receiver, 301)
        assert len(receiver.requests) == ATTEMPTS
        assert elsewhere.requests == []


def test_410_disables_the_endpoint_announces_it_and_re_enabling_resumes(
    api: httpx.Client, receiver: Receiver
) -> None:
    receiver.default = Answer(410)
    endpoint = create(api, receiver.url, strict_order=True)
    id = endpoint["id"]
    first = publish(api, "orders/1", {"n": 0})

    view = health(api, id, "disabled")
    assert view["enabled"] is False
    assert "410" in (view["health_reason"] or "")
    announced = operational(api, id, "webhook.endpoint_disabled")
    assert announced["channel"] == f"_tidings/webhooks/{id}"
    assert announced["data"]["endpoint"] == id and "410" in announced["data"]["reason"]
    [attempt] = wait_attempts(api, id, 1)
    assert (attempt["status"], attempt["outcome"]) == (410, "gone")

    more = [publish(api, "orders/1", {"n": n}) for n in (1, 2)]
    time.sleep(0.3)  # a disabled endpoint gets nothing: give a wrong delivery time to show
    assert receiver.ids() == [first]

    receiver.default = Answer(200)
    response = api.patch(f"/webhooks/{id}", json={"enabled": True})
    assert response.status_code == 200, response.text
    assert (response.json()["enabled"], response.json()["health"]) == (True, "healthy")
    got = receiver.wait_for(4)
    # Its cursor stayed put: the first event goes again, then the others, in order.
    assert [r.id for r in got] == [first, first, *more]
    poll(lambda: past(show(api, id), more[-1]), what="the cursor past the last")
    assert show(api, id)["health"] == "healthy"
    for request in got:
        verify(endpoint["secret"], request)


def test_sustained_failure_disables_the_endpoint_after_the_window(
    make_server: Callable[..., RunningServer], receiver: Receiver
) -> None:
    # Six attempts 100 ms apart (±20 %): the 100 ms window has passed by the second or third.
    schedule = ("0", "100ms", "100ms", "100ms", "100ms", "100ms")
    hub = make_server(**{**HOOKS, "webhooks_schedule": schedule}, webhooks_disable_after="100ms")
    receiver.default = Answer(503)
    with httpx.Client(base_url=hub.url, timeout=10) as api:
        endpoint = create(api, receiver.url, strict_order=True)
        id = endpoint["id"]
        first = publish(api, "orders/1", {"n": 0})
        view = health(api, id, "disabled")
        assert view["enabled"] is False and "failing for" in view["health_reason"], view
        announced = operational(api, id, "webhook.endpoint_disabled")
        assert "failing for" in announced["data"]["reason"]
        publish(api, "orders/1", {"n": 1})
        time.sleep(0.2)
        sent = receiver.ids()
        assert set(sent) == {first} and len(sent) < len(schedule), sent  # before the last
        assert failed(api, id) == []  # not failed: it goes again once enabled

        receiver.default = Answer(200)
        assert api.patch(f"/webhooks/{id}", json={"enabled": True}).json()["health"] == "healthy"
        poll(lambda: len(set(receiver.ids())) == 2, what="both events once re-enabled")


# -- 3. SSRF --------------------------------------------------------------------------------------

BLOCKED_HOSTS = [
    "127.0.0.1",
    "2130706433",  # decimal
    "0x7f000001",  # hex
    "0177.0.0.1",  # octal
    "127.1",  # short
    "[::1]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "169.254.169.254",  # cloud metadata
    "10.0.0.1",
    "100.64.0.1",  # CGNAT
    "[fd00::1]",  # ULA
    "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
    "0.0.0.0",
    "localhost",  # a hostname resolving to loopback
]


def test_endpoints_at_blocked_addresses_are_refused_and_nothing_reaches_them(
    make_server: Callable[..., RunningServer], receiver: Receiver
) -> None:
    hub = make_server(webhooks_allow_http=True)  # no allow-list; http so the scheme is no reason
    problems = []
    with httpx.Client(base_url=hub.url, timeout=10) as api:
        for host in BLOCKED_HOSTS:
            url = f"http://{host}:{receiver.port}/hook"
            response = api.post("/webhooks", json={"url": url, "channels": ["orders/**"]})
            body = response.json()
            if response.status_code != 400 or body.get("error") != "blocked_address":
                problems.append(f"{url}: {response.status_code} {response.text}")
        # The same for an edit that moves an endpoint (at a public name) to a blocked address.
        public = create(api, "https://example.com/hook")
        for host in ("127.0.0.1", "0x7f000001", "[::ffff:127.0.0.1]", "localhost"):
            url = f"http://{host}:{receiver.port}/hook"
            response = api.patch(f"/webhooks/{public['id']}", json={"url": url})
            if response.status_code != 400 or response.json().get("error") != "blocked_address":
                problems.append(f"PATCH {url}: {response.status_code} {response.text}")
        listed = api.get("/webhooks").json()["endpoints"]
        assert [e["url"] for e in listed] == ["https://example.com/hook"]
        publish(api, "orders/1", {"n": 1})
        time.sleep(0.2)
    assert not problems, "\n".join(problems)
    assert receiver.requests == []


def test_http_endpoints_are_refused_unless_allowed(
    make_server: Callable[..., RunningServer], receiver: Receiver
) -> None:
    hub = make_server(webhooks_allowed_networks=("127.0.0.1/32",))  # allow_http off (default)
    with httpx.Client(base_url=hub.url, timeout=10) as api:
        response = api.post("/webhooks", json={"url": receiver.url, "channels": ["orders/**"]})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_endpoint"
        assert "https" in response.json()["detail"]
        for url in ("ftp://127.0.0.1/", "file:///etc/passwd", "https://user:pw@example.com/"):
            response = api.post("/webhooks", json={"url": url, "channels": ["orders/**"]})
            assert response.status_code == 400, (url, response.text)
            assert response.json()["error"] == "invalid_endpoint", (url, response.text)
        assert api.get("/webhooks").json()["endpoints"] == []


def test_a_receiver_redirecting_inward_fails_as_a_redirect_and_nothing_follows_it(
    api: httpx.Client, receiver: Receiver
) -> None:
    receiver.default = Answer(302, {"Location": "http://169.254.169.254/latest/meta-data/"})
    event, listed = failed_as_redirects(api, receiver, 302)
    assert all(a["error"] is None for a in listed), listed
    # Every request the receiver got is one of the attempts, at the endpoint's own URL.
    assert [(r.method, r.path, r.id) for r in receiver.requests] == [("POST", "/hook", event)] * 4


# -- 4. replay ------------------------------------------------------------------------------------


def published_and_delivered(
    api: httpx.Client, receiver: Receiver, id: str, count: int
) -> list[str]:
    ids = [publish(api, "orders/1", {"n": n}) for n in range(count)]
    receiver.wait_for(count)
    poll(lambda: past(show(api, id), ids[-1]), what="every event delivered")
    return ids


def replay(api: httpx.Client, id: str, **body: Any) -> httpx.Response:
    return api.post(f"/webhooks/{id}/replay", json=body)


def test_replay_of_a_cursor_range_redelivers_exactly_those_events(
    api: httpx.Client, receiver: Receiver
) -> None:
    endpoint = create(api, receiver.url)
    id = endpoint["id"]
    ids = published_and_delivered(api, receiver, id, 10)
    before = len(receiver.requests)

    dry = replay(api, id, since=ids[2], until=ids[6], dry_run=True)
    assert dry.status_code == 200, dry.text
    assert dry.json() == {"events": 4}
    started = replay(api, id, since=ids[2], until=ids[6])
    assert started.status_code == 202, started.text
    job = started.json()["replay"]
    assert (job["events"], job["endpoint"]) == (4, id)

    again = receiver.wait_for(before + 4)[before:]
    assert [r.id for r in again] == ids[3:7]  # events 4..7, in order
    for request in again:
        verify(endpoint["secret"], request)
    done = poll(lambda: (r := show(api, id)["replays"]) and r[-1]["state"] == "done" and r[-1],
                what="the replay to finish")  # fmt: skip
    assert (done["id"], done["sent"], done["delivered"], done["failed"]) == (job["id"], 4, 4, 0)
    replayed = [a for a in attempts(api, id, limit=1000) if a["trigger"] == "replay"]
    assert [a["event"] for a in replayed] == ids[3:7]
    time.sleep(0.2)
    assert len(receiver.requests) == before + 4  # exactly those, nothing else

    one = replay(api, id, event=ids[0])
    assert one.status_code == 202, one.text
    assert one.json()["replay"]["events"] == 1
    assert receiver.wait_for(before + 5)[-1].id == ids[0]
    assert replay(api, id, event=ids[0], dry_run=True).json() == {"events": 1}


def test_replay_is_paced_and_selects_by_time_and_event_type(
    api: httpx.Client, receiver: Receiver
) -> None:
    endpoint = create(api, receiver.url, types=["order.paid"])
    id = endpoint["id"]
    noise = publish(api, "orders/1", {"n": -1}, type="order.noise")
    paid = [publish(api, "orders/1", {"n": n}, type="order.paid") for n in range(4)]
    receiver.wait_for(4)
    poll(lambda: past(show(api, id), paid[-1]), what="the last event delivered")
    assert sorted(receiver.ids()) == sorted(paid)  # the noise is not one of its types
    assert noise not in receiver.ids()

    times = [e["time"] for e in history(api, "orders/**")]
    everything = {"from": times[0], "dry_run": True}
    assert replay(api, id, **everything).json() == {"events": 4}  # the noise is not selected
    wrong_type = replay(api, id, event=noise)
    assert refusal(wrong_type, 400, noise, "order.noise") is None, wrong_type.text
    window = {"from": times[2], "to": times[4]}  # [from, to): the 2nd and 3rd paid events
    assert replay(api, id, **window, dry_run=True).json() == {"events": 2}
    before = len(receiver.requests)
    started = replay(api, id, **{"from": times[0], "rate": 10})
    assert started.status_code == 202, started.text
    assert started.json()["replay"]["rate"] == 10
    again = receiver.wait_for(before + 4)[before:]
    assert [r.id for r in again] == paid
    gaps = [b.time - a.time for a, b in itertools.pairwise(again)]
    assert min(gaps) >= 0.1 - TIMER_SLACK, gaps  # 10 events/s


def test_replay_of_failed_events_only(api: httpx.Client, receiver: Receiver) -> None:
    def fail_some(request: Any) -> Answer | None:
        return Answer(500) if orjson.loads(request.body)["data"]["n"] in (4, 7) else None

    receiver.respond = fail_some
    endpoint = create(api, receiver.url)
    id = endpoint["id"]
    ids = [publish(api, "orders/1", {"n": n}) for n in range(10)]
    marks = poll(lambda: len(m := failed(api, id)) == 2 and m, what="two failed events")
    assert [m["event"] for m in marks] == [ids[4], ids[7]]
    poll(lambda: past(show(api, id), ids[-1]), what="the cursor past the failed ones")
    receiver.respond = None
    before = len(receiver.requests)

    assert replay(api, id, **{"from": 0, "dry_run": True}).json() == {"events": 10}
    counted = replay(api, id, **{"from": 0, "failed_only": True, "dry_run": True})
    assert counted.json() == {"events": 2}, counted.text
    started = replay(api, id, **{"from": 0, "failed_only": True})
    assert started.status_code == 202, started.text
    again = receiver.wait_for(before + 2)[before:]
    assert [r.id for r in again] == [ids[4], ids[7]]
    poll(lambda: failed(api, id) == [], what="/failed to empty once replayed")
    time.sleep(0.2)
    assert len(receiver.requests) == before + 2


def test_replay_refusals(api: httpx.Client, hub: RunningServer, receiver: Receiver) -> None:
    endpoint = create(api, receiver.url)
    id = endpoint["id"]
    ids = published_and_delivered(api, receiver, id, 2)
    other_channel = publish(api, "users/1", {"n": 1})
    epoch = ids[0].split(":")[0]
    foreign = ("zz" if epoch != "zz" else "yy") + ":1"
    cases: list[tuple[dict[str, Any], int, tuple[str, ...]]] = [
        ({"event": ids[0], "since": ids[0]}, 400, ("event", "since")),
        ({}, 400, ("event", "since")),
        ({"failed_only": True}, 400, ("event",)),
        ({"dry_run": True}, 400, ("event",)),
        ({"since": ids[0], "colour": "red"}, 400, ("'colour'",)),
        ({"since": foreign}, 400, (foreign, "epoch")),
        ({"event": foreign}, 400, (foreign, "epoch")),
        ({"since": "not-a-cursor"}, 400, ("not-a-cursor",)),
        ({"since": 5}, 400, ("since",)),
        ({"since": ids[0], "dry_run": "yes"}, 400, ("dry_run",)),
        ({"since": ids[0], "failed_only": 1}, 400, ("failed_only",)),
        ({"since": ids[0], "rate": 0}, 400, ("rate",)),
        ({"from": "yesterday"}, 400, ("from",)),
        ({"event": f"{epoch}:999999"}, 404, (f"{epoch}:999999",)),
        ({"event": other_channel}, 400, ("users/1",)),
    ]
    problems = []
    for body, status, words in cases:
        problem = refusal(replay(api, id, **body), status, *words)
        if problem:
            problems.append(f"{body}: {problem}")
    text = api.post(f"/webhooks/{id}/replay", content=b"[1]")
    if problem := refusal(text, 400, "object"):
        problems.append(f"[1]: {problem}")
    assert not problems, "\n".join(problems)

    assert api.patch(f"/webhooks/{id}", json={"enabled": False}).status_code == 200
    disabled = replay(api, id, since=ids[0])
    assert disabled.status_code == 409, disabled.text
    assert "disabled" in disabled.json()["detail"]


# -- 5. admin API validation and access -----------------------------------------------------------


def test_bad_endpoint_bodies_are_400_naming_the_field(
    api: httpx.Client, receiver: Receiver
) -> None:
    ok = {"url": receiver.url, "channels": ["orders/**"]}
    cases: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({"channels": ["orders/**"]}, ("url",)),
        ({"url": receiver.url}, ("channels",)),
        ({**ok, "url": 5}, ("url",)),
        ({**ok, "channels": "orders/**"}, ("channels",)),
        ({**ok, "channels": []}, ("channels",)),
        ({**ok, "channels": ["orders/**/x"]}, ("orders/**/x",)),
        ({**ok, "headers": {"webhook-id": "x"}}, ("webhook-id",)),
        ({**ok, "headers": {"Webhook-Signature": "x"}}, ("Webhook-Signature",)),
        ({**ok, "headers": ["x"]}, ("headers",)),
        ({**ok, "concurrency": 0}, ("concurrency",)),
        ({**ok, "concurrency": 1.5}, ("concurrency",)),
        ({**ok, "timeout": "fast"}, ("timeout",)),
        ({**ok, "rate_limit": -1}, ("rate_limit",)),
        ({**ok, "strict_order": "yes"}, ("strict_order",)),
        ({**ok, "types": "paid"}, ("types",)),
        ({**ok, "colour": "red"}, ("'colour'",)),
    ]
    problems = []
    for body, words in cases:
        if problem := refusal(api.post("/webhooks", json=body), 400, *words):
            problems.append(f"POST {body}: {problem}")
    for raw in (b"not json", b"[]"):
        if problem := refusal(api.post("/webhooks", content=raw), 400, "JSON"):
            problems.append(f"POST {raw!r}: {problem}")
    endpoint = create(api, receiver.url)
    edits: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({"concurrency": 0}, ("concurrency",)),
        ({"colour": 1}, ("'colour'",)),
        ({"enabled": "no"}, ("enabled",)),
    ]
    for body, words in edits:
        if problem := refusal(api.patch(f"/webhooks/{endpoint['id']}", json=body), 400, *words):
            problems.append(f"PATCH {body}: {problem}")
    rotations: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({"grace": -1}, ("grace",)),
        ({"secret": 5}, ("secret",)),
        ({"bogus": 1}, ("'bogus'",)),
    ]
    for body, words in rotations:
        if problem := refusal(api.post(f"/webhooks/{endpoint['id']}/rotate", json=body), 400,
                              *words):  # fmt: skip
            problems.append(f"rotate {body}: {problem}")
    assert not problems, "\n".join(problems)
    assert len(api.get("/webhooks").json()["endpoints"]) == 1  # nothing else was created


def test_an_unknown_endpoint_is_404_on_every_route(api: httpx.Client) -> None:
    routes = [
        ("GET", "/webhooks/ep_missing", None),
        ("PATCH", "/webhooks/ep_missing", {"description": "x"}),
        ("DELETE", "/webhooks/ep_missing", None),
        ("POST", "/webhooks/ep_missing/rotate", {}),
        ("GET", "/webhooks/ep_missing/attempts", None),
        ("GET", "/webhooks/ep_missing/failed", None),
        ("POST", "/webhooks/ep_missing/replay", {"since": "abc:1"}),
    ]
    problems = []
    for method, path, body in routes:
        response = api.request(method, path, json=body)
        if response.status_code != 404 or "ep_missing" not in response.json()["detail"]:
            problems.append(f"{method} {path}: {response.status_code} {response.text}")
    assert not problems, "\n".join(problems)


def test_the_secret_is_shown_only_when_made(api: httpx.Client, receiver: Receiver) -> None:
    endpoint = create(api, receiver.url, headers={"X-Team": "ops"})
    id, secret = endpoint["id"], endpoint["secret"]
    rotated = api.post(f"/webhooks/{id}/rotate", json={}).json()["secret"]
    views = [
        api.get("/webhooks"),
        api.get(f"/webhooks/{id}"),
        api.patch(f"/webhooks/{id}", json={"description": "changed"}),
        api.get(f"/webhooks/{id}/attempts"),
        api.delete(f"/webhooks/{id}"),
    ]
    for response in views:
        assert response.status_code == 200, response.text
        assert secret not in response.text and rotated not in response.text
        assert secret.removeprefix("whsec_") not in response.text
        assert '"secret"' not in response.text, response.text
        assert response.headers["cache-control"] == "no-store"
    assert views[1].json()["headers"] == {"X-Team": "ops"}
    assert api.get(f"/webhooks/{id}").status_code == 404  # deleted


def admin_token(admin: bool) -> str:
    grants = {"subscribe": ["**"], "publish": ["**"], "admin": admin}
    claims = {"sub": "tester", "exp": int(time.time()) + 600, "tidings": grants}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def test_with_auth_on_the_api_needs_an_admin_grant(
    make_server: Callable[..., RunningServer], receiver: Receiver
) -> None:
    hub = make_server(auth_jwt_algorithms="HS256", auth_jwt_secret=JWT_SECRET, **HOOKS)
    admin = {"Authorization": f"Bearer {admin_token(True)}"}
    user = {"Authorization": f"Bearer {admin_token(False)}"}
    with httpx.Client(base_url=hub.url, timeout=10) as api:
        made = api.post("/webhooks", json={"url": receiver.url, "channels": ["o/**"]},
                        headers=admin)  # fmt: skip
        assert made.status_code == 201, made.text
        id = made.json()["id"]
        routes = [
            ("GET", "/webhooks", None),
            ("POST", "/webhooks", {"url": receiver.url, "channels": ["o/**"]}),
            ("GET", f"/webhooks/{id}", None),
            ("PATCH", f"/webhooks/{id}", {"description": "x"}),
            ("POST", f"/webhooks/{id}/rotate", {}),
            ("GET", f"/webhooks/{id}/attempts", None),
            ("GET", f"/webhooks/{id}/failed", None),
            ("POST", f"/webhooks/{id}/replay", {"since": "abc:0", "dry_run": True}),
            ("DELETE", f"/webhooks/{id}", None),
        ]
        problems = []
        for method, path, body in routes:
            anonymous = api.request(method, path, json=body)
            if anonymous.status_code != 401 or anonymous.json()["error"] != "unauthorized":
                problems.append(f"no token {method} {path}: {anonymous.status_code}")
            refused_ = api.request(method, path, json=body, headers=user)
            if refused_.status_code != 403 or refused_.json()["error"] != "forbidden":
                problems.append(f"non-admin {method} {path}: {refused_.status_code}")
        assert not problems, "\n".join(problems)
        assert api.get(f"/webhooks/{id}", headers=admin).status_code == 200  # all still there
        assert len(api.get("/webhooks", headers=admin).json()["endpoints"]) == 1


# -- 6. the reserved system channels --------------------------------------------------------------


def test_publishing_to_the_system_channels_over_http_is_refused(api: httpx.Client) -> None:
    for response in (
        api.post("/channels/_tidings/webhooks/ep_x", json={"forged": True}),
        api.post("/channels/_tidings", json=1),
        api.post("/publish", json={"events": [{"channel": "_tidings/webhooks/x", "data": 1}]}),
    ):
        assert response.status_code == 403, response.text
        assert "reserved" in response.json()["detail"]
    assert history(api, "_tidings/**") == []


def test_operational_events_reach_system_subscriptions_only(
    hub: RunningServer, api: httpx.Client, receiver: Receiver
) -> None:
    receiver.default = Answer(410)
    with SSEClient(hub.url, "**") as everything, SSEClient(hub.url, "_tidings/**") as system:
        everything.subscribed()
        system.subscribed()
        endpoint = create(api, receiver.url)
        id = endpoint["id"]
        event = publish(api, "orders/1", {"n": 1})
        [notice] = system.events(1)
        assert notice.event == "webhook.endpoint_disabled"
        assert envelope(notice)["channel"] == f"_tidings/webhooks/{id}"
        marker = publish(api, "marker", 1)  # published after the notice: seen after it
        seen = everything.events(2)
        assert [e.id for e in seen] == [event, marker]
    assert all(not e["channel"].startswith("_tidings") for e in history(api, "**"))
    assert [e["type"] for e in history(api, "_tidings/**")] == ["webhook.endpoint_disabled"]


def test_a_grant_of_every_channel_does_not_reach_the_system_channels(
    make_server: Callable[..., RunningServer], receiver: Receiver
) -> None:
    """``**`` matches no ``_tidings/...`` channel, so a grant of ``**`` covers none either:
    operational events carry endpoint URLs, which only admins may read through the API."""
    hub = make_server(auth_jwt_algorithms="HS256", auth_jwt_secret=JWT_SECRET, **HOOKS)
    admin = {"Authorization": f"Bearer {admin_token(True)}"}
    everything = {"Authorization": f"Bearer {admin_token(False)}"}  # subscribe ["**"]
    claims = {
        "sub": "ops",
        "exp": int(time.time()) + 600,
        "tidings": {"subscribe": ["_tidings/**"], "publish": [], "admin": False},
    }
    system = {"Authorization": "Bearer " + jwt.encode(claims, JWT_SECRET, algorithm="HS256")}
    receiver.default = Answer(410)
    with httpx.Client(base_url=hub.url, timeout=10) as api:
        made = api.post("/webhooks", json={"url": receiver.url, "channels": ["o/**"]},
                        headers=admin)  # fmt: skip
        assert made.status_code == 201, made.text
        assert api.post("/channels/o/1", json=1, headers=everything).status_code == 201
        params = {"channel": "_tidings/**"}
        poll(lambda: api.get("/history", params=params, headers=system).json()["events"],
             what="the operational event")  # fmt: skip
        response = api.get("/history", params=params, headers=everything)
        assert response.status_code == 403, (
            f"a non-admin token granted '**' read the system channels: {response.text[:300]}"
        )


# -- 7. the CLI -----------------------------------------------------------------------------------


def cli(hub: RunningServer, *args: str, code: int = 0) -> list[Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "webhooks", *args, "--url", hub.url],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
    if code:
        return [done.stderr.decode()]
    return [orjson.loads(line) for line in done.stdout.splitlines()]


def test_the_cli_manages_an_endpoint_end_to_end(
    hub: RunningServer, api: httpx.Client, receiver: Receiver
) -> None:
    [made] = cli(hub, "create", receiver.url, "--channel", "orders/**", "--description", "cli",
                 "--header", "X-Team: ops", "--concurrency", "2")  # fmt: skip
    id, secret = made["id"], made["secret"]
    assert (made["url"], made["channels"], made["headers"]) == (
        receiver.url,
        ["orders/**"],
        {"X-Team": "ops"},
    )
    assert (made["description"], made["concurrency"], made["enabled"]) == ("cli", 2, True)

    listed = cli(hub, "list")
    assert [e["id"] for e in listed] == [id] and "secret" not in listed[0]
    [shown] = cli(hub, "show", id)
    assert shown["url"] == receiver.url and shown["replays"] == [] and "secret" not in shown
    [updated] = cli(hub, "update", id, "--description", "changed", "--strict-order")
    assert (updated["description"], updated["strict_order"]) == ("changed", True)

    ids = [publish(api, "orders/1", {"n": n}) for n in range(3)]
    got = receiver.wait_for(3)
    assert [r.id for r in got] == ids  # strict order
    for request in got:
        verify(secret, request)
        assert request.headers["x-team"] == "ops"
    poll(lambda: past(show(api, id), ids[-1]), what="the events delivered")

    [disabled] = cli(hub, "disable", id)
    assert (disabled["enabled"], disabled["health"]) == (False, "disabled")
    [enabled] = cli(hub, "enable", id)
    assert (enabled["enabled"], enabled["health"]) == (True, "healthy")
    [rotated] = cli(hub, "rotate", id, "--grace", "0")
    assert rotated["secret"] != secret and len(rotated["secrets"]) == 1
    ids.append(publish(api, "orders/1", {"n": 3}))
    last = receiver.wait_for(4)[3]
    verify(rotated["secret"], last)
    assert refused(secret, last)
    poll(lambda: past(show(api, id), ids[-1]), what="the last event delivered")

    listed_attempts = cli(hub, "attempts", id)
    assert [a["event"] for a in listed_attempts] == ids[::-1]  # newest first
    assert {a["status"] for a in listed_attempts} == {200}
    assert [a["event"] for a in cli(hub, "attempts", id, "--event", ids[1])] == [ids[1]]
    assert cli(hub, "failed", id) == []
    assert cli(hub, "replay", id, "--since", ids[0], "--dry-run") == [{"events": 3}]
    assert len(receiver.requests) == 4
    [job] = cli(hub, "replay", id, "--event", ids[1])
    assert job["events"] == 1 and job["id"].startswith("rp_")
    assert receiver.wait_for(5)[4].id == ids[1]

    [deleted] = cli(hub, "delete", id)
    assert deleted["id"] == id
    [error] = cli(hub, "show", id, code=1)
    assert id in error
    assert cli(hub, "list") == []
    [blocked] = cli(hub, "create", "http://10.0.0.1/", "--channel", "x", code=1)
    assert "10.0.0.1" in blocked
