"""The kernel's ``disk`` dirty log and ours share one on-disk format, both ways.

Kernel writes, we read: a kernel mirror with a disk log is created and removed (or
observed with a write in flight), then our DiskLog opens the same log device.  We
write, the kernel reads: our DiskLog leaves some regions dirty, a kernel mirror
with a ``disk`` log (default sync mode: trust the log) resyncs exactly those.

dmsetup and losetup are the oracles.  Everything lives on loop devices over sparse
files in $TMPDIR, under dm names with a per-test prefix, removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass

from _util import run, wait_for

from dmrepl.dirtylog import DiskLog, FileStorage, MemoryStorage, open_dirty_log
from dmrepl.dirtylog.format import (
    LOG_OFFSET,
    MIRROR_DISK_VERSION,
    MIRROR_MAGIC,
    HeaderProblem,
    area_size,
    parse_header,
)
from dmrepl.dirtylog.storage import resolve_device

MIB = 1 << 20
REGION = 1024  # sectors = 512 KiB
NREGIONS = 130  # not a multiple of 64: the kernel pads the bitset to unsigned longs
TARGET = NREGIONS * REGION
LEG_BYTES = TARGET * 512


class Rig(contextlib.ExitStack):
    """Loop devices and dm devices for one test, torn down in reverse order."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"dmrepl-dl-{uuid.uuid4().hex[:8]}"
        self.tmp = self.enter_context(tempfile.TemporaryDirectory())

    def loop(self, size: int, sector_size: int = 512) -> str:
        path = os.path.join(self.tmp, f"f{len(os.listdir(self.tmp))}")
        with open(path, "wb") as f:
            f.truncate(size)
        dev = run("losetup", "--find", "--show", "--sector-size", str(sector_size),
                  path).strip()
        self.callback(run, "losetup", "-d", dev)
        return dev

    def dm(self, suffix: str, table: str) -> str:
        name = f"{self.prefix}-{suffix}"
        run("dmsetup", "create", "--noudevsync", name, "--table", table)
        self.callback(self.remove_quietly, name)
        return name

    @staticmethod
    def remove_quietly(name: str) -> None:
        subprocess.run(["dmsetup", "remove", "--retry", "--noudevsync", name], capture_output=True)

    @staticmethod
    def remove(name: str) -> None:
        run("dmsetup", "remove", "--retry", "--noudevsync", name)


def devnum(name: str) -> str:
    out = run("dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", name).strip()
    return out.replace(" ", "")


def dm_node(name: str) -> str:
    return resolve_device(devnum(name))


@dataclass
class MirrorStatus:
    sync_count: int
    regions: int
    health: str
    log: list[str]


def mirror_status(name: str) -> MirrorStatus:
    # "0 133120 mirror 2 7:0 7:1 12/130 1 AA 3 disk 7:2 A"
    words = run("dmsetup", "status", name).split()
    assert words[2] == "mirror", words
    nmirrors = int(words[3])
    rest = words[4 + nmirrors:]
    done, total = rest[0].split("/")
    nhealth = int(rest[1])
    return MirrorStatus(int(done), int(total), "".join(rest[2:2 + nhealth]),
                        rest[2 + nhealth:])


def read_area(dev: str, size: int) -> bytes:
    """The log area straight from the device (O_DIRECT: no stale page cache)."""
    st = FileStorage(dev)
    try:
        return st.read(0, size)
    finally:
        st.close()


def assert_same_bytes(ours: bytes, kernel: bytes) -> None:
    assert len(ours) == len(kernel), (len(ours), len(kernel))
    diff = [i for i in range(len(ours)) if ours[i] != kernel[i]]
    assert not diff, (f"{len(diff)} bytes differ, first at {diff[0]}: ours "
                      f"{ours[diff[0]:diff[0] + 16].hex()} kernel "
                      f"{kernel[diff[0]:diff[0] + 16].hex()}")


def our_view(area: bytes, dev_name: str = "k") -> DiskLog:
    """Our DiskLog over a copy of bytes the kernel wrote (never writes the device)."""
    storage = MemoryStorage(len(area), data=area, name=dev_name)
    log = open_dirty_log("disk", [dev_name, str(REGION)], TARGET, storage=storage)
    assert isinstance(log, DiskLog)
    log.resume()
    return log


def write_pattern(dev: str, region: int, byte: int, length: int = 64 * 1024) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([byte]) * length, region * REGION * 512)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pattern(dev: str, region: int, length: int = 64 * 1024) -> bytes:
    st = FileStorage(dev)  # O_DIRECT: what is on the device, not in a cache
    try:
        return st.read(region * REGION * 512, length)
    finally:
        st.close()


# -- kernel writes, we read ------------------------------------------------------


