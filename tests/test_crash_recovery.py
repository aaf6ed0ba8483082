"""A real ``tidings serve`` process: kill -9 after acknowledged publishes, and SIGTERM shutdown.

The promise under test: a publish is acknowledged only once the event is in history, so every
201 survives the process being killed at any moment.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving import Serve
from streaming import SSEClient
from tidings.events import Cursor


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for p in started:
        p.kill()


def read_history(url: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    since: str | None = None
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(1000):
            params: dict[str, Any] = {"channel": "**", "limit": 1000}
            if since is not None:
                params["since"] = since
            response = client.get("/history", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert page["recovered"] is True
            events.extend(page["events"])
            since = page["cursor"]
            if not page["more"]:
                return events
    raise AssertionError("history did not end")


def test_every_acknowledged_publish_survives_kill_9(tmp_path: Path, processes: list[Serve]) -> None:
    db = tmp_path / "crash.db"
    server = Serve(db, tmp_path)
    processes.append(server)
    target = 500
    acknowledged: dict[str, tuple[str, dict[str, int]]] = {}  # cursor -> (channel, data)
    per_worker: dict[int, list[str]] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def worker(w: int) -> None:
        mine = per_worker.setdefault(w, [])
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for n in range(100):
                    data = {"w": w, "n": n}
                    channel = f"crash/{w % 4}/{w}"
                    response = client.post(f"/channels/{channel}", json=data)
                    if response.status_code != 201:
                        return
                    cursor = response.json()["id"]
                    mine.append(cursor)
                    with lock:
                        acknowledged[cursor] = (channel, data)
                        if len(acknowledged) >= target:
                            enough.set()
        except httpx.TransportError:
            return  # the server was killed under us: this publish was never acknowledged

    # More publishes than the target are under way when the kill lands.
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(16)]
    for t in threads:
        t.start()
    assert enough.wait(60), f"only {len(acknowledged)} publishes acknowledged"
    os.kill(server.proc.pid, signal.SIGKILL)
    with lock:
        acked = dict(acknowledged)  # anything acknowledged after this point is not checked
    server.proc.wait(10)
    for t in threads:
        t.join(15)
    assert server.proc.returncode == -signal.SIGKILL
    assert len(acked) >= target

    restarted = Serve(db, tmp_path)
    processes.append(restarted)
    events = read_history(restarted.url)
    by_id = {e["id"]: e for e in events}
    missing = sorted(set(acked) - set(by_id), key=lambda c: Cursor.parse(c).seq)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
    for cursor, (channel, data) in acked.items():
        assert by_id[cursor]["channel"] == channel
        assert by_id[cursor]["data"] == data
    seqs = [Cursor.parse(e["id"]).seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len({Cursor.parse(e["id"]).epoch for e in events}) == 1
    # Each worker published sequentially: its events are in history in its own order.
    position = {e["id"]: i for i, e in enumerate(events)}
    for cursors in per_worker.values():
        acked_mine = [c for c in cursors if c in acked]
        assert [position[c] for c in acked_mine] == sorted(position[c] for c in acked_mine)
    # The restarted server continues the same log: same epoch, next sequence number.
    with httpx.Client(base_url=restarted.url, timeout=10) as client:
        response = client.post("/channels/after/restart", json=1)
    assert response.status_code == 201
    after = Cursor.parse(response.json()["id"])
    assert after.epoch == Cursor.parse(events[-1]["id"]).epoch
    assert after.seq == seqs[-1] + 1


def test_sigterm_ends_open_streams_cleanly_and_exits_0(
    tmp_path: Path, processes: list[Serve]
) -> None:
    server = Serve(tmp_path / "term.db", tmp_path)
    processes.append(server)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        published = client.post("/channels/t", json=1).json()["id"]
    held: list[httpx.Response] = []

    def long_poll() -> None:
        params = {"channel": "t", "since": published, "wait": 30}
        held.append(httpx.get(f"{server.url}/poll", params=params, timeout=20))

    poller = threading.Thread(target=long_poll)
    with SSEClient(server.url, "t", headers={"Last-Event-ID": f"{published.split(':')[0]}:0"}) as s:
        s.subscribed()
        assert s.events(1)[0].id == published
        poller.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/healthz", timeout=5).json()["subscribers"] < 2:
            assert time.monotonic() < deadline, "the long poll was never held"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        assert s.rest(timeout=15) == []  # the stream ends with its last chunk, no error
        assert s.ended
        poller.join(15)
    # The held long poll was answered at once (well before its 30 s wait), with no events.
    assert len(held) == 1 and held[0].status_code == 200
    assert held[0].json()["events"] == []
    assert held[0].json()["cursor"] == published
    assert server.proc.wait(15) == 0, server.log()
    # The history written before the shutdown is intact on the next start.
    again = Serve(tmp_path / "term.db", tmp_path)
    processes.append(again)
    assert [e["id"] for e in read_history(again.url)] == [published]


# -- restarts in-process ---------------------------------------------------------------------


def _publish(url: str, channel: str, data: Any, **headers: str) -> httpx.Response:
    response = httpx.post(f"{url}/channels/{channel}", json=data, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    return response


def test_restart_keeps_epoch_cursors_and_idempotency_keys(make_server: Any) -> None:
    first = make_server()
    original = _publish(first.url, "idem", 1, **{"Idempotency-Key": "k"}).json()
    cursors = [_publish(first.url, "idem", i).json()["id"] for i in range(3)]
    first.stop()

    second = make_server()
    assert second.hub.log.epoch == first.hub.log.epoch
    replay = _publish(second.url, "idem", 2, **{"Idempotency-Key": "k"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == original
    page = httpx.get(
        f"{second.url}/poll", params={"channel": "idem", "since": original["id"]}, timeout=10
    ).json()
    assert page["recovered"] is True
    assert [e["id"] for e in page["events"]] == cursors


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_a_new_log_is_a_new_epoch_and_old_cursors_report_continuity_lost(
    make_server: Any, tmp_path: Path, backend: str
) -> None:
    first = make_server(log_backend=backend)
    old = _publish(first.url, "ep", 1).json()["id"]
    first.stop()
    if backend == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"tidings.db{suffix}").unlink(missing_ok=True)

    second = make_server(log_backend=backend)
    assert second.hub.log.epoch != first.hub.log.epoch
    head = _publish(second.url, "ep", 2).json()["id"]
    page = httpx.get(f"{second.url}/poll", params={"channel": "ep", "since": old}, timeout=10)
    body = page.json()
    assert body["recovered"] is False
    assert "epoch" in body["reason"]
    assert body["cursor"] == head
    with SSEClient(second.url, "ep", headers={"Last-Event-ID": old}) as stream:
        state = stream.subscribed()
        assert state["recovered"] is False
        assert state["cursor"] == head
