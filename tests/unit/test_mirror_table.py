"""The kernel mirror that carries a replicated device: its table and its status.

(The kernel's behaviour under them is the kernel tier's: tests/kernel/test_dmrepl_outage.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from dmrepl.cli._status_text import human_lines
from dmrepl.daemon._kernel import (
    KernelDeviceError,
    MirrorPart,
    mirror_target,
    parse_mirror_status,
)


def test_a_new_log_starts_in_sync_an_existing_one_keeps_its_regions() -> None:
    new = mirror_target(MirrorPart(0, 2048, "/dev/loop1", "/dev/loop9", new_log=True),
                        "/dev/nbd3", region=1024)
    assert new.format() == ("0 2048 mirror disk 3 /dev/loop9 1024 nosync 2 /dev/loop1 0 "
                            "/dev/nbd3 0 2 handle_errors keep_log")
    # any explicit sync/nosync makes the kernel start a new log: an existing log
    # (a restarted daemon) is loaded without one
    old = mirror_target(MirrorPart(4096, 2048, "/dev/loop2", "/dev/loop8"), "/dev/nbd3",
                        region=1024)
    assert old.format() == ("4096 2048 mirror disk 2 /dev/loop8 1024 2 /dev/loop2 0 "
                            "/dev/nbd3 4096 2 handle_errors keep_log")


@pytest.mark.parametrize("params, in_sync, regions, failed", [
    ("2 7:1 43:0 16/16 1 AA 3 disk 7:9 A", 16, 16, False),
    ("2 7:1 43:0 13/16 1 AD 3 disk 7:9 A", 13, 16, True),
    ("2 7:1 43:0 13/16 1 AS 3 disk 7:9 A", 13, 16, True),
])
def test_mirror_status(params: str, in_sync: int, regions: int, failed: bool) -> None:
    st = parse_mirror_status(params)
    assert (st.in_sync, st.regions, st.journal_leg_failed) == (in_sync, regions, failed)


@pytest.mark.parametrize("params", ["", "2 7:1", "x 7:1 43:0 1/2 1 AA", "2 a b c/d 1 AA"])
def test_mirror_status_refuses_what_it_cannot_read(params: str) -> None:
    with pytest.raises(KernelDeviceError, match="unexpected mirror status"):
        parse_mirror_status(params)


def test_status_text_shows_the_journal_leg() -> None:
    desc = {"type": "replicator-dev", "nbd": "/dev/nbd0", "detail": [],
            "journal": {"in_sync": 3, "regions": 16, "failed": False}}
    assert human_lines(desc) == [
        "  journal leg /dev/nbd0: copying what the journal leg missed (3/16 regions)"]
    desc["journal"] = {"in_sync": 16, "regions": 16, "failed": False}
    assert human_lines(desc) == ["  journal leg /dev/nbd0: in sync (16/16 regions)"]


def test_status_text_of_a_remote_leg() -> None:
    leg = {"url": "nbd://s/d", "device": "/dev/nbd4", "in_sync_sectors": 10, "sectors": 20,
           "action": "recover", "in_sync": False, "failed": False}
    desc: dict[str, Any] = {"type": "replicator-dev", "detail": [], "remote_leg": leg}
    assert human_lines(desc) == [
        "  remote leg /dev/nbd4 (nbd://s/d): copying what the remote missed (recover) "
        "(10/20 sectors)"]
    leg.update(failed=True)
    assert human_lines(desc) == [
        "  remote leg /dev/nbd4 (nbd://s/d): failed: the remote is down, writes go to the "
        "local device only (10/20 sectors)"]
