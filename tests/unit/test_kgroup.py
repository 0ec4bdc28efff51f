"""The kernel journal group's mapping of the journal's offsets to its members,
and its saved membership (dmrepl.daemon.kgroup)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dmrepl.blockio import AckWait, WriteOp
from dmrepl.daemon.kgroup import (
    GroupTarget,
    Replacing,
    forget_members,
    save_members,
    saved_members,
    saved_replacing,
)
from dmrepl.daemon.kjournal import JournalError

SECTOR = 512
MiB = 1 << 20


class Journal:
    """A member's journal backend whose replication log takes ``take`` writes of
    a batch at most (a full ring); the rest are written one by one."""

    def __init__(self, log: list[tuple[str, int, int]], name: str,
                 take: int = 1 << 30) -> None:
        self.log, self.name, self.take = log, name, take

    def write_many(self, ops: Sequence[WriteOp]) -> list[AckWait | None]:
        taken = ops[:self.take]
        self.log.extend((self.name, offset, length) for offset, _d, length, _f in taken)
        return [None] * len(taken)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.log.append((self.name, offset, len(data)))

    def flush(self) -> None:
        self.log.append((self.name, -1, 0))


class Device:
    """What a group asks of a member's engine device."""

    def __init__(self, name: str, log: list[tuple[str, int, int]], *, behind: bool = False,
                 in_sync: bool = True, take: int = 1 << 30) -> None:
        self.name, self.log, self.behind, self.in_sync = name, log, behind, in_sync
        self.take = take
        self.lost: list[tuple[int, int | None]] = []

    def journal(self, *, cached: bool = False) -> Any:
        return Journal(self.log, self.name, self.take)

    def lost_writes(self, offset: int = 0, length: int | None = None) -> None:
        self.lost.append((offset, length))

    def remote_in_sync(self) -> bool:
        return self.in_sync

    def behind_limit(self, ios: int = 0, nbytes: int = 0, since: float | None = None) -> bool:
        return self.behind

    def fallbehind_limited(self) -> bool:
        return True


def group(*sizes_mib: int, **kw: Any) -> tuple[GroupTarget, list[Device], list[Any]]:
    log: list[tuple[str, int, int]] = []
    devs = [Device(f"d{i}", log, **kw) for i in range(len(sizes_mib))]
    target = GroupTarget([(s * MiB // SECTOR, dev) for s, dev in zip(sizes_mib, devs,
                                                                     strict=True)])
    return target, devs, log


def test_a_drained_write_reaches_the_member_its_slice_falls_in_at_its_own_offset() -> None:
    target, _devs, log = group(1, 2)
    backend = target.journal()
    ops: list[WriteOp] = [(4096, b"a" * 4096, 4096, False),
                          (MiB + 8192, b"b" * 4096, 4096, False),
                          (MiB - 4096, b"c" * 8192, 8192, False)]   # across the two
    assert backend.write_many(ops) == [None, None, None]  # type: ignore[attr-defined]
    assert sorted(log) == sorted([("d0", 4096, 4096), ("d1", 8192, 4096),
                                  ("d0", MiB - 4096, 4096), ("d1", 0, 4096)])
    backend.flush()
    assert {name for name, offset, _n in log if offset == -1} == {"d0", "d1"}


def test_writes_a_full_ring_did_not_take_are_on_the_members_when_the_batch_returns(
        ) -> None:
    # The drainer does not wait for acknowledgements when it drains for a
    # removal or a regroup (a site link past its limit would hold them): a write
    # left to its acknowledgement's wait would never be logged.
    target, _devs, log = group(1, 1, take=1)
    backend = target.journal()
    ops: list[WriteOp] = [(0, b"a" * 4096, 4096, False), (8192, b"b" * 4096, 4096, False),
                          (MiB, b"c" * 4096, 4096, False), (MiB + 4096, b"d" * 4096, 4096,
                                                            False)]
    outcomes = backend.write_many(ops)  # type: ignore[attr-defined]
    assert len(outcomes) == len(ops)
    assert log == [("d0", 0, 4096), ("d0", 8192, 4096), ("d1", 0, 4096), ("d1", 4096, 4096)]


def test_lost_writes_are_resynchronised_on_the_members_they_fall_in() -> None:
    target, devs, _log = group(1, 2, 1)
    target.lost_writes(MiB - 4096, 8192)          # the end of d0, the start of d1
    assert devs[0].lost == [(MiB - 4096, 4096)] and devs[1].lost == [(0, 4096)]
    assert devs[2].lost == []
    target.lost_writes()                           # all of it
    assert devs[2].lost == [(0, MiB)] and devs[1].lost[-1] == (0, 2 * MiB)


def test_one_member_behind_holds_the_group_and_all_must_be_in_sync() -> None:
    target, devs, _log = group(1, 1)
    assert not target.behind_limit(10) and target.remote_in_sync()
    devs[1].behind, devs[0].in_sync = True, False
    assert target.behind_limit(10) and not target.remote_in_sync()


def test_the_saved_membership_round_trips_and_a_damaged_one_says_what_to_do(
        tmp_path: Path) -> None:
    assert saved_members(str(tmp_path), "rep") is None
    save_members(str(tmp_path), "rep", 3, ["a", "b"])
    assert saved_members(str(tmp_path), "rep") == (3, ["a", "b"])
    (tmp_path / ".rep.members").write_text("{not json")
    with pytest.raises(JournalError, match="create them again"):
        saved_members(str(tmp_path), "rep")
    forget_members(str(tmp_path), "rep")
    assert saved_members(str(tmp_path), "rep") is None
    forget_members(str(tmp_path), "rep")    # (gone already: nothing to do)


def test_a_regroup_under_way_is_saved_with_what_it_replaces_until_it_is_done(
        tmp_path: Path) -> None:
    save_members(str(tmp_path), "rep", 4, ["a", "b"], Replacing(3, ["c"]))
    assert saved_members(str(tmp_path), "rep") == (4, ["a", "b"])
    assert saved_replacing(str(tmp_path), "rep") == Replacing(3, ["c"])
    save_members(str(tmp_path), "rep", 4, ["a", "b"])   # the regroup done
    assert saved_replacing(str(tmp_path), "rep") is None
    save_members(str(tmp_path), "rep", 1, ["a", "b"], Replacing(None, ["a"]))
    assert saved_replacing(str(tmp_path), "rep") == Replacing(None, ["a"])
    (tmp_path / ".rep.members").write_text('{"generation": 1, "members": [], '
                                           '"replacing": {"alone": 3}}')
    with pytest.raises(JournalError, match="create them again"):
        saved_replacing(str(tmp_path), "rep")
    assert saved_replacing(str(tmp_path / "none"), "rep") is None
