"""The kernel journal's drainer against a fake kernel (the real one: in
tests/kernel/test_dmrepl_kjournal.py): segments drained in their order, each
write appended in log order, flushes kept, a segment emptied before reuse, and
what the kernel may have lost (a crash, a bad segment) resynchronised."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dmrepl.blockio import AckWait, WriteOp
from dmrepl.daemon import _kernel, erarecord
from dmrepl.daemon import kjournal as kjournal_mod
from dmrepl.daemon.kjournal import BATCH_OPS, KernelJournal
from dmrepl.dm import era as era_fmt
from dmrepl.dm import logwrites as lw

S = 512
SECTORS = 2048          # a 1 MiB device
SEGMENT = 1 << 20


def block(raw: bytes) -> bytes:
    return raw + bytes(-len(raw) % S)


def entry(sector: int, nr: int, flags: int, data: bytes = b"") -> bytes:
    return block(lw.LOG_WRITE_ENTRY.build({"sector": sector, "nr_sectors": nr,
                                           "flags": flags, "data_len": len(data)})) + data


def drained(dev: Device) -> list[Any]:
    """The data of what reached ``dev``'s replication log, in order (its
    flushes left out)."""
    return [op[2] for op in dev.journal_backend.log if op[0] != "flush"]


END_MARK = entry(0, 0, lw.FLAG_MARK, b"dm-log-writes-end")


def segment_image(*entries: bytes, ended: bool = True) -> bytes:
    """A segment as its target leaves it when it goes: ``entries``, then the end
    mark (``ended`` False: as one that filled up leaves it, without)."""
    logged = [*entries, END_MARK] if ended else list(entries)
    return block(lw.LOG_WRITE_SUPER.build({"magic": lw.LOG_MAGIC, "version": lw.LOG_VERSION,
                                           "nr_entries": len(logged),
                                           "sectorsize": S})) + b"".join(logged)


@dataclass
class Journal:
    """The engine device's journal backend: what reached the log, in order."""

    log: list[tuple[Any, ...]] = field(default_factory=list)
    #: called at each batch (what the test wants to see then)
    on_batch: Any = None
    #: writes of a batch it takes (a log that takes part of one: the rest one by one)
    take: int = 3

    def write_many(self, ops: Sequence[WriteOp]) -> list[AckWait | None]:
        if self.on_batch is not None:
            self.on_batch()
        taken = ops[:self.take]
        self.log += [("write" if d is not None else "trim", o, d, n) for o, d, n, _f in taken]
        return [None] * len(taken)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.log.append(("write", offset, data, len(data)))

    def trim(self, offset: int, length: int) -> None:
        self.log.append(("trim", offset, None, length))

    def flush(self) -> None:
        self.log.append(("flush",))


@dataclass
class Device:
    journal_backend: Journal = field(default_factory=Journal)
    lost: int = 0
    lost_ranges: list[tuple[int, int | None]] = field(default_factory=list)

    def journal(self, *, cached: bool = False) -> Journal:
        return self.journal_backend

    def lost_writes(self, offset: int = 0, length: int | None = None) -> None:
        self.lost += 1
        self.lost_ranges.append((offset, length))

    def remote_in_sync(self) -> bool:
        return self.lost == 0

    #: a remote site link is past its fall-behind limit (the engine's forced sync)
    behind: bool = False
    #: a fall-behind limit in writes, counting those not yet in the log
    limit: int | None = None

    #: has a remote site link a fall-behind limit at all
    limited: bool = True

    def behind_limit(self, ios: int = 0, nbytes: int = 0, since: float | None = None) -> bool:
        return self.behind or (self.limit is not None and ios > self.limit)

    def fallbehind_limited(self) -> bool:
        return self.limited


ERA_DEV = "253:9"
JOURNAL_DEV = "253:10"  # /dev/mapper/NAME, the log-writes device
ERA_BLOCK = 64          # sectors per era block, in the fake era's answers


