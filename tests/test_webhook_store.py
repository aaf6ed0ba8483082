"""The webhook store: endpoints, retries, failed marks and the attempt log, on SQLite."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tidings.webhooks.delivery import Attempt, Endpoint, Retry, Secret
from tidings.webhooks.policy import Health, HealthState, judge
from tidings.webhooks.store import Failed, WebhookStore


@pytest.fixture(params=["file", "memory"])
async def store(request: Any, tmp_path: Any) -> AsyncIterator[WebhookStore]:
    path = os.path.join(str(tmp_path), "t.db") if request.param == "file" else ":memory:"
    opened = WebhookStore(path)
    await opened.open()
    yield opened
    await opened.close()


def endpoint(id: str = "ep_1", **kwargs: Any) -> Endpoint:
    return Endpoint(
        id=id,
        url="https://example.com/hook",
        channels=("orders/**", "users/*"),
        secrets=(Secret("whsec_a", 1.0), Secret("whsec_b", 0.5, expires=99.0)),
        **kwargs,
    )


def attempt(seq: int, number: int = 0, status: int | None = 200, when: float = 10.0) -> Attempt:
    outcome = judge(status, None if status else "timeout")
    return Attempt("ep_1", f"e:{seq}", seq, number, when, 0.25, status,
                   None if status else "timeout", b"ok", outcome)  # fmt: skip


async def test_an_endpoint_comes_back_as_it_was_stored(store: WebhookStore) -> None:
    stored = endpoint(
        types=("paid",),
        headers=(("x-team", "billing"),),
        description="billing",
        rate_limit=5.0,
        concurrency=2,
        strict_order=True,
        timeout=3.0,
        health=HealthState(Health.FAILING, 12.5, "500"),
        created=1.0,
        updated=2.0,
    )
    await store.put(stored)
    await store.put(endpoint("ep_2"))
    assert sorted(await store.endpoints(), key=lambda e: e.id) == [stored, endpoint("ep_2")]
    await store.put(endpoint(description="edited"))  # a put replaces
    [first, _] = sorted(await store.endpoints(), key=lambda e: e.id)
    assert first.description == "edited"


async def test_retries_and_failed_marks(store: WebhookStore) -> None:
    await store.set_retry("ep_1", Retry(5, 1, 100.0))
    await store.set_retry("ep_1", Retry(3, 2, 50.0))
    await store.set_retry("ep_1", Retry(5, 2, 200.0))  # the next attempt replaces the row
    await store.set_retry("ep_2", Retry(5, 1, 100.0))
    assert await store.retries("ep_1") == [Retry(3, 2, 50.0), Retry(5, 2, 200.0)]
    await store.settle("ep_1", 3, None)  # delivered
    await store.settle("ep_1", 5, Failed(5, 300.0, "503"))  # failed for good
    assert await store.retries("ep_1") == []
    assert await store.retries("ep_2") == [Retry(5, 1, 100.0)]
    assert await store.failed("ep_1", 0, 10, 10) == [Failed(5, 300.0, "503")]
    assert await store.failed("ep_1", 5, 10, 10) == []  # (after, until]
    await store.settle("ep_1", 5, None)  # a replay delivered it
    assert await store.failed("ep_1", 0, 10, 10) == []


async def test_the_attempt_log_pages_newest_first_and_trims_by_age(store: WebhookStore) -> None:
    for seq in range(1, 6):
        await store.record(attempt(seq, when=float(seq)))
    await store.record(attempt(2, number=1, status=None, when=6.0))
    newest = await store.attempts("ep_1", None, None, 4)
    assert [(a.seq, a.number) for a in newest] == [(2, 1), (5, 0), (4, 0), (3, 0)]
    assert newest[0].error == "timeout" and newest[0].outcome == "retry"
    older = await store.attempts("ep_1", None, newest[-1].id, 4)
    assert [a.seq for a in older] == [2, 1]
    assert [a.number for a in await store.attempts("ep_1", 2, None, 10)] == [1, 0]
    assert await store.trim(before=3.0) == 2
    assert [a.seq for a in await store.attempts("ep_1", None, None, 10)] == [2, 5, 4, 3]


async def test_recording_waits_for_the_flush_when_far_behind(store: WebhookStore) -> None:
    stopping = asyncio.Event()
    flusher = asyncio.create_task(store.run(stopping))
    await asyncio.gather(*(store.record(attempt(i)) for i in range(1, 5001)))
    stopping.set()
    await flusher
    assert len(await store.attempts("ep_1", None, None, 1000)) == 1000


async def test_delete_removes_everything_kept_about_an_endpoint(store: WebhookStore) -> None:
    await store.put(endpoint())
    await store.set_retry("ep_1", Retry(1, 1, 1.0))
    await store.settle("ep_1", 2, Failed(2, 1.0, "x"))
    await store.record(attempt(1))
    await store.delete("ep_1")
    assert await store.endpoints() == []
    assert await store.retries("ep_1") == []
    assert await store.failed("ep_1", 0, 10, 10) == []
    assert await store.attempts("ep_1", None, None, 10) == []


async def test_the_file_keeps_it_all_across_a_reopen(tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "t.db")
    first = WebhookStore(path)
    await first.open()
    await first.put(endpoint())
    await first.set_retry("ep_1", Retry(4, 3, 9.0))
    await first.record(attempt(4))
    await first.close()  # flushes the attempt log
    second = WebhookStore(path)
    await second.open()
    try:
        assert await second.endpoints() == [endpoint()]
        assert await second.retries("ep_1") == [Retry(4, 3, 9.0)]
        assert [a.seq for a in await second.attempts("ep_1", None, None, 10)] == [4]
    finally:
        await second.close()
