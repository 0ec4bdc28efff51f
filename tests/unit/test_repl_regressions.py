"""Regressions found through the daemon: ring full with a site link down holding
unflushed copies, lag counters after a reopen, writes bigger than the ring."""

from __future__ import annotations

import threading

import pytest

from dmrepl.replicator import ReplicatedDevice, Replicator
from dmrepl_testing.replicator import FakeStore, StoreSet, run_with_deadline, wait_for

DEV = 8 << 20
LOG_SECTORS = 4096  # a 2 MiB log

def write_past_the_log(dev: ReplicatedDevice, model: bytearray) -> None:
    """5 MiB of 64 KiB writes from 1 MiB on, through the 2 MiB log, kept in ``model``."""
    for i in range(80):
        off = (1 << 20) + i * 65536
        data = bytes([i + 10]) * 65536
        dev.write(off, data)
        model[off:off + len(data)] = data



def make(slinks: str = "blockdev 2 0 async blockdev 2 1 async", mode: str = "create",
         stores: StoreSet | None = None, devices: bool = True,
         **tuning) -> tuple[Replicator, StoreSet]:
    if stores is None:
        stores = StoreSet()
        stores.add(FakeStore((LOG_SECTORS + 8) * 512, name="log"))
        stores.add(FakeStore(DEV, name="l"))
        stores.add(FakeStore(DEV, name="r"))
    tuning.setdefault("retry_interval", 0.01)
    rep = Replicator.from_table(f"ringbuffer 4 log 0 {mode} {LOG_SECTORS} {slinks}",
                                opener=stores.open, **tuning)
    if devices:
        rep.add_device(DEV_LINE)
    return rep, stores


DEV_LINE = f"rep 0 0 1 l nolog 0 1 1 r core 2 {64 << 10 >> 9} nosync"