class FakeKernel:
    """log-writes NAME over one of the segment files' fake loop devices, over an
    era device whose record of written blocks the test sets (``era_written``:
    era -> blocks)."""

    def __init__(self) -> None:
        self.live: str | None = None      # the fake loop device the table logs to
        self.created = 0
        self.swaps: list[str] = []
        self.writes = 0
        self.on_swap: list[bytes] = []    # what the old target logged, per swap
        self.suspended = False
        #: a table loaded and not yet live: the fake loop device it logs to
        self.loaded: str | None = None
        self.era_live = False
        self.era = 1
        self.era_written: dict[int, set[int]] = {}
        self.era_unreadable = False
        self.filled = False      # the segment swapped out had filled up
        #: called as each swap returns (writes the device completes meanwhile)
        self.after_swap: Callable[[], None] | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loops: dict[str, str] = {}

        def attach(path: str, size: int) -> tuple[str, bool]:
            made = not os.path.exists(path)
            with open(path, "ab") as f:
                f.truncate(size)
            loops.setdefault(path, f"/dev/fakeloop{len(loops)}")
            self.paths = {v: k for k, v in loops.items()}
            return loops[path], made

        def create(name: str, sectors: int, local: str, seg: str, uuid: Any) -> str:
            self.created += 1
            self.live = seg
            return f"/dev/mapper/{name}"

        def swap(name: str, sectors: int, local: str, seg: str) -> Any:
            assert self.live is not None
            # the old target's destructor writes its log (at least its end mark)
            with open(self.paths[self.live], "r+b") as f:   # (one that filled: no end)
                f.write(self.on_swap.pop(0) if self.on_swap
                        else segment_image(ended=not self.filled))
            self.swaps.append(seg)
            self.calls.append("swap")
            self.live = seg
            if self.after_swap is not None:
                self.after_swap()
            return lw.LogWritesStatus(0, 0, self.filled)

        monkeypatch.setattr(_kernel, "attach_file_loop", attach)
        monkeypatch.setattr(_kernel, "detach_file_loop", lambda path, delete: None)
        monkeypatch.setattr(_kernel, "create_logwrites", create)
        monkeypatch.setattr(_kernel, "swap_logwrites", swap)
        monkeypatch.setattr(_kernel, "logwrites_logdev", lambda name: self.live)
        monkeypatch.setattr(_kernel, "devno", lambda path: path)
        monkeypatch.setattr(_kernel, "logwrites_status",
                            lambda name: lw.LogWritesStatus(0, 0, False))
        monkeypatch.setattr(_kernel, "mapper_exists", lambda name: self.live is not None)
        monkeypatch.setattr(_kernel, "mapper_write_stat",
                            lambda name: (self.writes, self.writes * 4096))

        def era_message(name: str, text: str) -> None:
            if text == "checkpoint":
                self.era += 1

        def create_era(name: str, *args: Any) -> str:
            self.era_live = True
            return f"/dev/mapper/{name}"

        def written_since(read_block: Any, era: int, *, snapshot: bool = False
                          ) -> tuple[int, set[int]]:
            assert snapshot == self.era_live
            if self.era_unreadable:
                raise era_fmt.EraFormatError("bad checksum")
            return ERA_BLOCK, {b for e, blocks in self.era_written.items() if e >= era
                               for b in blocks}

        def remove_mapper(name: str) -> None:
            if name.startswith("."):
                self.era_live = False
        monkeypatch.setattr(_kernel, "mapper_devno", lambda name: (
            (ERA_DEV if self.era_live else None) if name.startswith(".")
            else (JOURNAL_DEV if self.live is not None else None)))
        monkeypatch.setattr(_kernel, "create_era", create_era)
        monkeypatch.setattr(_kernel, "era_status", lambda name: era_fmt.EraStatus(self.era, None))
        monkeypatch.setattr(_kernel, "era_message", era_message)
        monkeypatch.setattr(_kernel, "logwrites_origin", lambda name: (
            ERA_DEV if self.era_live else "/dev/local"))
        monkeypatch.setattr(_kernel, "remove_mapper", remove_mapper)
        monkeypatch.setattr(_kernel, "mapper_open_count", lambda name: int(
            name.startswith(".") and self.era_live and self.live is not None))
        monkeypatch.setattr(erarecord.fmt, "written_since", written_since)

        def finish_half_swap(name: str) -> bool:
            # (a resume makes a loaded table live: the old target logs what it held)
            was = self.suspended or self.loaded is not None
            if self.loaded is not None:
                assert self.live is not None
                with open(self.paths[self.live], "r+b") as f:
                    f.write(self.on_swap.pop(0) if self.on_swap else segment_image())
                self.live, self.loaded = self.loaded, None
            self.suspended = False
            return was
        monkeypatch.setattr(_kernel, "finish_half_swap", finish_half_swap)

        def suspend_mapper(name: str, *, skip_lockfs: bool = False) -> None:
            self.calls.append("suspend" if skip_lockfs else "suspend+lockfs")
            self.suspended = True

        def resume_mapper(name: str) -> None:
            self.calls.append("resume")
            self.suspended = False
        self.calls: list[str] = []   # suspends and resumes, and the guardian's words
        monkeypatch.setattr(_kernel, "suspend_mapper", suspend_mapper)
        monkeypatch.setattr(_kernel, "resume_mapper", resume_mapper)