def test_kernel_nosync_log_reads_all_clean_and_matches_our_bytes() -> None:
    with Rig() as rig:
        legs = [rig.loop(LEG_BYTES), rig.loop(LEG_BYTES)]
        logdev = rig.loop(MIB)
        # Garbage where the bitmap goes: the kernel must overwrite it, and so must we.
        fd = os.open(logdev, os.O_WRONLY)
        os.pwrite(fd, b"\x5a" * 4096, 0)
        os.fsync(fd)
        os.close(fd)
        name = rig.dm("m", f"0 {TARGET} mirror disk 3 {logdev} {REGION} nosync "
                           f"2 {legs[0]} 0 {legs[1]} 0")
        st = mirror_status(name)
        assert (st.sync_count, st.regions) == (NREGIONS, NREGIONS)
        rig.remove(name)

        size = area_size(NREGIONS)
        kernel_area = read_area(logdev, size)
        header = parse_header(kernel_area)
        assert header.magic == MIRROR_MAGIC
        assert header.version == MIRROR_DISK_VERSION
        assert header.nr_regions == NREGIONS

        log = our_view(kernel_area)
        assert log.load_problem is HeaderProblem.NONE
        assert log.region_count == NREGIONS
        assert log.get_sync_count() == NREGIONS
        assert all(log.is_clean(r) and log.in_sync(r) for r in range(NREGIONS))
        assert log.status_info().endswith(" A")

        # Byte for byte, ours for the same state (same garbage to start from).
        start = bytearray(size)
        start[:4096] = b"\x5a" * 4096
        mine = MemoryStorage(size, data=bytes(start))
        ours = open_dirty_log("disk", ["x", str(REGION), "nosync"], TARGET, storage=mine)
        ours.resume()
        assert_same_bytes(bytes(mine.durable), kernel_area)


def test_kernel_partial_resync_is_read_back_as_dirty_regions() -> None:
    with Rig() as rig:
        legs = [rig.loop(LEG_BYTES), rig.loop(LEG_BYTES)]
        logdev = rig.loop(MIB)
        # Slow the copy into leg 1 so that resync is caught half way.
        slow = rig.dm("slow", f"0 {TARGET} delay {legs[1]} 0 0 {legs[1]} 0 150")
        name = rig.dm("m", f"0 {TARGET} mirror disk 3 {logdev} {REGION} sync "
                           f"2 {legs[0]} 0 {devnum(slow)} 0")
        wait_for("some regions resynced", lambda: mirror_status(name).sync_count >= 3, 60)
        run("dmsetup", "suspend", "--noudevsync", name)  # postsuspend writes the log
        kernel_sync = mirror_status(name).sync_count
        assert 3 <= kernel_sync < NREGIONS, kernel_sync
        kernel_area = read_area(logdev, area_size(NREGIONS))
        run("dmsetup", "resume", "--noudevsync", name)

        log = our_view(kernel_area)
        assert log.load_problem is HeaderProblem.NONE
        # Recovery runs region by region from 0: exactly a prefix is clean.
        assert log.get_sync_count() == kernel_sync
        assert [log.is_clean(r) for r in range(NREGIONS)] == \
            [True] * kernel_sync + [False] * (NREGIONS - kernel_sync)
        assert log.get_resync_work() == kernel_sync


