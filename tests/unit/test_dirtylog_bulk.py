"""The bulk sync-bit operations agree with their region-by-region definitions.

``DirtyLog``'s default ``get_sync_bits``/``set_sync_bits``/``first_out_of_sync``
loop over regions with the per-region methods: they are the reference, and the
bitmap logs' overrides must do exactly what they do.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.dirtylog import DirtyLog, MemoryStorage, open_dirty_log
from dmrepl.dirtylog.format import area_size

REGION = 8


def make(kind: str, regions: int, sync: str) -> DirtyLog:
    extra = [sync] if sync else []
    if kind == "core":
        return open_dirty_log("core", [str(REGION), *extra], regions * REGION)
    storage = MemoryStorage(area_size(regions))
    log = open_dirty_log("disk", ["mem", str(REGION), *extra], regions * REGION,
                         storage=storage)
    log.resume()
    return log


def state(log: DirtyLog) -> tuple[list[bool], int, frozenset[int]]:
    recovering = log.recovering_regions()  # type: ignore[attr-defined]
    return ([log.in_sync(r) for r in range(log.region_count)], log.get_sync_count(),
            recovering)


logs = st.tuples(st.sampled_from(["core", "disk"]), st.integers(1, 200),
                 st.sampled_from(["", "sync", "nosync"]))


@settings(max_examples=200, deadline=None)
@given(spec=logs, data=st.data())
def test_bulk_operations_equal_region_by_region(spec: tuple[str, int, str],
                                                data: st.DataObject) -> None:
    kind, regions, sync = spec
    nbytes = (regions + 7) // 8
    ops = data.draw(st.lists(st.tuples(st.integers(0, regions - 1), st.booleans()),
                             max_size=20))
    # two identical logs, with some regions handed out for recovery
    recovering = data.draw(st.integers(0, 3), label="recovering")
    bulk, ref = make(kind, regions, sync), make(kind, regions, sync)
    for log in (bulk, ref):
        for region, flag in ops:
            log.set_region_sync(region, flag)
        for _ in range(recovering):
            log.get_resync_work()
    assert state(bulk) == state(ref)

    assert bulk.get_sync_bits() == DirtyLog.get_sync_bits(ref)
    assert len(bulk.get_sync_bits()) == nbytes
    start = data.draw(st.integers(-2, regions + 2), label="start")
    assert bulk.first_out_of_sync(start) == DirtyLog.first_out_of_sync(ref, start)
    assert bulk.first_out_of_sync() == DirtyLog.first_out_of_sync(ref)

    # garbage in the bits past the last region must be ignored
    bits = data.draw(st.binary(min_size=nbytes, max_size=nbytes + 2), label="bits")
    assert bulk.set_sync_bits(bits) == DirtyLog.set_sync_bits(ref, bits)
    assert state(bulk) == state(ref)
    assert bulk.get_sync_bits() == DirtyLog.get_sync_bits(ref)
    assert bulk.get_resync_work() == ref.get_resync_work()


def test_set_sync_bits_round_trip_and_counts() -> None:
    log = make("core", 20, "nosync")
    assert log.get_sync_bits() == b"\xff\xff\x0f"  # nothing past region 19
    assert log.set_sync_bits(b"\xff\xfe\x0f") == 1  # region 8 out of sync
    assert log.get_sync_count() == 19 and not log.in_sync(8)
    assert log.first_out_of_sync() == 8 and log.first_out_of_sync(9) is None
    assert log.get_resync_work() == 8
    assert log.set_sync_bits(log.get_sync_bits()) == 0


def test_set_sync_bits_too_short() -> None:
    for log in (make("core", 20, ""), make("disk", 20, "")):
        with pytest.raises(ValueError, match="2 bytes of sync bits for 20 regions"):
            log.set_sync_bits(b"\0\0")
        with pytest.raises(ValueError):
            DirtyLog.set_sync_bits(log, b"\0\0")