def holds(calls: list[str]) -> list[str]:
    """``calls`` without the swaps, and without the guardian's words around a
    swap made while no hold is (test_a_swap_is_guarded_by_the_guardian)."""
    out: list[str] = []
    i = 0
    while i < len(calls):
        c = calls[i]
        if c.startswith("hold ") and calls[i + 1:i + 3] == ["swap", "free " + c[5:]]:
            i += 3
        else:
            if c != "swap":
                out.append(c)
            i += 1
    return out


@dataclass
class Guardian:
    """The guardian process, as the daemon tells it (the real one: test_guardian)."""

    kernel: FakeKernel
    #: the journals it flushes while the daemon is down: name -> major:minor
    journals: dict[str, str] = field(default_factory=dict)

    def hold(self, name: str) -> None:
        self.kernel.calls.append(f"hold {name}")

    def free(self, name: str) -> None:
        self.kernel.calls.append(f"free {name}")

    def journal(self, name: str, devno: str) -> None:
        self.journals[name] = devno

    def unjournal(self, name: str) -> None:
        self.journals.pop(name, None)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = FakeKernel()
    k.install(monkeypatch)
    return k


def journal(tmp_path: Path, dev: Device, **kw: Any) -> KernelJournal:
    """Device ``d``'s journal over ``dev`` (``kw``: KernelJournal's, the interval
    an hour unless given)."""
    kw.setdefault("interval", 3600)
    return KernelJournal("d", SECTORS, "/dev/local", dev, str(tmp_path),  # type: ignore[arg-type]
                         segment_bytes=SEGMENT, **kw)


@pytest.fixture
def opened(tmp_path: Path, kernel: FakeKernel) -> Iterator[tuple[KernelJournal, Device]]:
    dev = Device()
    kj = journal(tmp_path, dev)
    kj.open(None)
    try:
        yield kj, dev
    finally:
        kj.stop()


