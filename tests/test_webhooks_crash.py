"""Issue 6 acceptance: ``kill -9`` of ``tidings serve`` during a burst of webhook deliveries.

A real server process delivers a burst to a slow receiver; it is killed mid-delivery and
restarted on the same SQLite file. After the restart every event reaches the receiver at least
once, a duplicate carries the same ``webhook-id`` and the same bytes, and every request
verifies with the Standard Webhooks reference verifier.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks

from serving import Serve
from tidings.events import Cursor
from webhook_receiver import Answer, Received, Receiver, poll

BURST = 200
ENV = {
    "TIDINGS_WEBHOOKS_ALLOW_HTTP": "true",
    "TIDINGS_WEBHOOKS_ALLOWED_NETWORKS": "127.0.0.1/32",
}


def serve(db: Path, tmp_path: Path, schedule: str = "0,50ms,50ms,50ms,50ms") -> Serve:
    """``tidings serve`` delivering webhooks to 127.0.0.1 over http, retrying on ``schedule``."""
    env = ENV | {"TIDINGS_WEBHOOKS_SCHEDULE": schedule}
    return Serve(db, tmp_path, "--grpc-port", "0", env=env)


def past(cursor: str | None, event: str) -> bool:
    return cursor is not None and Cursor.parse(cursor).seq >= Cursor.parse(event).seq


@pytest.fixture
def processes() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for p in started:
        p.kill()


def test_kill_9_mid_delivery_loses_nothing_and_duplicates_keep_their_id(
    tmp_path: Path, processes: list[Serve]
) -> None:
    db = tmp_path / "webhooks.db"
    with Receiver(delay=0.05) as receiver:
        server = serve(db, tmp_path)
        processes.append(server)
        with httpx.Client(base_url=server.url, timeout=10) as api:
            made = api.post("/webhooks", json={"url": receiver.url, "channels": ["burst/**"],
                                               "concurrency": 4})  # fmt: skip
            assert made.status_code == 201, made.text
            id, secret = made.json()["id"], made.json()["secret"]
            batch = [{"channel": f"burst/{n % 8}", "data": {"n": n}} for n in range(BURST)]
            published = api.post("/publish", json={"events": batch})
            assert published.status_code == 201, published.text
            ids = [e["id"] for e in published.json()["events"]]

        receiver.wait_for(BURST // 5)
        server.kill()  # SIGKILL while requests are in flight at the slow receiver
        at_kill = len(receiver.requests)
        assert server.proc.returncode == -signal.SIGKILL
        assert at_kill < BURST, "every event was received before the kill: nothing was tested"

        restarted = serve(db, tmp_path)
        processes.append(restarted)

        def everything() -> bool:
            return set(receiver.ids()) >= set(ids)

        poll(everything, 30, lambda: f"{len(set(receiver.ids()))} of {BURST} events received; "
             f"server log: {restarted.log()}")  # fmt: skip
        with httpx.Client(base_url=restarted.url, timeout=10) as api:
            view = api.get(f"/webhooks/{id}").json()
            assert (view["health"], view["enabled"]) == ("healthy", True)
            poll(lambda: past(api.get(f"/webhooks/{id}").json()["cursor"], ids[-1]), 10,
                 "the restarted server's cursor to reach the last event")  # fmt: skip
        requests = receiver.requests

    assert set(r.id for r in requests) == set(ids)  # every event, and nothing else
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for request in requests:
        bodies[request.id].add(request.body)
    different = {k: v for k, v in bodies.items() if len(v) > 1}
    assert not different, f"duplicates with other bytes under the same webhook-id: {different}"
    duplicates = len(requests) - len(bodies)
    assert duplicates > 0, "the kill landed between deliveries: no event was in flight"
    verifier = standardwebhooks.Webhook(secret)
    for request in requests:
        payload: Any = verifier.verify(request.body, request.headers)
        assert payload["id"] == request.id


def test_retries_waiting_at_a_kill_9_go_out_after_the_restart(
    tmp_path: Path, processes: list[Serve]
) -> None:
    db = tmp_path / "retries.db"
    seen: set[str] = set()
    lock = threading.Lock()

    def first_attempt_fails(request: Received) -> Answer:
        with lock:
            again = request.id in seen
            seen.add(request.id)
        return Answer(200) if again else Answer(500)

    with Receiver() as receiver:
        receiver.respond = first_attempt_fails
        server = serve(db, tmp_path, schedule="0,1s,1s")
        processes.append(server)
        with httpx.Client(base_url=server.url, timeout=10) as api:
            made = api.post("/webhooks", json={"url": receiver.url, "channels": ["r/**"]})
            assert made.status_code == 201, made.text
            id, secret = made.json()["id"], made.json()["secret"]
            batch = [{"channel": "r/1", "data": {"n": n}} for n in range(20)]
            ids = [e["id"] for e in api.post("/publish", json={"events": batch}).json()["events"]]
            receiver.wait_for(20)
            # Every event failed once and waits for its retry; the cursor has moved past them.
            poll(lambda: past(api.get(f"/webhooks/{id}").json()["cursor"], ids[-1]), 10,
                 "the cursor past the waiting events")  # fmt: skip
            time.sleep(0.2)  # the cursor is written behind
        server.kill()
        assert all(n == 1 for n in Counter(receiver.ids()).values())  # no retry went yet

        restarted = serve(db, tmp_path, schedule="0,1s,1s")
        processes.append(restarted)
        poll(lambda: all(n >= 2 for n in Counter(receiver.ids()).values()), 15,
             lambda: f"every retry delivered: {Counter(receiver.ids())}")  # fmt: skip
        with httpx.Client(base_url=restarted.url, timeout=10) as api:

            def logged() -> set[tuple[str, int, int]]:
                listed = api.get(f"/webhooks/{id}/attempts", params={"limit": 1000}).json()
                return {(a["event"], a["number"], a["status"]) for a in listed["attempts"]}

            # The stored attempt numbers carried over the kill: each retry is attempt 1.
            poll(lambda: {(i, 1, 200) for i in ids} <= logged(), 10,
                 lambda: f"attempt 1 of every event logged: {sorted(logged())}")  # fmt: skip
            assert api.get(f"/webhooks/{id}/failed").json()["failed"] == []
        requests = receiver.requests

    assert Counter(r.id for r in requests) == {i: 2 for i in ids}
    for request in requests:
        standardwebhooks.Webhook(secret).verify(request.body, request.headers)
