"""Issue 10 (1, 2): a damaged replication log is never silently replaced, and a
replay never drops durable (acknowledged) entries without saying so."""

from __future__ import annotations

import json

import pytest

from dmrepl.replicator import Replicator, ondisk
from dmrepl.replicator.errors import ReplogCorrupt
from dmrepl.replicator.ringlog import RingLog
from dmrepl.replicator.table import ReplogConfig
from dmrepl_testing.replicator import FakeStore, StoreSet

LOG_SECTORS = 4096
LOG_BYTES = (LOG_SECTORS + 16) * 512


def open_ring(store: FakeStore, mode: str) -> RingLog:
    ring = RingLog(store, ReplogConfig("log", 0, mode, LOG_SECTORS))
    ring.open()
    return ring


def log_with_an_entry() -> FakeStore:
    store = FakeStore(LOG_BYTES, name="log")
    ring = open_ring(store, "create")
    with ring.lock:
        e = ring.reserve(0, 0, 512, frozenset({0}), b"x" * 512)
    assert e is not None
    ring.write_entry(e, b"x" * 512)
    ring.commit(e.seq)
    ring.persist({0: 0})  # both ring header slots written
    return store


def flip(store: FakeStore, offset: int) -> None:
    store.data[offset] ^= 0x10


def shift(store: FakeStore, by: int) -> None:
    area = bytes(store.data[:ondisk.RING_OFFSET])
    store.data[:ondisk.RING_OFFSET] = (bytes(by) + area)[:ondisk.RING_OFFSET]


def set_log_version(store: FakeStore, major: int, minor: int) -> None:
    raw = bytes(store.data[:ondisk.SLOT])
    value = dict(ondisk.LogHeader.parse(raw).body.value)
    value.pop("_io", None)
    value["major"], value["minor"] = major, minor
    new = ondisk.LogHeader.build(dict(body=dict(value=value)))
    store.data[:len(new)] = new


DAMAGE = {
    "log header checksum": (lambda s: flip(s, 40), ["log header", "checksum"]),
    "log header signature": (lambda s: flip(s, 3), ["log header", "no signature"]),
    "ring header A and B": (lambda s: (flip(s, ondisk.RING_HEADER_OFFSETS[0] + 30),
                                       flip(s, ondisk.RING_HEADER_OFFSETS[1] + 30)),
                            ["ring header", "A: ring header: checksum",
                             "B: ring header: checksum"]),
    "unknown version": (lambda s: set_log_version(s, ondisk.FORMAT_MAJOR + 1, 0),
                        ["log header", "version 2.0"]),
    "newer minor": (lambda s: set_log_version(s, ondisk.FORMAT_MAJOR,
                                              ondisk.FORMAT_MINOR + 1),
                    ["log header", "version"]),
    # the header area shifted by a byte: no signature where the format keeps one,
    # but our signatures are still there (found by the ring-image fuzz run)
    "header area shifted": (lambda s: shift(s, 1), ["log header: no signature"]),
}


