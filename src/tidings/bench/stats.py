"""The benchmark's arithmetic: percentiles, latency summaries, the per-subscriber tally of
sequence numbers (losses and duplicates) and the byte meter.

Pure: no sockets, no clocks. The load generator feeds these as it reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# A latency summary keeps this many quantiles (0 %, 1 %, ... 100 %) for the chart's CDF.
CDF_POINTS = 101


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of already sorted values (NaN when empty).

    Nearest rank: the smallest value with at least ``p`` % of the values at or below it, so
    ``p = 100`` is the maximum and every result is a value that was measured.
    """
    if not sorted_values:
        return math.nan
    if p <= 0:
        return float(sorted_values[0])
    rank = math.ceil(p / 100 * len(sorted_values))
    return float(sorted_values[min(len(sorted_values), max(1, rank)) - 1])


def latency_summary(samples_ns: Sequence[int]) -> dict[str, object]:
    """p50/p90/p99/max in milliseconds, the sample count and a CDF (quantiles 0-100 %)."""
    values = sorted(samples_ns)

    def ms(p: float) -> float | None:
        v = percentile(values, p)
        return None if math.isnan(v) else round(v / 1e6, 3)

    return {
        "p50_ms": ms(50),
        "p90_ms": ms(90),
        "p99_ms": ms(99),
        "max_ms": ms(100),
        "samples": len(values),
        "cdf_ms": [ms(i * 100 / (CDF_POINTS - 1)) for i in range(CDF_POINTS)] if values else [],
    }


class Tally:
    """Which of the events numbered ``0 .. expected-1`` one subscriber received, and how often.

    ``missing`` are losses; ``duplicates`` counts receipts beyond the first of a number;
    ``unexpected`` counts numbers outside the range (an event from another run).
    """

    __slots__ = ("_seen", "duplicates", "expected", "received", "unexpected")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self._seen = bytearray(expected)
        self.received = 0  # distinct numbers seen
        self.duplicates = 0
        self.unexpected = 0

    def add(self, n: int) -> None:
        if not 0 <= n < self.expected:
            self.unexpected += 1
        elif self._seen[n]:
            self.duplicates += 1
        else:
            self._seen[n] = 1
            self.received += 1

    @property
    def missing(self) -> int:
        return self.expected - self.received

    @property
    def complete(self) -> bool:
        return self.received == self.expected


@dataclass
class Meter:
    """Bytes on the wire at the generator's sockets of one transport, both directions.

    Every lean protocol adds what ``data_received`` got and what it wrote, from the first
    byte of its handshake to its close: headers, framing, polling requests, pings, acks.
    """

    received: int = 0
    sent: int = 0

    @property
    def total(self) -> int:
        return self.received + self.sent

    def snapshot(self) -> tuple[int, int]:
        return self.received, self.sent


def per_delivery(total_bytes: int, deliveries: int) -> float | None:
    """Bytes per delivered event (None when nothing was delivered)."""
    return round(total_bytes / deliveries, 1) if deliveries else None


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0