def test_a_segment_is_appended_in_log_order_with_its_flushes_then_emptied(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, dev = opened
    a, b = b"\x01" * S, b"\x02" * 2 * S
    kernel.on_swap.append(segment_image(
        entry(4, 1, 0, a), entry(8, 2, lw.FLAG_FUA, b), entry(0, 0, lw.FLAG_FLUSH),
        entry(16, 8, lw.FLAG_DISCARD), entry(4, 1, 0, b[:S]), entry(0, 0, lw.FLAG_MARK),
        entry(12, 1, lw.FLAG_FUA, a), entry(9, 1, 0, a)))
    kj.drain_now()
    # a flush, and a FUA write, end an epoch (a log commit): nothing after either
    # is applied at a remote site before it; the log is committed before the
    # segment is let go
    assert dev.journal_backend.log == [
        ("write", 4 * S, a, S), ("write", 8 * S, b, 2 * S), ("flush",), ("flush",),
        ("trim", 16 * S, None, 8 * S), ("write", 4 * S, b[:S], S),
        ("write", 12 * S, a, S), ("flush",), ("write", 9 * S, a, S), ("flush",)]
    # the drained segment is empty (its super gone) and no longer to drain
    with open(tmp_path / "d.0.seg", "rb") as f:
        assert lw.parse_super(f.read(64)) is None
    assert json.loads((tmp_path / "d.journal").read_text()) == {
        "pending": [], "eras": {"1": 1}, "current": 1}
    assert dev.lost == 0
    assert kj.describe()["drained"]
    kernel.writes += 1            # a write since the swap: in no drained segment yet
    assert not kj.describe()["drained"]


def test_a_new_daemon_drains_the_segments_of_the_dead_one_in_their_order(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, _dev = opened
    kj.stop()      # the daemon dies: segment 0 full and waiting, the kernel on 1
    kernel.on_swap.append(segment_image(entry(1, 1, 0, b"\x0a" * S)))
    kj.swap()
    with open(tmp_path / "d.1.seg", "r+b") as f:   # what the kernel logged since
        f.write(segment_image(entry(1, 1, 0, b"\x0b" * S)))
    kernel.on_swap.append(segment_image(entry(1, 1, 0, b"\x0b" * S)))
    kernel.suspended = True    # (it died in the middle of a swap: writers wait)
    dev2 = Device()
    kj2 = journal(tmp_path, dev2)
    kj2.open(None)             # takes over: segment 0 first, then 1 (swapped out)
    try:
        assert not kernel.suspended
        kj2.drain_now()
        assert kernel.created == 1
        assert drained(dev2) == [b"\x0a" * S,
                                                                   b"\x0b" * S]
        assert dev2.lost == 0
    finally:
        kj2.stop()


def test_a_daemon_dead_between_the_kernel_swap_and_its_record_loses_nothing(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, _dev = opened
    kj.stop()
    with open(tmp_path / "d.0.seg", "r+b") as f:   # the old target's last log
        f.write(segment_image(entry(2, 1, 0, b"\x0c" * S)))
    # swapped to segment 2 in the kernel, not in d.journal
    kernel.live = next(loop for loop, path in kernel.paths.items() if path.endswith("d.2.seg"))
    dev2 = Device()
    kj2 = journal(tmp_path, dev2)
    kj2.open(None)
    try:
        kj2.drain_now()
        assert drained(dev2) == [b"\x0c" * S]
        assert dev2.lost == 0 and kernel.created == 1
    finally:
        kj2.stop()


def test_a_daemon_dead_with_the_next_segment_loaded_keeps_what_is_written_after_its_restart(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, _dev = opened
    kj.stop()   # the daemon dies in a swap: segment 1's table loaded, the device suspended
    kernel.loaded = next(loop for loop, path in kernel.paths.items()
                         if path.endswith("d.1.seg"))
    kernel.suspended = True
    kernel.on_swap.append(segment_image(entry(1, 1, 0, b"\x0a" * S)))
    dev2 = Device()
    kj2 = journal(tmp_path, dev2)
    kj2.open(None)   # the swap completes: segment 0 to drain, the kernel on 1
    try:
        assert not kernel.suspended and kernel.loaded is None
        assert kernel.live is not None and kernel.paths[kernel.live].endswith("d.1.seg")
        with open(tmp_path / "d.1.seg", "r+b") as f:   # written after the restart
            f.write(segment_image(entry(1, 1, 0, b"\x0b" * S)))
        kernel.on_swap.append(segment_image(entry(1, 1, 0, b"\x0b" * S)))
        kj2.drain_now()   # (the next swap: to a segment the kernel is not on)
        assert drained(dev2) == [b"\x0a" * S,
                                                                   b"\x0b" * S]
        assert dev2.lost == 0
    finally:
        kj2.stop()


def test_a_segment_that_filled_up_is_resynchronised_since_it_began(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    """log-writes logs what it holds as it goes; a log that fills up meanwhile
    stops short (no end mark, its super as it was) and its status, read before,
    did not say so: the drain sees it and resynchronises since it began."""
    kj, dev = opened
    kernel.era_written = {1: {2}}
    kernel.on_swap.append(segment_image(entry(1, 1, 0, b"\x0a" * S), ended=False))
    kj.drain_now()
    assert drained(dev) == [b"\x0a" * S]
    assert dev.lost_ranges == [(2 * ERA_BLOCK * S, ERA_BLOCK * S)]
    assert kj.describe()["resyncs"] == 1


def test_a_device_gone_while_journalled_is_resynchronised(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, _dev = opened
    kj.stop()
    kernel.era_written = {1: {2}}
    kernel.live = None          # the host crashed: no device, "active" on disk
    dev2 = Device()
    kj2 = journal(tmp_path, dev2)
    kj2.open(None)
    try:
        assert dev2.lost == 1 and kernel.created == 2
        assert (tmp_path / "d.resync").exists()
    finally:
        kj2.stop()


def test_a_crash_resyncs_only_the_blocks_written_since_the_oldest_segment_not_drained(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, _dev = opened
    kj.drain_now()      # segment 0 (era 1) drained; segment 1 began in era 1
    kj.swap()           # segment 2 began in era 2; segment 1 waits
    kernel.era_written = {1: {0}, 2: {3}, 3: {4, 5}}
    kernel.live, kernel.era_live = None, False      # the host crashed
    dev2 = Device()
    kj2 = journal(tmp_path, dev2)
    kj2.open(None)
    try:
        # segments 1 and 2 were not drained: what was written since era 1
        unit = ERA_BLOCK * S
        assert dev2.lost_ranges == [(0, unit), (3 * unit, 3 * unit)]
        assert json.loads((tmp_path / "d.resync").read_text())["ranges"] == [
            [0, unit], [3 * unit, 3 * unit]]
        assert kj2.describe()["resync_bytes"] == 4 * unit
    finally:
        kj2.stop()
    # restarted before the remote site links caught up: the same ranges again
    kernel.live, kernel.era_live = None, False
    with open(tmp_path / "d.0.seg", "r+b") as f:   # (its target, gone, logged its end)
        f.write(segment_image())
    kj2.close(keep=True)
    dev3 = Device()
    kj3 = journal(tmp_path, dev3)
    kj3.open(None)
    try:
        assert dev3.lost_ranges == [(0, unit), (3 * unit, 3 * unit)]
    finally:
        kj3.stop()


def test_a_segment_that_filled_resyncs_the_blocks_written_since_it_began(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, dev = opened
    kj.drain_now()      # segment 1 began in era 1; era 2 now
    kernel.era_written = {1: {1}, 2: {2}}
    kernel.filled = True
    kj.swap()           # segment 1 swapped out full: era 1 on, read from a snapshot
    kernel.filled = False
    kj.drain_now()      # (its drain finds it short of its end mark)
    unit = ERA_BLOCK * S
    assert dev.lost_ranges == [(unit, 2 * unit)]
    assert kj.describe()["resync_bytes"] == 2 * unit


def test_a_crash_with_the_era_record_unreadable_resyncs_the_whole_device(
        tmp_path: Path, kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, _dev = opened
    kj.stop()
    kernel.era_unreadable = True
    kernel.live, kernel.era_live = None, False
    dev2 = Device()
    kj2 = journal(tmp_path, dev2)
    kj2.open(None)
    try:
        assert dev2.lost_ranges == [(0, None)]
    finally:
        kj2.stop()


def test_the_log_is_committed_at_the_journals_flushes_and_before_the_segment_goes(
        kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    """The log is committed (an epoch for the remote site links) where the
    journal flushes and at the segment's end, not at every batch; a batch the
    log took only part of is committed before the rest waits for room (the
    copiers free room only from committed entries)."""
    kj, dev = opened
    dev.journal_backend.take = BATCH_OPS
    n = 5 * BATCH_OPS + 10
    kernel.on_swap.append(segment_image(*(entry(i % SECTORS, 1, lw.FLAG_FLUSH if i == 100 else 0,
                                                b"\x05" * S) for i in range(n))))
    kj.drain_now()
    log = dev.journal_backend.log
    flushes = [i - k for k, i in enumerate(j for j, op in enumerate(log) if op[0] == "flush")]
    assert flushes == [101, n]     # (writes before each flush)
    # a log that takes part of each batch: committed before each rest
    dev.journal_backend.log, dev.journal_backend.take = [], 3
    kernel.on_swap.append(segment_image(*(entry(i, 1, 0, b"\x06" * S) for i in range(5))))
    kj.drain_now()
    assert [op[0] for op in dev.journal_backend.log] == ["write"] * 3 + ["flush"] + \
        ["write"] * 2 + ["flush"]


def test_a_segment_with_writes_past_the_device_is_not_trusted(
        kernel: FakeKernel, opened: tuple[KernelJournal, Device]) -> None:
    kj, dev = opened
    kernel.era_written = {1: {0}}
    kernel.on_swap.append(segment_image(entry(SECTORS, 1, 0, b"\x01" * S)))
    kj.drain_now()
    assert dev.journal_backend.log == [] and dev.lost == 1


def test_draining_stops_with_an_event_when_the_log_fails(
        tmp_path: Path, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[Any, ...]] = []

    class Failing(Journal):
        def write_many(self, ops: Sequence[WriteOp]) -> list[AckWait | None]:
            raise OSError(5, "the replication log failed")

    dev = Device(Failing())
    kj = journal(tmp_path, dev, interval=0.01,
                 on_event=lambda *a, **k: events.append((*a, k)))
    kernel.on_swap.append(segment_image(entry(1, 1, 0, b"\x01" * S)))
    kj.open(None)
    kernel.writes += 1
    try:
        for _ in range(500):
            if events:
                break
            time.sleep(0.01)
        assert events and events[0][:2] == ("error", "kernel-journal-stopped")
        assert "replication log failed" in kj.describe()["error"]
    finally:
        kj.stop()


def test_a_swap_left_out_while_paused_is_made_once_the_device_resumes(
        tmp_path: Path, kernel: FakeKernel) -> None:
    paused = [True]
    dev = Device()
    kj = journal(tmp_path, dev, interval=0.01, paused=lambda: paused[0])
    kernel.on_swap.append(segment_image(entry(3, 1, 0, b"\x03" * S)))
    kernel.writes += 1          # written, then suspended by its admin
    kj.open(None)
    try:
        time.sleep(0.2)
        assert kernel.swaps == [] and not kj.describe()["drained"]
        paused[0] = False       # resumed: no new write, the swap is still owed
        for _ in range(500):
            if kj.describe()["drained"]:
                break
            time.sleep(0.01)
        assert len(kernel.swaps) == 1 and kj.describe()["drained"]
        assert drained(dev) == [b"\x03" * S]
    finally:
        kj.stop()


def wait_for(what: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def guarded(tmp_path: Path, kernel: FakeKernel) -> Iterator[tuple[KernelJournal, Device]]:
    dev = Device()
    kj = journal(tmp_path, dev, interval=0.01, guardian=Guardian(kernel))
    kj.open(None)
    try:
        yield kj, dev
    finally:
        kj.stop()


def test_a_device_past_its_fall_behind_limit_is_held_until_back_under_it(
        kernel: FakeKernel, guarded: tuple[KernelJournal, Device]) -> None:
    kj, dev = guarded
    dev.behind = True
    wait_for(lambda: kernel.suspended)
    # the guardian knows before the device is suspended (a daemon dying in between
    # must not leave it so), and no filesystem freeze
    assert holds(kernel.calls) == ["hold d", "suspend"]
    assert kj.describe()["writes_held"] and kj.describe()["holds"] == 1
    swaps = len(kernel.swaps)
    kernel.writes += 1          # (written before the hold): no swap while held,
    time.sleep(0.1)             # it would resume the device
    assert len(kernel.swaps) == swaps and kernel.suspended
    dev.behind = False
    wait_for(lambda: not kernel.suspended)
    assert holds(kernel.calls) == ["hold d", "suspend", "resume", "free d"]
    wait_for(lambda: len(kernel.swaps) == swaps + 1)   # the swap owed is made
    assert not kj.describe()["writes_held"]


def test_a_held_device_is_resumed_when_draining_stops(
        kernel: FakeKernel, guarded: tuple[KernelJournal, Device]) -> None:
    kj, dev = guarded
    dev.behind = True
    wait_for(lambda: kernel.suspended)
    kj.stop()                   # (the daemon stops, or drains it for a remove)
    assert not kernel.suspended
    assert holds(kernel.calls) == ["hold d", "suspend", "resume", "free d"]


def test_the_admins_suspend_outlasts_a_hold(
        kernel: FakeKernel, tmp_path: Path) -> None:
    """An admin's suspend of a held device is the admin's: the guardian no longer
    resumes it, the hold's end leaves it suspended; an admin's resume of a held
    device leaves it held."""
    paused = [False]
    dev = Device()
    kj = journal(tmp_path, dev, interval=0.01, paused=lambda: paused[0],
                 guardian=Guardian(kernel))
    kj.open(None)
    try:
        dev.behind = True
        wait_for(lambda: kernel.suspended)
        with kj.lock:
            kj.admin_suspend_locked()
            paused[0] = True
        assert holds(kernel.calls)[-2:] == ["suspend+lockfs", "free d"]
        dev.behind = False
        wait_for(lambda: not kj.describe()["writes_held"])
        assert kernel.suspended and "resume" not in kernel.calls
        # held again, then the admin resumes: still held until under the limit
        with kj.lock:
            kj.admin_resume_locked()
            paused[0] = False
        assert not kernel.suspended
        dev.behind = True
        wait_for(lambda: kernel.suspended)
        with kj.lock:
            kj.admin_suspend_locked()
            paused[0] = True
            kj.admin_resume_locked()
            paused[0] = False
        assert kernel.suspended and holds(kernel.calls)[-1] == "hold d"
        dev.behind = False
        wait_for(lambda: not kernel.suspended)
    finally:
        kj.stop()


def test_the_journals_writes_not_yet_in_the_log_count_against_the_limit(
        kernel: FakeKernel, guarded: tuple[KernelJournal, Device]) -> None:
    """A segment swapped out with more writes than the limit: the device is held
    while they are drained into the log, and let go once they are in."""
    kj, dev = guarded
    dev.limit = 4
    seen: list[bool] = []
    dev.journal_backend.on_batch = lambda: seen.append(kernel.suspended)
    kernel.on_swap.append(segment_image(*(entry(i, 1, 0, b"\x07" * S) for i in range(6))))
    kernel.writes += 1
    wait_for(lambda: len(drained(dev)) == 6 and not kj.describe()["writes_held"])
    assert seen[0] is True          # held while the six went into the log
    assert holds(kernel.calls) == ["hold d", "suspend", "resume", "free d"]
    assert kj.describe()["holds"] == 1 and not kernel.suspended
    # fewer than the limit: never held
    kernel.on_swap.append(segment_image(*(entry(i, 1, 0, b"\x08" * S) for i in range(3))))
    kernel.writes += 1
    wait_for(lambda: len(drained(dev)) == 9)
    assert kj.describe()["holds"] == 1 and seen[-1] is False



def test_the_guardian_knows_the_journal_from_its_open_or_takeover_to_its_close(
        tmp_path: Path, kernel: FakeKernel) -> None:
    """While the daemon is down the guardian flushes the log-writes device (by
    its number): it is told when the journal opens, again by the daemon that
    takes it over, and that it went when it closes."""
    guardian = Guardian(kernel)
    kj = journal(tmp_path, Device(), guardian=guardian)
    kj.open(None)
    assert guardian.journals == {"d": JOURNAL_DEV}
    kj.stop()                   # the daemon dies; the next one takes the journal over
    again = Guardian(kernel)
    kj2 = journal(tmp_path, Device(), guardian=again)
    kj2.open(None)
    assert again.journals == {"d": JOURNAL_DEV}
    kernel.live, kernel.era_live = None, False      # (removed)
    kj2.close(keep=False)
    assert again.journals == {}


def test_a_swap_is_guarded_by_the_guardian(
        kernel: FakeKernel, guarded: tuple[KernelJournal, Device]) -> None:
    """A daemon killed in the middle of a swap (the device suspended) must not
    leave its writers waiting for the next start: the guardian is told before."""
    _kj, _dev = guarded
    kernel.on_swap.append(segment_image())
    kernel.writes += 1
    wait_for(lambda: "swap" in kernel.calls)
    wait_for(lambda: len(kernel.calls) >= 3)
    assert kernel.calls[:3] == ["hold d", "swap", "free d"]
    assert holds(kernel.calls) == []


def test_a_device_held_for_its_current_segment_alone_swaps_it_out_and_is_let_go(
        kernel: FakeKernel, guarded: tuple[KernelJournal, Device]) -> None:
    """Past the limit only by what the segment in use holds (ten writes completed
    right after a swap): the device, held, gets that segment swapped out (the
    swap resumes it for that moment and it is suspended again), its writes go to
    the log, and the hold ends: a hold never waits for a swap it forbids."""
    kj, dev = guarded
    dev.limit = 4
    suspended_at_swap: list[bool] = []

    def swapped() -> None:
        suspended_at_swap.append(kernel.suspended)
        if len(suspended_at_swap) == 1:
            kernel.writes += 10      # into the segment now in use
    kernel.after_swap = swapped
    kernel.on_swap += [segment_image(),
                       segment_image(*(entry(i, 1, 0, b"\x09" * S) for i in range(10)))]
    kernel.writes += 1
    wait_for(lambda: len(drained(dev)) == 10 and not kj.describe()["writes_held"])
    assert suspended_at_swap[:2] == [False, True]   # the second swap made while held
    assert holds(kernel.calls)[:3] == ["hold d", "suspend", "suspend"]   # (again, after it)
    assert holds(kernel.calls)[-2:] == ["resume", "free d"] and not kernel.suspended
    assert kj.describe()["holds"] == 1

def test_a_hold_that_fails_is_tried_again_later_not_at_every_look(
        kernel: FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No guardian can be started (its exec fails): the device is not held (a
    dying daemon would leave it suspended), one error event, and the hold is
    not tried again at every look (every 10 ms here) but after HOLD_RETRY."""
    tries: list[float] = []
    events: list[str] = []

    class NoGuardian:
        def hold(self, name: str) -> None:
            tries.append(time.monotonic())
            raise OSError("cannot start the guardian")

        def free(self, name: str) -> None:
            raise OSError("cannot start the guardian")

        def journal(self, name: str, devno: str) -> None:
            raise OSError("cannot start the guardian")

        def unjournal(self, name: str) -> None:
            pass

    monkeypatch.setattr(kjournal_mod, "HOLD_RETRY", 0.3)
    dev = Device()
    kj = journal(tmp_path, dev, interval=0.01,
                 on_event=lambda kind, event, **f: events.append(event),
                 guardian=NoGuardian())
    kj.open(None)
    try:
        dev.behind = True
        wait_for(lambda: len(tries) >= 2, timeout=5)
        assert not kernel.suspended and not kj.describe()["writes_held"]
        assert tries[1] - tries[0] >= 0.3          # (not the next look, 10 ms later)
        assert 1 <= events.count("kernel-journal-hold-failed") <= len(tries)
    finally:
        kj.stop()


@pytest.mark.parametrize("limited", [False, True])
def test_the_backlog_is_read_per_batch_only_for_a_device_with_a_fall_behind_limit(
        tmp_path: Path, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch,
        limited: bool) -> None:
    """The journal's backlog (the device's write count: a device-mapper ioctl) is
    looked at after every batch drained where a site link has a fall-behind limit,
    and not where none has one (it was a sixth of the drainer's CPU in the VM)."""
    dev = Device(limited=limited)
    kj = journal(tmp_path, dev, interval=0.05, guardian=Guardian(kernel))
    kj.open(None)
    looks: list[str] = []

    def write_stat(name: str) -> tuple[int, int]:
        looks.append(name)
        return kernel.writes, kernel.writes * 4096
    monkeypatch.setattr(_kernel, "mapper_write_stat", write_stat)
    try:
        n = 16 * BATCH_OPS
        kernel.on_swap.append(segment_image(*(entry(i, 1, 0, b"\x07" * S) for i in range(n))))
        kernel.writes += 1
        wait_for(lambda: len(drained(dev)) == n)
        kj.stop()
        # unlimited: the swaps' own looks, and one every 256 entries (is the segment
        # in use filling?), not one a batch
        batches = n // BATCH_OPS
        assert len(looks) >= batches if limited else len(looks) <= batches // 2, looks
    finally:
        kj.stop()