@pytest.mark.parametrize("mode", ["auto", "open"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_log_is_refused_naming_the_damage_and_create(mode: str,
                                                               damage: str) -> None:
    store = log_with_an_entry()
    harm, words = DAMAGE[damage]
    harm(store)
    before = store.snapshot()
    with pytest.raises(ReplogCorrupt) as err:
        open_ring(store, mode)
    for word in [*words, "not opened", "'create'"]:
        assert word in str(err.value)
    assert store.snapshot() == before  # nothing written
    fresh = open_ring(store, "create")  # the explicit way to discard it
    assert fresh.created and not fresh.entries


def test_a_device_shorter_than_the_headers_with_our_signature_is_refused() -> None:
    whole = log_with_an_entry().snapshot()
    short = FakeStore(ondisk.RING_OFFSET - 1024, name="log",
                      data=whole[:ondisk.RING_OFFSET - 1024])
    with pytest.raises(ReplogCorrupt, match="size: .*shorter than the 12288 bytes"
                                            r".*log header.*'create'"):
        open_ring(short, "auto")


def test_auto_creates_on_a_blank_device_and_opens_a_good_log() -> None:
    blank = FakeStore(LOG_BYTES, name="log")
    assert open_ring(blank, "auto").created
    store = log_with_an_entry()
    again = open_ring(store, "auto")
    assert not again.created and [e.seq for e in again.entries] == [1]
    tiny = FakeStore(4096, name="log")  # blank and short: nothing of ours to refuse
    with pytest.raises(Exception, match="too small"):
        open_ring(tiny, "auto")  # creating needs more room than a FakeStore has


# -- replay past a lost entry (engine) ----------------------------------------------

DEV = 64 << 10
TABLE = (f"0 1 replicator ringbuffer 4 log 0 auto {LOG_SECTORS} "
         "blockdev 2 0 async blockdev 2 1 async")
DEVICE = f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 1 1 r1 core 2 8 nosync"
REGION = 8 * 512


def stores() -> StoreSet:
    ss = StoreSet()
    ss.add(FakeStore(LOG_BYTES, name="log"))
    ss.add(FakeStore(DEV, name="l0"))
    ss.add(FakeStore(DEV, name="r1"))
    return ss


def write_unstarted(ss: StoreSet, n: int) -> list[tuple[int, int]]:
    """n writes, one region each, logged but never copied (the copiers never start);
    returns each entry's (position in the log, device offset)."""
    rep = Replicator.from_table(TABLE, opener=ss.open)
    dev = rep.add_device(DEVICE)
    for i in range(n):
        dev.write(i * REGION, bytes([65 + i]) * 512)
    where = [(e.pos, e.offset) for e in rep.ring.entries]
    rep.close()
    return where


def reopen(ss: StoreSet) -> tuple[Replicator, object]:
    rep = Replicator.from_table(TABLE, opener=ss.open, persist_interval=0.002)
    return rep, rep.add_device(DEVICE)


def out_of_sync_regions(rep: Replicator) -> set[int]:
    leg = rep.devices[0].legs[1]
    return {r for r in range(leg.dlog.region_count) if not leg.dlog.in_sync(r)}


def test_undamaged_log_reports_nothing() -> None:
    ss = stores()
    write_unstarted(ss, 5)
    rep, _dev = reopen(ss)
    try:
        assert "ERROR" not in rep.status()
        detail = rep.status_dict()
        assert detail["errors"] == [] and detail["ring"]["acknowledged_writes_lost"] is None
        assert out_of_sync_regions(rep) == set()
    finally:
        rep.close()


def test_lost_entry_is_marked_reported_survives_reopen_and_clears(caplog) -> None:
    ss = stores()
    where = write_unstarted(ss, 5)
    pos, offset = where[2]  # entry 3: its data damaged, 4 and 5 intact after it
    ss.stores["log"].data[pos + 512 + 7] ^= 1
    with caplog.at_level("ERROR", logger="dmrepl.replicator"):
        rep, dev = reopen(ss)
    try:
        assert "acknowledged writes lost" in caplog.text
        # and on the event stream, as an error
        [lost] = [x for x in rep.events.subscribe(after=0).read(0) or []
                  if x["kind"] == "error"]
        assert (lost["kind"], lost["event"], lost["entries"]) == ("error", "lost-writes", 1)
        # the lost entry's region is out of sync for the remote site link
        assert out_of_sync_regions(rep) == {offset // REGION}
        text = rep.status()
        assert text.split()[-1] == "ERROR:acknowledged_writes_lost=1:3-3"
        detail = json.loads(json.dumps(rep.status_dict()))
        assert detail["ring"]["acknowledged_writes_lost"]["entries"] == 1
        assert any("replog clear_lost" in e for e in detail["errors"])
        # the intact entries after the lost one are replayed, not dropped
        rep.start()
        assert rep.wait_drained(20)
        for i in (0, 1, 3, 4):
            assert dev.read(i * REGION, 512) == bytes([65 + i]) * 512
        assert ss.stores["r1"].snapshot() == ss.stores["l0"].snapshot()
    finally:
        rep.close()
    rep, _dev = reopen(ss)  # the report survives a restart
    try:
        assert "ERROR:acknowledged_writes_lost=1:3-3" in rep.status()
        assert rep.message(["replog", "clear_lost"]) == ""
        assert "ERROR" not in rep.status() and rep.status_dict()["errors"] == []
        with pytest.raises(Exception, match="no lost acknowledged writes"):
            rep.message(["replog", "clear_lost"])
    finally:
        rep.close()
    rep, _dev = reopen(ss)  # cleared stays cleared
    try:
        assert "ERROR" not in rep.status()
    finally:
        rep.close()


def test_lost_entry_with_an_unreadable_header_marks_the_whole_device() -> None:
    ss = stores()
    where = write_unstarted(ss, 5)
    pos, _offset = where[1]
    ss.stores["log"].data[pos + 60] ^= 1  # entry 2's header: its region is unknown
    rep, _dev = reopen(ss)
    try:
        leg = rep.devices[0].legs[1]
        assert out_of_sync_regions(rep) == set(range(leg.dlog.region_count))
        assert rep.status_dict()["ring"]["acknowledged_writes_lost"]["whole_devices"]
        assert "ERROR:acknowledged_writes_lost=1:2-2" in rep.status()
    finally:
        rep.close()
