"""What happens after a webhook attempt: the retry schedule, the outcome of a response, and the
endpoint health state table (docs/webhooks.md). Pure: no clock, no I/O, no randomness of its own.

Rules:
- An attempt succeeds on any 2xx, and only then. 3xx is a failure (redirects are never followed:
  a receiver cannot move where events go). ``410 Gone`` disables the endpoint. ``429`` and
  timeouts back off longer than other failures. A ``Retry-After`` is honoured within bounds.
- The schedule is the industry's (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h) with
  ±20 % jitter; after its last attempt the event is ``failed`` for that endpoint (kept in
  history, replayable).
- Health: ``healthy`` → ``failing`` on a failed attempt → ``disabled`` when it has failed with
  no success for ``disable_after``, or on 410; ``failing`` → ``healthy`` on any success;
  ``disabled`` → ``healthy`` only when an operator enables it again.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
JITTER = 0.2
MAX_RETRY_AFTER = 86400.0  # a Retry-After further out than this is capped
SLOW_FACTOR = 2.0  # 429 and timeouts wait this much longer than the schedule says


class Health(StrEnum):
    HEALTHY = "healthy"
    FAILING = "failing"
    DISABLED = "disabled"


class Verdict(StrEnum):
    DELIVERED = "delivered"  # 2xx: the cursor may move past the event
    RETRY = "retry"  # try again after ``delay``, or fail the event if no attempt is left
    GONE = "gone"  # 410: the receiver asks us to stop; the endpoint is disabled


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    reason: str  # for the attempt log and for humans
    slow: bool = False  # back off longer (429, timeout)
    retry_after: float | None = None  # seconds the receiver asked for


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (RFC 9110 §10.2.3: seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def judge(
    status: int | None, error: str | None = None, retry_after: str | None = None, now: float = 0.0
) -> Outcome:
    """The outcome of one attempt: an HTTP ``status``, or a transport ``error`` (``timeout``
    for a timeout, any other text for a refused or broken connection)."""
    if status is None:
        reason = error or "no response"
        return Outcome(Verdict.RETRY, reason, slow=(error == "timeout"))
    if 200 <= status < 300:
        return Outcome(Verdict.DELIVERED, f"{status}")
    if status == 410:
        return Outcome(Verdict.GONE, "410 Gone: the receiver asked to stop")
    after = parse_retry_after(retry_after, now)
    if 300 <= status < 400:
        return Outcome(Verdict.RETRY, f"{status} redirect (redirects are not followed)")
    if status == 429:
        return Outcome(Verdict.RETRY, "429 Too Many Requests", slow=True, retry_after=after)
    return Outcome(Verdict.RETRY, f"{status}", retry_after=after)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When attempt ``n`` (0-based) of one event is due, counted from its previous attempt."""

    delays: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if not self.delays or any(not math.isfinite(d) or d < 0 for d in self.delays):
            raise ValueError("a retry schedule is one or more delays of 0 or more seconds")

    @property
    def attempts(self) -> int:
        return len(self.delays)

    def next_delay(
        self, attempt: int, outcome: Outcome, random: Callable[[], float]
    ) -> float | None:
        """Seconds until attempt ``attempt + 1`` after ``outcome`` of attempt ``attempt``, or
        None when none is left. ``random`` gives floats in [0, 1) (jitter)."""
        following = attempt + 1
        if following >= len(self.delays):
            return None
        delay = self.delays[following]
        delay *= 1 + self.jitter * (2 * random() - 1)
        if outcome.slow:
            delay = max(delay * SLOW_FACTOR, self.delays[min(following + 1, len(self.delays) - 1)])
        if outcome.retry_after is not None:
            # Honoured when it asks for longer, within bounds; never sooner than the schedule.
            delay = max(delay, min(outcome.retry_after, MAX_RETRY_AFTER))
        return delay


@dataclass(frozen=True, slots=True)
class HealthState:
    """An endpoint's health and since when it has been failing (None unless ``failing``)."""

    health: Health = Health.HEALTHY
    failing_since: float | None = None
    reason: str | None = None

    def after(self, outcome: Outcome, now: float, disable_after: float) -> HealthState:
        """The state after an attempt with ``outcome`` at ``now`` (the table in the module doc)."""
        if self.health is Health.DISABLED:
            return self
        if outcome.verdict is Verdict.DELIVERED:
            return HealthState()
        if outcome.verdict is Verdict.GONE:
            return HealthState(Health.DISABLED, None, outcome.reason)
        since = self.failing_since if self.failing_since is not None else now
        if now - since >= disable_after:
            why = f"failing for {now - since:.0f} s with no success (last: {outcome.reason})"
            return HealthState(Health.DISABLED, None, why)
        return HealthState(Health.FAILING, since, outcome.reason)

    def enabled(self) -> HealthState:
        """An operator enabled the endpoint again."""
        return HealthState()


def parse_schedule(values: Sequence[float]) -> Schedule:
    return Schedule(tuple(float(v) for v in values))
