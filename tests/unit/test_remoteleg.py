"""The remote leg's pure parts: what may differ between the legs after a crash
(from dm-raid's and md's metadata), the raid status, the remote's address."""

from __future__ import annotations

import struct

import pytest

from dmrepl.daemon import remoteleg as rl
from dmrepl.errors import UserError

MiB = 1 << 20
REGION = rl.REGION_SECTORS * rl.SECTOR
SECTORS = 64 * MiB // rl.SECTOR        # 16 regions
NONE = rl.NO_OFFSET


def meta(dirty: set[int] = frozenset(), *, disk_recovery: int = NONE,  # type: ignore[assignment]
         array_resync: int = NONE, magic: int = rl.DM_RAID_MAGIC,
         bitmap_magic: int = rl.BITMAP_MAGIC) -> bytes:
    """A metadata device's first bytes as dm-raid and md write them."""
    data = bytearray(rl.BITMAP_OFFSET + 4096)
    struct.pack_into("<4I4Q", data, 0, magic, 0, 2, 0, 7, 0, disk_recovery, array_resync)
    struct.pack_into("<2I16s3Q2I", data, rl.BITMAP_OFFSET, bitmap_magic, 4, b"u" * 16,
                     7, 7, SECTORS, 0, REGION)
    bits = sum(1 << i for i in dirty)
    start = rl.BITMAP_OFFSET + rl.BITMAP_SB_BYTES
    data[start:start + 2] = bits.to_bytes(2, "little")
    return bytes(data)


def test_clean_metadata_leaves_nothing_to_copy() -> None:
    assert rl.dirty_ranges([meta(), meta()], SECTORS) == []


def test_the_regions_marked_in_either_bitmap_are_copied() -> None:
    ranges = rl.dirty_ranges([meta({0, 9}), meta({9, 15})], SECTORS)
    assert ranges == [(0, REGION), (9 * REGION, REGION), (15 * REGION, REGION)]


def test_a_recovery_under_way_copies_from_its_position_to_the_end() -> None:
    at = 10 * REGION // rl.SECTOR + 5
    ranges = rl.dirty_ranges([meta({2, 12}), meta(disk_recovery=at)], SECTORS)
    assert ranges == [(2 * REGION, REGION), (10 * REGION, 6 * REGION)]
    ranges = rl.dirty_ranges([meta(array_resync=0), meta()], SECTORS)
    assert ranges == [(0, SECTORS * rl.SECTOR)]


@pytest.mark.parametrize("metas", [
    [b"", meta()],                                   # a file that is gone
    [meta(magic=0), meta()],                         # never written by dm-raid
    [meta(), meta(bitmap_magic=0)],                  # no bitmap
    [meta()[:100], meta()],                          # cut short
])
def test_metadata_that_cannot_be_read_copies_the_whole_device(metas: list[bytes]) -> None:
    assert rl.dirty_ranges(metas, SECTORS) == [(0, SECTORS * rl.SECTOR)]


def test_raid_status() -> None:
    st = rl.parse_raid_status("raid1 2 AD 131072/131072 idle 0 0 -")
    assert st.remote_failed and not st.in_sync
    st = rl.parse_raid_status("raid1 2 Aa 65536/131072 recover 0 0 -")
    assert not st.remote_failed and not st.in_sync
    assert rl.parse_raid_status("raid1 2 AA 131072/131072 idle 0 0 -").in_sync
    assert rl.parse_raid_status("raid1 2 A- 131072/131072 idle 0 0 -").remote_failed
    with pytest.raises(rl.RemoteLegError, match="unexpected raid status"):
        rl.parse_raid_status("raid1 2 AA")


def test_remote_address() -> None:
    assert rl.remote_address("nbd://10.0.0.2:10810/disk") == (("10.0.0.2", 10810), "disk")
    assert rl.remote_address("nbd://site/disk") == (("site", 10809), "disk")
    assert rl.remote_address("nbd+unix:///d?socket=/run/s.sock") == ("/run/s.sock", "d")
    for bad in ("nbd:///disk", "nbd+unix:///d", "/dev/sdb"):
        with pytest.raises(UserError):
            rl.remote_address(bad)


def test_raid_params_keep_reads_on_the_local_leg() -> None:
    params = rl.raid_params("7:1", "8:16", "7:2", "43:0", nosync=True)
    assert params.split() == ["raid1", "6", "0", "nosync", "region_size",
                              str(rl.REGION_SECTORS), "write_mostly", "1",
                              "2", "7:1", "8:16", "7:2", "43:0"]


def test_raid_params_without_the_remote_start_degraded_and_rebuild_it_later() -> None:
    assert rl.raid_params("7:1", "8:16", None, None, nosync=True).split() == [
        "raid1", "4", "0", "nosync", "region_size", str(rl.REGION_SECTORS),
        "2", "7:1", "8:16", "-", "-"]
    assert rl.raid_params("7:1", "8:16", "7:2", "43:0", nosync=False,
                          rebuild=True).split()[:5] == ["raid1", "7", "0", "rebuild", "1"]
