"""The reconnect schedule: exponential backoff with jitter, capped, reset after a success.

Pure: it computes delays and never sleeps, so tests check the schedule by plain calls.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays ``initial * factor**n`` capped at ``cap``, each scaled by a random factor.

    "Equal jitter": a delay ``d`` becomes a value in ``[d * (1 - jitter), d]``, so clients that
    lost the same server do not all come back in the same instant, yet none retries at once.
    """

    def __init__(
        self,
        initial: float = 0.1,
        factor: float = 2.0,
        cap: float = 10.0,
        jitter: float = 0.5,
        random: Callable[[], float] = random.random,
    ) -> None:
        if not (initial > 0 and factor >= 1 and cap >= initial and 0 <= jitter <= 1):
            raise ValueError("backoff needs initial > 0, factor >= 1, cap >= initial, jitter 0-1")
        self.initial = initial
        self.factor = factor
        self.cap = cap
        self.jitter = jitter
        self._random = random
        self.attempt = 0

    def next(self) -> float:
        """The delay before the next attempt, in seconds; each call backs off further."""
        # min() before the power would overflow after ~1000 attempts.
        delay = self.cap
        if self.attempt < 64:
            delay = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return delay * (1 - self.jitter * self._random())

    def reset(self) -> None:
        """Start over from ``initial``: call after a connection succeeded."""
        self.attempt = 0
