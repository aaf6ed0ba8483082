"""Webhook retry schedule, response outcomes and the endpoint health table, on a fake clock."""

from __future__ import annotations

import email.utils

import pytest

from tidings.webhooks.policy import (
    DEFAULT_SCHEDULE,
    MAX_RETRY_AFTER,
    Health,
    HealthState,
    Outcome,
    Schedule,
    Verdict,
    judge,
    parse_retry_after,
)


def middle() -> float:
    return 0.5  # no jitter


def test_the_default_schedule_is_the_industrys() -> None:
    assert DEFAULT_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    schedule = Schedule()
    failure = judge(500)
    delays = [schedule.next_delay(n, failure, middle) for n in range(8)]
    assert delays == [5, 300, 1800, 7200, 18000, 36000, 36000, None]


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.75, 0.999])
def test_jitter_stays_within_twenty_percent(draw: float) -> None:
    delay = Schedule().next_delay(1, judge(500), lambda: draw)
    assert delay is not None and 240 <= delay <= 360


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_delivers(status: int) -> None:
    assert judge(status).verdict is Verdict.DELIVERED


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_failures(status: int) -> None:
    outcome = judge(status)
    assert outcome.verdict is Verdict.RETRY and "redirect" in outcome.reason


def test_410_gone_disables() -> None:
    outcome = judge(410)
    assert outcome.verdict is Verdict.GONE
    state = HealthState().after(outcome, now=10, disable_after=3600)
    assert state.health is Health.DISABLED and "410" in (state.reason or "")


def test_500_retries_on_schedule_and_timeouts_back_off_longer() -> None:
    schedule = Schedule((0, 1, 10, 100))
    assert schedule.next_delay(0, judge(500), middle) == 1
    slow = judge(None, "timeout")
    assert slow.verdict is Verdict.RETRY and slow.slow
    assert schedule.next_delay(0, slow, middle) == 10  # at least the step after
    refused = judge(None, "connection refused")
    assert refused.verdict is Verdict.RETRY and not refused.slow


def test_429_with_retry_after_waits_as_asked_within_bounds() -> None:
    schedule = Schedule((0, 1, 10, 100))
    outcome = judge(429, retry_after="50")
    assert outcome.slow and outcome.retry_after == 50
    assert schedule.next_delay(0, outcome, middle) == 50
    # Never sooner than the schedule, never further than the cap.
    assert schedule.next_delay(1, judge(503, retry_after="1"), middle) == 10
    huge = judge(503, retry_after=str(10**9))
    assert schedule.next_delay(0, huge, middle) == MAX_RETRY_AFTER


def test_retry_after_as_an_http_date() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 120, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(120)
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_after_the_last_attempt_the_event_fails() -> None:
    schedule = Schedule((0, 1))
    assert schedule.next_delay(1, judge(500), middle) is None
    assert schedule.attempts == 2


def test_health_fails_then_disables_after_the_window_and_recovers_on_success() -> None:
    state = HealthState()
    state = state.after(judge(500), now=100, disable_after=60)
    assert state.health is Health.FAILING and state.failing_since == 100
    state = state.after(judge(None, "timeout"), now=130, disable_after=60)
    assert state.health is Health.FAILING and state.failing_since == 100
    recovered = state.after(judge(200), now=140, disable_after=60)
    assert recovered == HealthState()
    state = state.after(judge(502), now=161, disable_after=60)
    assert state.health is Health.DISABLED and "failing for 61 s" in (state.reason or "")
    # Disabled stays disabled, even on a success, until an operator enables it.
    assert state.after(judge(200), now=200, disable_after=60) is state
    assert state.enabled().health is Health.HEALTHY


def test_schedules_must_be_sane() -> None:
    for bad in ((), (0, -1), (0, float("inf"))):
        with pytest.raises(ValueError):
            Schedule(bad)
    assert Outcome(Verdict.RETRY, "x").retry_after is None