def test_down_slink_with_applied_but_unflushed_entries_is_dropped_when_full() -> None:
    """Slink 1 applied entries it never flushed, then went down: its durable
    position holds the ring head.  Writers must not wait forever: the link is
    dropped to its dirty log (the unflushed entries included), then resynced."""
    rep, stores = make(persist_interval=3600.0)  # no periodic flush of the copies
    dev = rep.devices[0]
    remote = stores.stores["r"]
    try:
        rep.start()
        for i in range(4):
            dev.write(i * 65536, bytes([i + 1]) * 4096)
        wait_for(lambda: rep.status_dict()["slinks"][1]["applied_seq"] == 4, "copies")
        st = rep.status_dict()["slinks"][1]
        assert st["durable_seq"] < st["applied_seq"]
        remote.fail_writes = remote.fail_reads = True  # down until the end
        model = bytearray(stores.stores["l"].snapshot())
        for i in range(4):
            model[i * 65536:i * 65536 + 4096] = bytes([i + 1]) * 4096

        run_with_deadline(lambda: write_past_the_log(dev, model),
                          "writers with a down slink holding the ring head")
        st = rep.status_dict()["slinks"][1]
        assert st["state"] == "down" and st["drops"] >= 1 and not st["consistent"]
        # the regions of the applied-but-unflushed entries are out of sync too
        leg = rep.devices[0].legs[1]
        for i in range(4):
            assert not leg.dlog.in_sync(i * 65536 // (leg.dlog.region_size * 512))
        assert st["lag_ios"] >= 0 and st["lag_bytes"] >= 0
        remote.fail_writes = remote.fail_reads = False
        assert rep.wait_drained(30), rep.status_dict()["slinks"]
        assert remote.snapshot() == bytes(model) == dev.read(0, DEV)
    finally:
        rep.close()


def test_lag_counters_are_rebuilt_on_open_and_never_negative() -> None:
    rep, stores = make()
    dev = rep.devices[0]
    for i in range(5):  # not started: nothing copied
        dev.write(i * 8192, bytes([i + 1]) * 8192)
    rep.close()
    rep, _ = make(mode="open", stores=stores)
    try:
        for nr in (0, 1):
            st = rep.status_dict()["slinks"][nr]
            assert (st["lag_ios"], st["lag_bytes"]) == (5, 5 * 8192), (nr, st)
        rep.start()
        assert rep.wait_drained(20)
        for nr in (0, 1):
            st = rep.status_dict()["slinks"][nr]
            assert (st["lag_ios"], st["lag_bytes"]) == (0, 0), (nr, st)
        assert rep.status().split()[:2] == ["A,0,0", "A,0,0"]
    finally:
        rep.close()


@pytest.mark.parametrize("slinks,durable_acks", [
    ("blockdev 2 0 async blockdev 2 1 async", True),
    ("blockdev 2 0 sync blockdev 2 1 sync", True),
    ("blockdev 2 0 async blockdev 2 1 async", False),
])
def test_write_of_three_times_the_ring_completes_and_replicates(
        slinks: str, durable_acks: bool) -> None:
    rep, stores = make(slinks, durable_acks=durable_acks, persist_interval=0.01)
    dev = rep.devices[0]
    try:
        rep.start()
        ring = rep.status_dict()["ring"]["ring_bytes"]
        n = 3 * ring // 512 * 512
        data = bytes((i * 7) & 0xFF for i in range(4096)) * (n // 4096 + 1)
        data = data[:n]
        run_with_deadline(lambda: dev.write(1024, data), "write of 3x the ring")
        assert dev.read(1024, n) == data
        assert rep.wait_drained(20)
        assert stores.stores["r"].snapshot()[1024:1024 + n] == data
        assert stores.stores["l"].snapshot()[1024:1024 + n] == data
    finally:
        rep.close()


def test_drained_counts_entries_not_yet_committed() -> None:
    """Without durable_acks a write returns before its entries are committed (a
    copier commits them later) and the copiers apply only committed entries:
    drained() must not compare with the durable position alone, else it is True
    while the last writes are at no site (the ring-sized write test was flaky)."""
    rep, stores = make(durable_acks=False, persist_interval=0.01)
    dev = rep.devices[0]
    try:
        dev.write(0, b"x" * 4096)  # copiers not started: nothing commits it
        assert rep.ring.durable_seq < rep.ring.next_seq - 1
        assert not rep.drained()
        assert not rep.wait_drained(0.05)
        rep.start()
        assert rep.wait_drained(20)
        assert stores.stores["r"].snapshot()[:4096] == b"x" * 4096
        assert stores.stores["l"].snapshot()[:4096] == b"x" * 4096
    finally:
        rep.close()


def test_drop_releases_the_ring_when_the_other_links_are_idle() -> None:
    """The drop itself must persist the new position: here slink 0 has copied and
    persisted everything before the drop, so nobody else writes the ring header.
    (``stall`` holds the writers while slink 1 is down; then it is released.)"""
    rep, stores = make("blockdev 2 0 async blockdev 2 1 async+stall",
                       persist_interval=3600.0)
    dev = rep.devices[0]
    remote = stores.stores["r"]
    model = bytearray(DEV)
    try:
        rep.start()
        dev.write(0, b"a" * 4096)
        wait_for(lambda: rep.status_dict()["slinks"][1]["applied_seq"] == 1, "copy")
        remote.fail_writes = remote.fail_reads = True  # down until the end
        model[:4096] = b"a" * 4096
        done = threading.Event()

        def fill() -> None:
            write_past_the_log(dev, model)
            done.set()

        t = threading.Thread(target=fill, daemon=True)
        t.start()
        # the writers wait (stall) until slink 0 has persisted all it copied
        wait_for(lambda: (lambda st: st["slinks"][1]["state"] == "down"
                          and st["slinks"][0]["persisted_seq"] == st["ring"]["durable_seq"]
                          and st["ring"]["used_bytes"] > st["ring"]["ring_bytes"] // 2)(
                              rep.status_dict()), "stalled writers, idle slink 0")
        assert not done.is_set()
        rep.message(["slink", "message", "1", "policy", "async"])
        t.join(30)
        assert done.is_set(), ("writers still blocked after the drop", rep.status_dict())
        remote.fail_writes = remote.fail_reads = False
        assert rep.wait_drained(30), rep.status_dict()["slinks"]
        assert remote.snapshot() == bytes(model) == dev.read(0, DEV)
    finally:
        remote.fail_writes = remote.fail_reads = False
        rep.close()
