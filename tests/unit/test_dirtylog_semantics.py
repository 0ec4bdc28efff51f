"""Core and disk log semantics against a model, crashes, and device failures."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dmrepl.dirtylog import (
    CoreLog,
    DirtyLog,
    DiskLog,
    FileStorage,
    LogDeviceError,
    MemoryStorage,
    RegionOutOfRange,
    open_dirty_log,
)
from dmrepl.dirtylog.format import (
    LOG_OFFSET,
    HeaderProblem,
    LogHeader,
    area_size,
    build_header,
    parse_header,
)
from dmrepl.errors import UserError

REGION = 8


def disk(regions: int, storage: MemoryStorage | None = None, *sync: str,
         lbs: int = 512) -> DiskLog:
    storage = storage or MemoryStorage(area_size(regions, lbs), logical_block_size=lbs)
    log = open_dirty_log("disk", ["mem", str(REGION), *sync], regions * REGION,
                         storage=storage)
    assert isinstance(log, DiskLog)
    return log


def core(regions: int, *sync: str) -> CoreLog:
    log = open_dirty_log("core", [str(REGION), *sync], regions * REGION)
    assert isinstance(log, CoreLog)
    return log


def all_in_sync(log: DirtyLog) -> None:
    for region in range(log.region_count):
        log.set_region_sync(region, True)
        log.clear_region(region)
    log.flush()


# -- core log -----------------------------------------------------------------------


def test_core_default_starts_clean_and_out_of_sync() -> None:
    log = core(10)
    log.resume()
    assert all(log.is_clean(r) for r in range(10))
    assert not any(log.in_sync(r) for r in range(10))
    assert log.get_sync_count() == 0
    assert [log.get_resync_work() for _ in range(11)] == [*range(10), None]


def test_core_nosync_starts_in_sync() -> None:
    log = core(10, "nosync")
    assert log.get_sync_count() == 10
    assert log.get_resync_work() is None


def test_resync_skips_recovering_and_restarts_on_resume() -> None:
    log = core(6)
    assert log.get_resync_work() == 0
    assert log.get_resync_work() == 1
    log.set_region_sync(0, True)
    log.set_region_sync(1, False)  # recovery of 1 failed
    assert log.resync_position == 2
    assert [log.get_resync_work() for _ in range(5)] == [2, 3, 4, 5, None]
    log.resume()  # the scan starts over; 2..5 are still recovering, 1 is not
    assert log.get_resync_work() == 1
    assert log.get_resync_work() is None
    assert log.counts().recovering == 5


def test_set_region_sync_never_double_counts() -> None:
    log = core(4)
    for _ in range(3):
        log.set_region_sync(2, True)
    assert log.get_sync_count() == 1
    log.set_region_sync(2, False)
    log.set_region_sync(2, False)
    assert log.get_sync_count() == 0
    assert not log.in_sync(2)


def test_mark_and_clear() -> None:
    log = core(70)
    log.mark_regions([0, 7, 8, 69])
    assert [r for r in range(70) if not log.is_clean(r)] == [0, 7, 8, 69]
    assert log.counts().dirty_count == 4
    log.mark_region(7)  # idempotent
    assert log.counts().dirty_count == 4
    log.clear_regions([7, 69])
    assert [r for r in range(70) if not log.is_clean(r)] == [0, 8]
    assert log.counts().clean_count == 68


def test_resync_scan_over_a_large_log() -> None:
    log = core(100_000)
    for region in range(100_000):
        if region not in (9, 64_001, 99_999):
            log.set_region_sync(region, True)
    assert log.first_out_of_sync() == 9
    assert [log.get_resync_work() for _ in range(4)] == [9, 64_001, 99_999, None]


@pytest.mark.parametrize("region", [-1, 10, 2**64])
def test_region_out_of_range(region: int) -> None:
    for log in (core(10), disk(10)):
        for op in (log.is_clean, log.in_sync, log.mark_region, log.clear_region):
            with pytest.raises(RegionOutOfRange, match=f"region {region} out of range"):
                op(region)
        with pytest.raises(UserError):
            log.set_region_sync(region, True)
        with pytest.raises(IndexError):
            log.mark_region(region)


def test_region_of_sector() -> None:
    log = core(4)
    assert [log.region_of_sector(s) for s in (0, 7, 8, 31)] == [0, 0, 1, 3]


# -- disk log: persistence and crashes ---------------------------------------------


def test_fresh_device_is_a_new_log_all_out_of_sync() -> None:
    log = disk(130)
    log.resume()
    assert log.load_problem is HeaderProblem.BAD_MAGIC
    assert log.get_sync_count() == 0
    assert log.counts().dirty_count == 130
    assert log.status_info() == "3 disk mem A"


def test_state_survives_postsuspend_and_reopen() -> None:
    storage = MemoryStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    all_in_sync(log)
    log.mark_regions([4, 100])
    log.clear_region(4)
    log.postsuspend()
    log.close()
    assert storage.closed
    again = disk(130, storage.crash())
    again.resume()
    assert again.load_problem is HeaderProblem.NONE
    assert [r for r in range(130) if not again.is_clean(r)] == [100]
    assert [r for r in range(130) if not again.in_sync(r)] == [100]
    assert again.get_sync_count() == 129
    assert again.get_resync_work() == 100


def test_marks_are_durable_after_flush_even_without_postsuspend() -> None:
    storage = MemoryStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    all_in_sync(log)
    log.postsuspend()
    log.mark_regions([1, 64, 129])
    log.flush()
    # Power fails: only what was flushed to stable storage remains.
    after = disk(130, storage.crash())
    after.resume()
    assert {r for r in range(130) if not after.in_sync(r)} == {1, 64, 129}
    assert after.get_sync_count() == 127


def test_unflushed_marks_are_not_durable_and_nothing_is_written() -> None:
    storage = MemoryStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    all_in_sync(log)
    log.postsuspend()
    writes = len(storage.writes)
    log.mark_region(5)
    assert len(storage.writes) == writes  # marks stay in memory until flush()
    after = disk(130, storage.crash())
    after.resume()
    assert after.is_clean(5)


def test_clear_only_flush_writes_but_does_not_force_a_cache_flush() -> None:
    # The kernel issues no preflush when only clean bits changed: an extra resync
    # after a crash is the only cost.
    storage = MemoryStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    flushes = storage.flushes
    log.clear_region(3)
    log.flush()
    assert storage.flushes == flushes
    assert storage.volatile[LOG_OFFSET] & 0b1000
    assert not storage.durable[LOG_OFFSET] & 0b1000


def test_flush_writes_only_changed_blocks() -> None:
    regions = 64 * 1024  # 8 KiB bitmap = 16 blocks of 512
    storage = MemoryStorage(area_size(regions))
    log = disk(regions, storage, "nosync")  # all clean
    log.resume()
    storage.writes.clear()
    log.flush()
    assert storage.writes == []  # nothing changed, nothing written
    log.mark_region(0)  # block 2 (bitmap starts at 1024)
    log.mark_region(8 * 512 * 5 + 3)  # block 7: within the merge gap -> one write
    log.mark_region(regions - 1)  # block 17: far -> its own write
    log.flush()
    assert storage.writes == [(1024, 6 * 512), (17 * 512, 512)]
    assert storage.flushes == 2  # resume + this flush


def test_flush_with_4k_logical_blocks_is_aligned() -> None:
    storage = MemoryStorage(area_size(130, 4096), logical_block_size=4096)
    log = disk(130, storage, lbs=4096)
    log.resume()
    log.clear_region(1)
    log.mark_region(2)
    log.flush()  # MemoryStorage refuses unaligned I/O
    assert storage.writes[-1] == (0, 4096)


def test_growth_keeps_old_state_and_new_regions_need_sync() -> None:
    storage = MemoryStorage(area_size(200))
    small = disk(100, storage)
    small.resume()
    all_in_sync(small)
    small.mark_region(50)
    small.postsuspend()
    big = disk(200, storage)
    big.resume()
    assert big.load_problem is HeaderProblem.NONE
    assert {r for r in range(200) if not big.in_sync(r)} == {50, *range(100, 200)}
    assert parse_header(storage.durable).nr_regions == 200


def test_forced_sync_ignores_the_disk() -> None:
    storage = MemoryStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    all_in_sync(log)
    log.postsuspend()
    forced = disk(130, storage, "sync")
    forced.resume()
    assert forced.load_problem is HeaderProblem.FORCED
    assert forced.get_sync_count() == 0


def test_corrupted_magic_is_not_trusted() -> None:
    storage = MemoryStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    all_in_sync(log)
    log.postsuspend()
    storage.volatile[2] ^= 0x40
    storage.flush()
    again = disk(130, storage.crash())
    again.resume()
    assert again.load_problem is HeaderProblem.BAD_MAGIC
    assert again.get_sync_count() == 0
    assert again.status_info().endswith(" A")


def test_unsupported_version_fails_the_log_device() -> None:
    storage = MemoryStorage(area_size(130))
    area = bytearray(area_size(130))
    area[:16] = build_header(LogHeader(version=7, nr_regions=130))
    area[LOG_OFFSET:LOG_OFFSET + 16] = b"\xff" * 16
    storage = MemoryStorage(len(area), data=bytes(area))
    log = disk(130, storage)
    log.resume()
    assert log.load_problem is HeaderProblem.BAD_VERSION
    assert log.get_sync_count() == 0
    assert log.status_info() == "3 disk mem D"


class FaultyStorage(MemoryStorage):
    """MemoryStorage whose read, write or flush can be made to fail with EIO."""

    fail_read = fail_write = fail_flush = False

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_read:
            raise OSError(errno.EIO, "injected read error")
        return super().read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_write:
            raise OSError(errno.EIO, "injected write error")
        super().write(offset, data)

    def flush(self) -> None:
        if self.fail_flush:
            raise OSError(errno.EIO, "injected flush error")
        super().flush()


def test_read_error_at_resume_means_all_out_of_sync_and_failed() -> None:
    storage = FaultyStorage(area_size(130))
    good = disk(130, storage)
    good.resume()
    all_in_sync(good)
    good.postsuspend()
    storage.fail_read = True
    log = disk(130, storage)
    log.resume()  # not raised, as in the kernel
    assert log.load_problem is HeaderProblem.READ_FAILED
    assert log.get_sync_count() == 0
    assert log.status_info() == "3 disk mem D"


def test_write_error_at_flush_fails_the_log_and_is_retried() -> None:
    storage = FaultyStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    all_in_sync(log)
    storage.fail_write = True
    log.mark_region(9)
    with pytest.raises(LogDeviceError, match="failed to write") as err:
        log.flush()
    assert err.value.errno == errno.EIO
    assert log.status_info() == "3 disk mem D"
    storage.fail_write = False
    log.flush()  # the pending mark is written now
    after = disk(130, storage.crash())
    after.resume()
    assert not after.is_clean(9)


def test_cache_flush_error_is_F_and_is_retried() -> None:
    storage = FaultyStorage(area_size(130))
    log = disk(130, storage)
    log.resume()
    all_in_sync(log)
    storage.fail_flush = True
    log.mark_region(9)
    with pytest.raises(LogDeviceError, match="failed to flush"):
        log.flush()
    assert log.status_info() == "3 disk mem F"
    storage.fail_flush = False
    log.flush()
    assert not disk_after_crash(storage, 130).is_clean(9)


def disk_after_crash(storage: MemoryStorage, regions: int) -> DiskLog:
    log = disk(regions, storage.crash())
    log.resume()
    return log


def test_write_error_at_resume_raises_but_state_is_usable() -> None:
    storage = FaultyStorage(area_size(130))
    storage.fail_write = True
    log = disk(130, storage)
    with pytest.raises(LogDeviceError):
        log.resume()
    assert log.status_info().endswith(" D")
    assert log.get_sync_count() == 0
    storage.fail_write = False
    log.flush()  # the whole area is rewritten
    assert parse_header(storage.durable).nr_regions == 130


def test_failed_leg_flush_marks_everything_dirty_for_good() -> None:
    storage = MemoryStorage(area_size(130))
    calls: list[int] = []

    def legs_flush() -> None:
        calls.append(1)
        raise OSError(errno.EIO, "leg flush failed")

    log = open_dirty_log("disk", ["mem", str(REGION)], 130 * REGION, storage=storage,
                         flush_callback=legs_flush)
    log.resume()
    log.mark_region(3)
    log.flush()
    assert calls == []  # only called when clean bits are about to be written
    log.clear_region(3)
    log.flush()
    assert calls == [1]
    assert log.counts().dirty_count == 130
    log.clear_region(4)  # no region may become clean after that
    log.clear_regions([5, 6])
    assert not any(log.is_clean(r) for r in (4, 5, 6))
    with pytest.raises(RegionOutOfRange):
        log.clear_regions([130])
    assert disk_after_crash(storage, 130).counts().dirty_count == 130


def test_leg_flush_called_before_clean_bits_are_written() -> None:
    storage = MemoryStorage(area_size(130))
    seen: list[int] = []
    log = open_dirty_log("disk", ["mem", str(REGION)], 130 * REGION, storage=storage,
                         flush_callback=lambda: seen.append(len(storage.writes)))
    log.resume()
    writes = len(storage.writes)
    log.clear_region(0)
    log.flush()
    assert seen == [writes]
    assert len(storage.writes) == writes + 1


# -- real files --------------------------------------------------------------------


def test_file_storage_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"\0" * 8192)
    log = open_dirty_log("disk", [str(path), str(REGION)], 130 * REGION)
    assert isinstance(log, DiskLog) and isinstance(log.storage, FileStorage)
    assert log.storage.name == str(path)
    log.resume()
    all_in_sync(log)
    log.mark_region(77)
    log.flush()
    log.close()
    data = path.read_bytes()
    assert parse_header(data).nr_regions == 130
    again = open_dirty_log("disk", [str(path), str(REGION)], 130 * REGION)
    again.resume()
    assert [r for r in range(130) if not again.in_sync(r)] == [77]
    again.close()


def test_file_storage_too_small(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"\0" * 1024)
    with pytest.raises(UserError, match="too small: need 1536 bytes"):
        open_dirty_log("disk", [str(path), str(REGION)], 130 * REGION)


def test_file_storage_refuses_directories(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a block device or regular file"):
        FileStorage(tmp_path)


def test_file_storage_read_past_end_is_eio(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"\0" * 512)
    st = FileStorage(path)
    try:
        with pytest.raises(OSError) as err:
            st.read(0, 1024)
        assert err.value.errno == errno.EIO
    finally:
        st.close()
    assert st.fd == -1
    assert not os.path.exists(f"/proc/self/fd/{st.fd}")


# -- against a model ----------------------------------------------------------------


class Model:
    """The dm-log.c semantics, written the slow and obvious way."""

    def __init__(self, n: int, nosync: bool = False) -> None:
        self.n = n
        self.clean = set(range(n))
        self.sync = set(range(n)) if nosync else set()
        self.recovering: set[int] = set()
        self.search = 0
        self.dirtied = self.cleaned = False
        self.volatile: set[int] | None = None  # disk: clean bits written
        self.durable: set[int] | None = None  # disk: clean bits flushed

    def mark(self, r: int) -> None:
        if r in self.clean:
            self.clean.discard(r)
            self.dirtied = True

    def clear(self, r: int) -> None:
        if r not in self.clean:
            self.clean.add(r)
            self.cleaned = True

    def flush(self) -> None:
        if self.volatile is None:
            return
        if self.dirtied or self.cleaned:
            self.volatile = set(self.clean)
        if self.dirtied:
            self.durable = set(self.volatile)
        self.dirtied = self.cleaned = False

    def get_resync_work(self) -> int | None:
        if self.search >= self.n:
            return None
        while True:
            r = next((i for i in range(self.search, self.n) if i not in self.sync), self.n)
            self.search = r + 1
            if r >= self.n:
                return None
            if r not in self.recovering:
                self.recovering.add(r)
                return r

    def set_region_sync(self, r: int, in_sync: bool) -> None:
        self.recovering.discard(r)
        if in_sync:
            self.sync.add(r)
        else:
            self.sync.discard(r)

    def disk_resume(self, from_bits: set[int]) -> None:
        self.clean = set(from_bits)
        self.sync = set(from_bits)
        self.search = 0
        self.dirtied = self.cleaned = False
        self.volatile = set(from_bits)
        self.durable = set(from_bits)


class LogMachine(RuleBasedStateMachine):
    """Random request sequences, including suspend/resume and power failures."""

    log: DirtyLog
    model: Model
    storage: MemoryStorage | None

    @initialize(n=st.integers(1, 200), kind=st.sampled_from(["core", "disk", "disk4k"]),
                nosync=st.booleans())
    def setup(self, n: int, kind: str, nosync: bool) -> None:
        self.n, self.kind, self.nosync = n, kind, nosync
        sync = ["nosync"] if nosync else []
        self.model = Model(n, nosync)
        if kind == "core":
            self.storage = None
            self.log = core(n, *sync)
            self.log.resume()
        else:
            lbs = 4096 if kind == "disk4k" else 512
            self.storage = MemoryStorage(area_size(n, lbs), logical_block_size=lbs)
            self.log = disk(n, self.storage, *sync, lbs=lbs)
            self.log.resume()
            self.model.disk_resume(set(range(n)) if nosync else set())

    regions = st.integers(0, 199)

    @rule(r=regions)
    def mark(self, r: int) -> None:
        r %= self.n
        self.log.mark_region(r)
        self.model.mark(r)

    @rule(r=regions)
    def clear(self, r: int) -> None:
        r %= self.n
        self.log.clear_region(r)
        self.model.clear(r)

    @rule(rs=st.lists(regions, max_size=32))
    def mark_many(self, rs: list[int]) -> None:
        rs = [r % self.n for r in rs]
        self.log.mark_regions(rs)
        for r in rs:
            self.model.mark(r)

    @rule(rs=st.lists(regions, max_size=32))
    def clear_many(self, rs: list[int]) -> None:
        rs = [r % self.n for r in rs]
        self.log.clear_regions(rs)
        for r in rs:
            self.model.clear(r)

    @rule()
    def flush(self) -> None:
        self.log.flush()
        self.model.flush()

    @rule()
    def resync_work(self) -> None:
        assert self.log.get_resync_work() == self.model.get_resync_work()

    @rule(r=regions, ok=st.booleans())
    def set_sync(self, r: int, ok: bool) -> None:
        r %= self.n
        self.log.set_region_sync(r, ok)
        self.model.set_region_sync(r, ok)

    @rule()
    def suspend_resume(self) -> None:
        self.log.presuspend()
        self.log.postsuspend()
        self.model.flush()
        if self.model.volatile is not None:  # disk postsuspend also flushes the cache
            self.model.durable = set(self.model.volatile)
        self.log.resume()
        if self.storage is None:
            self.model.search = 0
        else:
            assert self.model.volatile is not None
            # nosync ignores the disk on every resume (kernel: a new log each time).
            self.model.disk_resume(set(range(self.n)) if self.nosync
                                   else self.model.volatile)

    @precondition(lambda self: self.storage is not None)
    @rule()
    def power_failure(self) -> None:
        assert self.storage is not None and self.model.durable is not None
        self.storage = self.storage.crash()
        lbs = self.storage.logical_block_size
        self.log = disk(self.n, self.storage, lbs=lbs)  # default sync: trust the disk
        self.nosync = False
        self.log.resume()
        self.model.recovering = set()
        self.model.disk_resume(self.model.durable)

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "log"):
            return
        log, model = self.log, self.model
        assert {r for r in range(self.n) if log.is_clean(r)} == model.clean
        assert {r for r in range(self.n) if log.in_sync(r)} == model.sync
        counts = log.counts()
        assert log.get_sync_count() == counts.sync_count == len(model.sync)
        assert counts.clean_count == len(model.clean)
        assert counts.recovering == len(model.recovering)
        assert log.status_info().split()[-1] in ("A", "core")


LogMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40,
                                        deadline=None)
TestLogMachine = LogMachine.TestCase