def test_kernel_write_in_flight_leaves_its_region_dirty_on_disk() -> None:
    """Marks reach the disk before the data write: the 'crash image' during the
    write shows the region dirty, and after the write it is clean again.

    The second leg is a linear device suspended with --noflush, so the kernel
    queues the leg write for as long as we look: no race against a delay."""
    target_region = 77
    with Rig() as rig:
        legs = [rig.loop(LEG_BYTES), rig.loop(LEG_BYTES)]
        logdev = rig.loop(MIB)
        held = rig.dm("held", f"0 {TARGET} linear {legs[1]} 0")
        name = rig.dm("m", f"0 {TARGET} mirror disk 3 {logdev} {REGION} nosync "
                           f"2 {legs[0]} 0 {devnum(held)} 0")
        size = area_size(NREGIONS)
        node = dm_node(name)
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                fd = os.open(node, os.O_WRONLY | os.O_DIRECT)
                try:
                    buf = mmap.mmap(-1, 4096)  # page aligned, for O_DIRECT
                    buf.write(b"\xc3" * 4096)
                    os.pwritev(fd, [buf], target_region * REGION * 512)
                finally:
                    os.close(fd)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        run("dmsetup", "suspend", "--noflush", held)
        resumed = False
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            def dirty_on_disk() -> bytes | None:
                area = read_area(logdev, size)
                byte = area[LOG_OFFSET + target_region // 8]
                return None if byte & (1 << (target_region % 8)) else area
            crash_image = wait_for("the mark on disk", dirty_on_disk, 60, interval=0.05)
            assert isinstance(crash_image, bytes)
            assert thread.is_alive(), "the write finished with one leg's I/O held"
            run("dmsetup", "resume", held)
            resumed = True
        finally:
            if not resumed:
                subprocess.run(["dmsetup", "resume", held], capture_output=True)
            thread.join(timeout=60)
        assert not thread.is_alive(), "the write did not finish after the leg resumed"
        assert not errors, errors

        log = our_view(crash_image)
        assert log.load_problem is HeaderProblem.NONE
        assert not log.is_clean(target_region) and not log.in_sync(target_region)
        assert log.counts().dirty_count == 1
        assert log.get_sync_count() == NREGIONS - 1
        assert log.get_resync_work() == target_region

        rig.remove(name)  # presuspend + postsuspend: the clear is written
        after = our_view(read_area(logdev, size))
        assert after.get_sync_count() == NREGIONS
        assert after.is_clean(target_region)


# -- we write, the kernel reads --------------------------------------------------


def test_kernel_resyncs_exactly_the_regions_our_log_left_dirty() -> None:
    dirty = {3, 17, 129}
    differ_but_clean = 50
    with Rig() as rig:
        legs = [rig.loop(LEG_BYTES), rig.loop(LEG_BYTES)]
        logdev = rig.loop(MIB)
        for region in (*dirty, differ_but_clean):
            write_pattern(legs[0], region, 0xAA)
            write_pattern(legs[1], region, 0x55)

        # Our log on the real device: fresh (bad magic) -> all dirty; resync all,
        # clear all, then mark the dirty set and "crash" (no postsuspend).
        log = open_dirty_log("disk", [logdev, str(REGION)], TARGET)
        assert isinstance(log, DiskLog)
        try:
            log.resume()
            assert log.load_problem is HeaderProblem.BAD_MAGIC
            assert log.get_sync_count() == 0
            for region in range(NREGIONS):
                log.set_region_sync(region, True)
                log.clear_region(region)
            log.flush()
            log.mark_regions(sorted(dirty))
            log.flush()
        finally:
            log.close()

        # Leg 1 behind a suspended linear device: the first resync copy waits there,
        # so the kernel's count right after resume is what it read from our bitmap,
        # however slow this VM is.
        gate = rig.dm("gate", f"0 {TARGET} linear {legs[1]} 0")
        run("dmsetup", "suspend", "--noudevsync", gate)
        name = rig.dm("m", f"0 {TARGET} mirror disk 2 {logdev} {REGION} "
                           f"2 {legs[0]} 0 {devnum(gate)} 0")
        rig.callback(subprocess.run, ["dmsetup", "resume", "--noudevsync", gate],
                     capture_output=True)  # before the mirror's removal on failure
        first = mirror_status(name)
        assert first.regions == NREGIONS
        assert first.sync_count == NREGIONS - len(dirty), first
        assert first.log == ["3", "disk", logdev_devnum(logdev), "A"]
        run("dmsetup", "resume", "--noudevsync", gate)
        wait_for("resync to finish",
                 lambda: mirror_status(name).sync_count == NREGIONS, 120)
        rig.remove(name)

        for region in dirty:
            assert read_pattern(legs[1], region) == b"\xaa" * 65536, region
        # The kernel trusted our clean bit: this region was not copied.
        assert read_pattern(legs[1], differ_but_clean) == b"\x55" * 65536

        # And the kernel's final log is all clean when we read it back.
        final = open_dirty_log("disk", [logdev, str(REGION)], TARGET)
        try:
            final.resume()
            assert final.get_sync_count() == NREGIONS
            assert final.counts().dirty_count == 0
        finally:
            final.close()


def logdev_devnum(dev: str) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def test_kernel_reads_our_smaller_log_on_4k_sectors_as_grown() -> None:
    """A log we wrote for 100 regions on a 4 KiB-sector device: the kernel, with
    130 regions, keeps our 100 clean bits and resyncs exactly the 30 new regions."""
    with Rig() as rig:
        legs = [rig.loop(LEG_BYTES), rig.loop(LEG_BYTES)]
        logdev = rig.loop(MIB, sector_size=4096)
        small_target = 100 * REGION
        log = open_dirty_log("disk", [logdev, str(REGION), "nosync"], small_target)
        assert isinstance(log, DiskLog)
        try:
            assert log.storage.logical_block_size == 4096
            assert log.area_size == 4096
            log.resume()
            log.postsuspend()
        finally:
            log.close()

        gate = rig.dm("gate", f"0 {TARGET} linear {legs[1]} 0")
        run("dmsetup", "suspend", "--noudevsync", gate)
        name = rig.dm("m", f"0 {TARGET} mirror disk 2 {logdev} {REGION} "
                           f"2 {legs[0]} 0 {devnum(gate)} 0")
        rig.callback(subprocess.run, ["dmsetup", "resume", "--noudevsync", gate],
                     capture_output=True)
        assert mirror_status(name).sync_count == 100
        run("dmsetup", "resume", "--noudevsync", gate)
        wait_for("resync to finish",
                 lambda: mirror_status(name).sync_count == NREGIONS, 120)
        rig.remove(name)

        area = read_area(logdev, 4096)
        assert parse_header(area).nr_regions == NREGIONS
        ours = our_view(area)
        assert ours.get_sync_count() == NREGIONS
