"""The remote leg's pure parts: what may differ between the legs after a crash
(from dm-raid's and md's metadata), the raid status, the remote's address."""

from __future__ import annotations

import pytest

from dmrepl.daemon import remoteleg as rl
from dmrepl.dm import mdraid as md
from dmrepl.errors import UserError

MiB = 1 << 20
REGION = rl.REGION_SECTORS * rl.SECTOR
SECTORS = 64 * MiB // rl.SECTOR        # 16 regions
NONE = md.NO_OFFSET


def meta(dirty: set[int] = frozenset(), *, disk_recovery: int = NONE,  # type: ignore[assignment]
         array_resync: int = NONE, magic: int = md.DM_RAID_MAGIC,
         bitmap_magic: int = md.BITMAP_MAGIC) -> bytes:
    """A metadata device's first bytes as dm-raid and md write them."""
    sb = md.DM_RAID_SUPERBLOCK.build(dict(
        magic=magic, compat_features=0, num_devices=2, array_position=0, events=7,
        failed_devices=0, disk_recovery_offset=disk_recovery,
        array_resync_offset=array_resync, level=1, layout=0, stripe_sectors=0))
    bitmap = md.BITMAP_SUPER.build(dict(
        magic=bitmap_magic, version=4, uuid=b"u" * 16, events=7, events_cleared=7,
        sync_size=SECTORS, state=0, chunksize=REGION, daemon_sleep=5, write_behind=0,
        sectors_reserved=8, nodes=0, cluster_name=bytes(64), pad=bytes(120)))
    bits = sum(1 << i for i in dirty).to_bytes(2, "little")
    data = (sb.ljust(md.BITMAP_OFFSET, b"\0") + bitmap + bits).ljust(md.BITMAP_OFFSET + 4096,
                                                                    b"\0")
    return data


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


def test_raid_params_cap_md_recovery_at_the_site_links_resync_rate() -> None:
    params = rl.raid_params("7:1", "8:16", "7:2", "43:0", nosync=False,
                            recovery_rate=50 << 20).split()
    assert params[params.index("max_recovery_rate") + 1] == str(50 << 10)   # KiB/s
    assert params[1] == str(len(params) - 7)
    assert "max_recovery_rate" not in rl.raid_params("7:1", "8:16", "7:2", "43:0",
                                                     nosync=False).split()
