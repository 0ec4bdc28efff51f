"""A ring-full drop of a site link that is down, then a crash of the primary.

The drop marks the dropped entries' regions out of sync in the site link's dirty
logs and jumps its position.  A ``core`` dirty log does not survive the crash, so
the ring header keeps the position from before the drop until the resync has
copied those regions; a reopen that finds a position below the ring's head
resynchronises the site's devices whole.  A ``disk`` log's marks are durable
before the jump: its position is recorded at once."""

from __future__ import annotations

from pathlib import Path

from dmrepl.replicator import Replicator
from dmrepl_testing.replicator import FakeStore, StoreSet, wait_for

DEV = 64 << 10
LOG = 4096  # sectors: about 450 writes of 4 KiB fill the ring
SLINKS = "blockdev 2 0 async blockdev 2 1 async"


def dev_line(remote_log: str) -> str:
    return f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 1 1 r1 {remote_log}"


def new_stores(images: dict[str, bytes] | None = None) -> StoreSet:
    stores = StoreSet()
    for name, size in (("log", (LOG + 8) * 512), ("l0", DEV), ("r1", DEV)):
        stores.add(FakeStore(size, name=name, data=None if images is None else images[name]))
    return stores


def open_rep(stores: StoreSet, mode: str, **knobs: object) -> Replicator:
    return Replicator.from_table(f"0 1 replicator ringbuffer 4 log 0 {mode} {LOG} {SLINKS}",
                                 opener=stores.open, persist_interval=0.002, **knobs)


def slink1(rep: Replicator) -> dict:
    slinks = rep.status_dict()["slinks"]
    return slinks.get("1") or slinks[1]


def crash_image(stores: StoreSet) -> dict[str, bytes]:
    """Every store as it is now (all writes arrived), as a kill -9 leaves them."""
    return {name: s.snapshot() for name, s in stores.stores.items()}


def drop_while_down(stores: StoreSet, remote_log: str) -> tuple[Replicator, bytes]:
    """Site 1 down; 4 KiB writes until the ring is full and site 1 drops."""
    rep = open_rep(stores, "create", retry_interval=3600)
    dev = rep.add_device(dev_line(remote_log))
    rep.start()
    stores.stores["r1"].fail_writes = True  # site 1 is down (and stays down)
    i = 0
    while not slink1(rep)["drops"]:
        dev.write((i % 16) * 4096, bytes([i % 255 + 1]) * 4096)
        i += 1
    assert i > 16  # the ring filled up with writes to every block
    return rep, dev.read(0, DEV)


def reopen_up(images: dict[str, bytes], remote_log: str) -> tuple[Replicator, StoreSet]:
    """Reopen the crashed images with site 1 up; wait until it holds everything."""
    stores = new_stores(images)
    rep = open_rep(stores, "open")
    rep.add_device(dev_line(remote_log))
    rep.start()
    assert rep.wait_drained(30)
    return rep, stores


def test_core_log_drop_then_crash_resyncs_the_site() -> None:
    stores = new_stores()
    rep, local = drop_while_down(stores, "core 2 8 nosync")
    images = crash_image(stores)  # the crash: the core log's marks are gone
    rep.close()
    rep2, stores2 = reopen_up(images, "core 2 8 nosync")
    try:
        assert stores2.stores["l0"].snapshot() == local
        assert stores2.stores["r1"].snapshot() == local  # main: the dropped writes lack
        assert slink1(rep2)["resync_bytes"] == DEV  # the whole device, once
    finally:
        rep2.close()


def test_core_log_crash_after_the_resync_does_not_resync_again() -> None:
    stores = new_stores()
    rep, _local = drop_while_down(stores, "core 2 8 nosync")
    images = crash_image(stores)
    rep.close()
    rep2, stores2 = reopen_up(images, "core 2 8 nosync")
    # the resync is done: the next persist records the real position again
    wait_for(lambda: rep2.ring.positions.get(1, 0) >= rep2.ring.head_seq - 1,
             "site 1's real position in the ring header")
    images2 = crash_image(stores2)
    rep2.close()
    rep3, stores3 = reopen_up(images2, "core 2 8 nosync")
    try:
        assert slink1(rep3)["resync_bytes"] == 0
        assert stores3.stores["r1"].snapshot() == stores3.stores["l0"].snapshot()
    finally:
        rep3.close()


def test_disk_log_drop_records_the_jumped_position(tmp_path: Path) -> None:
    dlog = tmp_path / "r1.dlog"
    dlog.write_bytes(bytes(1 << 20))
    remote_log = f"disk 2 {dlog} 8"  # (an explicit sync mode would ignore the header)
    stores = new_stores()
    rep, local = drop_while_down(stores, remote_log)
    try:
        # the marks are durable in the disk log: the header holds the jump
        wait_for(lambda: rep.ring.positions.get(1, 0) >= rep.ring.head_seq - 1,
                 "site 1's jumped position in the ring header")
        images = crash_image(stores)
    finally:
        rep.close()
    rep2, stores2 = reopen_up(images, remote_log)
    try:
        assert stores2.stores["r1"].snapshot() == local
        # no floor: the header recorded the jump, and the marks survived
        assert rep2.ring.positions.get(1, 0) >= rep2.ring.head_seq - 1
    finally:
        rep2.close()
