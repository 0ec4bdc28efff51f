"""Request service times of the NBD server, in fixed-bucket histograms.

Recording one request is a bisect over a short tuple of integer nanosecond
bounds and two integer additions, under a lock the caller holds: a couple of
microseconds, nothing allocated.  Readers (the Prometheus collector) take a
:class:`LatencySnapshot` at scrape time, with the buckets made cumulative there.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

#: Upper bounds (inclusive, nanoseconds) of the buckets: 50 us .. 10 s, then +Inf.
BOUNDS_NS: tuple[int, ...] = tuple(int(us * 1000) for us in (
    50, 100, 250, 500,
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000))


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    """One histogram as read: ``buckets`` are ``(upper bound in seconds,
    requests taking at most that long)``, cumulative, ending with ``inf`` whose
    count is ``count``."""

    buckets: tuple[tuple[float, int], ...]
    sum_seconds: float
    count: int


class LatencyHistogram:
    """Counts of requests per bucket of :data:`BOUNDS_NS`, plus the total time.
    Not locked itself: its owner serialises :meth:`record` and :meth:`snapshot`."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_NS) + 1)   # the last one: beyond 10 s
        self.sum_ns = 0

    def record(self, elapsed_ns: int, requests: int = 1) -> None:
        """``requests`` that each took ``elapsed_ns``."""
        self.counts[bisect_left(BOUNDS_NS, elapsed_ns)] += requests
        self.sum_ns += elapsed_ns * requests

    def snapshot(self) -> LatencySnapshot:
        buckets = []
        running = 0
        for bound, n in zip((*BOUNDS_NS, None), self.counts, strict=True):
            running += n
            buckets.append((float("inf") if bound is None else bound / 1e9, running))
        return LatencySnapshot(tuple(buckets), self.sum_ns / 1e9, running)
