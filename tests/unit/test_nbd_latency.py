"""NBD request latency histograms: bucket placement, and the server counting
each request's service time per export and command."""

from __future__ import annotations

import time
from pathlib import Path

from dmrepl.nbd import Export, MemoryBackend, NbdServer
from dmrepl.nbd.client import NbdStore
from dmrepl.nbd.latency import BOUNDS_NS, LatencyHistogram

MS = 1_000_000   # nanoseconds


def test_histogram_buckets_are_cumulative_with_upper_bounds_inclusive() -> None:
    h = LatencyHistogram()
    for ns in (1, 50_000, 50_001, 3 * MS, 10_000 * MS, 10_000 * MS + 1):
        h.record(ns)
    snap = h.snapshot()
    assert snap.count == 6
    assert snap.sum_seconds == (1 + 50_000 + 50_001 + 3 * MS + 20_000 * MS + 1) / 1e9
    le = dict(snap.buckets)
    assert len(snap.buckets) == len(BOUNDS_NS) + 1
    assert le[50e-6] == 2            # 1 ns and exactly 50 us
    assert le[100e-6] == 3
    assert le[2.5e-3] == 3 and le[5e-3] == 4
    assert le[10.0] == 5             # exactly 10 s
    assert le[float("inf")] == 6     # beyond the last bound
    counts = [n for _, n in snap.buckets]
    assert counts == sorted(counts)


class SlowFlush(MemoryBackend):
    def flush(self) -> None:
        time.sleep(0.03)
        super().flush()


def test_server_counts_each_request_per_export_and_command(tmp_path: Path) -> None:
    with NbdServer(str(tmp_path / "s")) as srv:
        srv.add_export(Export("a", SlowFlush(1 << 20)))
        srv.add_export(Export("b", MemoryBackend(1 << 20)))
        assert srv.latency_snapshot() == {}
        a = NbdStore(f"nbd+unix:///a?socket={tmp_path / 's'}")
        b = NbdStore(f"nbd+unix:///b?socket={tmp_path / 's'}")
        try:
            for i in range(3):
                a.pwrite(i * 4096, b"x" * 4096)
            a.pread(0, 4096)
            a.flush()
            a.trim(0, 4096)
            b.pread(0, 512)
            b.pread(512, 512)
            snaps = srv.latency_snapshot()
        finally:
            a.close()
            b.close()
    assert {k: s.count for k, s in snaps.items()} == {
        ("a", "write"): 3, ("a", "read"): 1, ("a", "flush"): 1, ("a", "trim"): 1,
        ("b", "read"): 2}
    flush = snaps[("a", "flush")]
    assert flush.sum_seconds >= 0.03          # the backend's flush is in its time
    assert dict(flush.buckets)[0.025] == 0    # so it is above the 25 ms bucket
    assert flush.buckets[-1] == (float("inf"), 1)
