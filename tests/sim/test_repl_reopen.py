"""Reopen after a clean close or a kill -9 (every write that reached a store stays,
as with a process crash over a page cache), with the copiers started before the
devices are added back, as the daemon does: every remote site must end equal to
the local devices (the replayed entries reach every site)."""

from __future__ import annotations

import threading

import pytest

from dmrepl.replicator import Replicator
from dmrepl_testing.replicator import FakeStore, Recorder, StoreSet, wait_for

DEV = 1 << 20
LOG_SECTORS = 4096
SLINKS = "blockdev 2 0 sync blockdev 4 1 async ios 100000"


def dev_line(prefix: str) -> str:
    return f"rep 0 0 1 {prefix}l nolog 0 1 1 {prefix}r core 2 16 nosync"


def new_stores(prefix: str, images: dict[str, bytes] | None = None,
               rec: Recorder | None = None) -> StoreSet:
    stores = StoreSet()
    for name, size in (("log", (LOG_SECTORS + 8) * 512), ("l", DEV), ("r", DEV)):
        data = None if images is None else images[name]
        stores.add(FakeStore(size, name=prefix + name, data=data, recorder=rec))
    return stores


def table(prefix: str, mode: str, slinks: str = SLINKS) -> str:
    return f"ringbuffer 4 {prefix}log 0 {mode} {LOG_SECTORS} {slinks}"


def block(i: int) -> bytes:
    return (b"W%07d" % i) * 512


def reopen_start_then_add(stores: StoreSet, prefix: str, slinks: str = SLINKS) -> None:
    rep = Replicator.from_table(table(prefix, "open", slinks), opener=stores.open,
                                persist_interval=0.002, retry_interval=0.01)
    try:
        assert rep.status_dict()["ring"]["replayed_at_open"] > 0
        # deterministic: what a copier with replayed entries to copy would do now,
        # before the device is back, is to wait for it (not to skip them as if
        # copied); a site that had persisted all of them has nothing to collect
        with rep.lock:
            pending = [s.nr for s in rep.slinks.values() if s.applied < rep.ring.durable_seq]
            assert pending, "no site has replayed entries to copy"
            for s in rep.slinks.values():
                expect = ([], "nodev") if s.nr in pending else ([], None)
                assert rep.copiers.collect_locked(s) == expect, f"slink {s.nr} skips entries"
        rep.start()  # the daemon starts the replicator, then adds its devices
        wait_for(lambda: all(t.thread is not None and t.thread.is_alive()
                             for t in rep.slinks.values()), "copiers")
        dev = rep.add_device(dev_line(prefix))
        assert rep.wait_drained(20), rep.status_dict()
        view = dev.read(0, DEV)
        st = rep.status_dict()["slinks"]
        assert all(s["lag_ios"] == 0 and s["lag_bytes"] == 0 for s in st.values()), st
    finally:
        rep.close()
    local = stores.stores[prefix + "l"].snapshot()
    remote = stores.stores[prefix + "r"].snapshot()
    assert local == view
    assert remote == local, "remote differs from local after reopen"


def test_clean_reopen_replays_to_every_site_when_started_before_devices() -> None:
    stores = new_stores("c")
    slinks = "blockdev 2 0 async blockdev 4 1 async ios 100000"
    rep = Replicator.from_table(table("c", "create", slinks), opener=stores.open)
    dev = rep.add_device(dev_line("c"))
    for i in range(6):  # not started: in the ring only
        dev.write(i * 4096, block(i))
    rep.close()
    reopen_start_then_add(stores, "c", slinks)
    assert stores.stores["cr"].snapshot()[:6 * 4096] == b"".join(block(i) for i in range(6))


@pytest.mark.parametrize("stuck", ["l", "r"])
def test_kill_9_with_a_copy_in_flight_then_reopen(stuck: str) -> None:
    """One site's copier is stuck in a device write when the process dies: the
    other site has the last writes, this one not.  After reopen + drain both equal."""
    prefix = f"k{stuck}"
    stores = new_stores(prefix)
    rep = Replicator.from_table(table(prefix, "create"), opener=stores.open,
                                persist_interval=0.002, retry_interval=0.01)
    dev = rep.add_device(dev_line(prefix))
    rep.start()
    for i in range(8):
        dev.write(i * 4096, block(i))
    assert rep.wait_drained(20)
    gated = stores.stores[prefix + stuck]
    gated.gate.clear()  # the next copy to this site blocks (in flight at the crash)
    writer = threading.Thread(target=lambda: [dev.write(i * 4096, block(i))
                                              for i in range(8, 12)], daemon=True)
    writer.start()
    if stuck == "l":  # local is sync: the writer waits at write 8, copied remotely
        wait_for(lambda: rep.status_dict()["slinks"][1]["applied_seq"] >= 9, "remote")
    else:  # the remote is async: every write is acknowledged and local
        writer.join(20)
        assert not writer.is_alive()
        wait_for(lambda: rep.status_dict()["slinks"][0]["applied_seq"] == 12, "local")
    # kill -9: what each store received stays; the dead process's threads are gone
    images = {name: stores.stores[prefix + name].snapshot() for name in ("log", "l", "r")}
    crashed = new_stores(prefix + "x", images)
    try:
        reopen_start_then_add(crashed, prefix + "x")
        assert crashed.stores[prefix + "xr"].snapshot()[:8 * 4096] == \
            b"".join(block(i) for i in range(8))
    finally:
        gated.gate.set()
        writer.join(20)
        rep.close()
