"""On-disk format of the ringbuffer log: layouts, CRCs, versions, open semantics,
and corruption (detected, never trusted)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.crc import crc32c, crc32c_py
from dmrepl.replicator import ondisk
from dmrepl.replicator.errors import ReplogCorrupt
from dmrepl.replicator.ondisk import FormatError
from dmrepl.replicator.ringlog import RingLog
from dmrepl.replicator.table import ReplogConfig
from dmrepl_testing.replicator import FakeStore

LOG_SECTORS = 4096


def test_crc32c_check_value_and_fallback_agree() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c_py(b"123456789") == 0xE3069283
    data = random.Random(1).randbytes(1000)
    assert crc32c(data) == crc32c_py(data)
    assert crc32c(data[500:], crc32c(data[:500])) == crc32c(data)


def test_structure_sizes() -> None:
    assert len(ondisk.build_log_header(1, 0)) == ondisk.SLOT
    assert len(ondisk.build_ring_header(log_id=1, epoch=1, generation=1, log_size=4096,
                                        head_pos=0, head_seq=1, slinks={0: 0})) == ondisk.SLOT
    hdr = ondisk.build_entry_header(log_id=1, epoch=1, seq=1, pos=0, dev=0, offset=0,
                                    length=0, data_crc=0, bitmap=ondisk.slink_bitmap({0}))
    assert len(hdr) == ondisk.ENTRY_HEADER_SIZE == 512
    assert ondisk.EntryHeaderBody.sizeof() + 4 <= 512
    assert ondisk.entry_size(1) == 1024 and ondisk.entry_size(512) == 1024
    assert ondisk.entry_size(4096, ondisk.ENTRY_FLAG_ZERO) == 512


@given(st.sets(st.integers(0, 2047), max_size=20))
@settings(deadline=None)
def test_slink_bitmap_round_trip(slinks: set[int]) -> None:
    assert ondisk.slinks_of_bitmap(ondisk.slink_bitmap(slinks)) == slinks


def _entry(**kw) -> bytes:
    args = dict(log_id=7, epoch=3, seq=9, pos=12288, dev=2, offset=4096, length=512,
                data_crc=123, bitmap=ondisk.slink_bitmap({0, 5}))
    args.update(kw)
    return ondisk.build_entry_header(**args)


def test_entry_header_round_trip_and_foreign_log() -> None:
    h = ondisk.parse_entry_header(_entry(), 7)
    assert (h["seq"], h["dev"], h["offset"], h["length"], h["epoch"]) == (9, 2, 4096, 512, 3)
    with pytest.raises(FormatError, match="another log"):
        ondisk.parse_entry_header(_entry(), 8)


STRUCTS = {
    "log": (lambda: ondisk.build_log_header(5, 0), lambda b: ondisk.parse_log_header(b),
            ondisk.LogHeaderBody.sizeof() + 4),
    "ring": (lambda: ondisk.build_ring_header(log_id=5, epoch=2, generation=3, log_size=4096,
                                              head_pos=12288, head_seq=4, slinks={0: 3, 1: 2}),
             lambda b: ondisk.parse_ring_header(b, 5), 8 + 2 + 2 + 4 + 8 * 5 + 2 + 12 * 2 + 4),
    "entry": (lambda: _entry(log_id=5), lambda b: ondisk.parse_entry_header(b, 5),
              ondisk.EntryHeaderBody.sizeof() + 4),
    "entry (construct)": (lambda: _entry(log_id=5),
                          lambda b: ondisk.parse_entry_header_construct(b, 5),
                          ondisk.EntryHeaderBody.sizeof() + 4),
}


@pytest.mark.parametrize("name", sorted(STRUCTS))
@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_bit_flip_in_a_header_is_detected(name: str, data: st.DataObject) -> None:
    build, parse, covered = STRUCTS[name]
    raw = bytearray(build())
    parse(bytes(raw))
    bit = data.draw(st.integers(0, covered * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FormatError):
        parse(bytes(raw))


def _with_version(raw: bytes, major: int, minor: int, fmt) -> bytes:
    obj = fmt.parse(raw)
    value = dict(obj.body.value)
    value.pop("_io", None)
    value["major"], value["minor"] = major, minor
    return fmt.build(dict(body=dict(value=value))).ljust(len(raw), b"\0")


def test_version_check_accepts_same_and_older_minor_only() -> None:
    raw = ondisk.build_log_header(5, 0)
    ondisk.parse_log_header(_with_version(raw, ondisk.FORMAT_MAJOR, 0, ondisk.LogHeader))
    with pytest.raises(FormatError, match="unsupported format version"):
        ondisk.parse_log_header(_with_version(raw, ondisk.FORMAT_MAJOR,
                                              ondisk.FORMAT_MINOR + 1, ondisk.LogHeader))
    with pytest.raises(FormatError, match="unsupported format version"):
        ondisk.parse_log_header(_with_version(raw, ondisk.FORMAT_MAJOR + 1, 0,
                                              ondisk.LogHeader))


# -- the ring on a store ------------------------------------------------------------

def new_store() -> FakeStore:
    return FakeStore((LOG_SECTORS + 16) * 512, name="log")


def open_ring(store: FakeStore, mode: str = "open") -> RingLog:
    ring = RingLog(store, ReplogConfig("log", 0, mode, LOG_SECTORS if mode != "open" else None))
    ring.open()
    return ring


def append(ring: RingLog, dev: int, offset: int, data: bytes) -> int:
    with ring.lock:
        e = ring.reserve(dev, offset, len(data), frozenset({0, 1}), data)
    assert e is not None
    ring.write_entry(e, data)
    ring.commit(e.seq)
    return e.seq


def contents(ring: RingLog) -> list[tuple[int, int, int, bytes]]:
    return [(e.seq, e.dev, e.offset, ring.entry_data(e)) for e in ring.entries]


def test_create_append_reopen_replays_entries() -> None:
    store = new_store()
    ring = open_ring(store, "create")
    written = [(append(ring, i % 3, i * 512, bytes([i]) * 1024), i % 3, i * 512,
                bytes([i]) * 1024) for i in range(20)]
    ring2 = open_ring(store)
    assert contents(ring2) == written
    assert ring2.epoch == ring.epoch + 1
    assert ring2.next_seq == 21


def test_open_modes() -> None:
    store = new_store()
    with pytest.raises(ReplogCorrupt):
        open_ring(store, "open")  # nothing there
    ring = open_ring(store, "auto")  # creates
    assert ring.created
    append(ring, 0, 0, b"x" * 512)
    again = open_ring(store, "auto")  # opens
    assert not again.created and len(again.entries) == 1
    fresh = open_ring(store, "create")  # re-initialises
    assert fresh.created and not fresh.entries
    assert not open_ring(store, "open").entries  # old entries belong to another log id


def test_corrupt_log_header_refuses_open() -> None:
    store = new_store()
    append(open_ring(store, "create"), 0, 0, b"x" * 512)
    store.data[20] ^= 0x40
    with pytest.raises(ReplogCorrupt, match="CRC"):
        open_ring(store, "open")


def test_one_torn_ring_header_slot_falls_back_to_the_other() -> None:
    store = new_store()
    ring = open_ring(store, "create")
    append(ring, 0, 0, b"a" * 512)
    ring.persist({0: 0, 1: 0})
    newest = ondisk.RING_HEADER_OFFSETS[ring.generation % 2]
    store.data[newest + 30] ^= 1
    r2 = open_ring(store)
    assert [e.seq for e in r2.entries] == [1]
    for off in ondisk.RING_HEADER_OFFSETS:
        store.data[off + 30] ^= 2
    with pytest.raises(ReplogCorrupt, match="no valid ring header"):
        open_ring(store)


def test_corrupt_entry_data_is_reported_lost_and_the_replay_goes_on() -> None:
    # issue 10 (2): the entries after a damaged durable one were dropped silently
    store = new_store()
    ring = open_ring(store, "create")
    for i in range(5):
        append(ring, 0, i * 512, bytes([65 + i]) * 512)
    third = ring.entries[2]
    store.data[third.pos + 512 + 100] ^= 0xFF
    r2 = open_ring(store)
    assert [(e.seq, e.lost) for e in r2.entries] == [
        (1, False), (2, False), (3, True), (4, False), (5, False)]
    assert r2.next_seq == 6
    assert r2.lost_regions == [(0, 1024, 1536)] and not r2.lost_whole
    assert (r2.lost["entries"], r2.lost["first_seq"], r2.lost["last_seq"]) == (1, 3, 3)


def test_torn_write_in_flight_ends_the_replay_without_a_report() -> None:
    store = new_store()
    ring = open_ring(store, "create")
    append(ring, 0, 0, b"a" * 512)
    with ring.lock:  # two writes in flight together (one group commit)
        e2 = ring.reserve(0, 512, 512, frozenset({0}), b"b" * 512)
        e3 = ring.reserve(0, 1024, 512, frozenset({0}), b"c" * 512)
    assert e2 is not None and e3 is not None
    ring.write_entry(e2, b"b" * 512)
    ring.write_entry(e3, b"c" * 512)
    store.data[e2.pos + 512] ^= 1  # the crash tore the first one
    r2 = open_ring(store)
    assert [e.seq for e in r2.entries] == [1]
    assert r2.lost["entries"] == 0 and not r2.lost_regions and not r2.lost_whole


def test_stale_entry_from_before_a_crash_is_not_replayed() -> None:
    store = new_store()
    ring = open_ring(store, "create")
    append(ring, 0, 0, b"a" * 512)  # seq 1
    with ring.lock:  # seq 2 (will be cut off) and 3 in flight together
        e2 = ring.reserve(0, 512, 512, frozenset({0, 1}), b"b" * 512)
        e3 = ring.reserve(0, 1024, 512, frozenset({0, 1}), b"c" * 512)
    assert e2 is not None and e3 is not None
    ring.write_entry(e2, b"b" * 512)
    ring.write_entry(e3, b"c" * 512)  # seq 3 stays on disk after seq 2 is torn
    pos2 = e2.pos
    store.data[pos2 + 40] ^= 1  # seq 2's header torn: replay stops at 1
    r2 = open_ring(store)
    assert [e.seq for e in r2.entries] == [1]
    # the next incarnation writes seq 2 with the same size at the same place, then
    # crashes: the old seq 3 right after it must not come back
    append(r2, 0, 2048, b"z" * 512)
    r3 = open_ring(store)
    assert [(e.seq, e.offset) for e in r3.entries] == [(1, 0), (2, 2048)]


def test_wrap_around_and_release() -> None:
    store = new_store()
    ring = open_ring(store, "create")
    rng = random.Random(3)
    live: list[tuple[int, int, int, bytes]] = []
    for i in range(1500):
        data = rng.randbytes(rng.randint(1, 24) * 512)
        with ring.lock:
            e = ring.reserve(0, i * 512, len(data), frozenset({0}), data)
        if e is None:
            # release everything but the last 3 entries and retry
            keep = ring.entries[-3].seq - 1
            ring.persist({0: keep})
            live = [x for x in live if x[0] > keep]
            with ring.lock:
                e = ring.reserve(0, i * 512, len(data), frozenset({0}), data)
            assert e is not None
        ring.write_entry(e, data)
        ring.commit(e.seq)
        live.append((e.seq, 0, i * 512, data))
    assert ring.stats["header_writes"] > 3
    r2 = open_ring(store)
    assert contents(r2) == live


def test_resize_grow_and_refused_shrink() -> None:
    store = FakeStore((3 * LOG_SECTORS) * 512, name="log")
    ring = open_ring(store, "create")
    ring.resize(2 * LOG_SECTORS)
    assert ring.log_size == 2 * LOG_SECTORS
    for _i in range(3000):
        with ring.lock:
            e = ring.reserve(0, 0, 512, frozenset({0}), b"q" * 512)
        assert e is not None
        ring.write_entry(e, b"q" * 512)
        if ring.tail_pos > LOG_SECTORS * 512 + 4096:
            break
    ring.commit(ring.next_seq - 1)
    from dmrepl.replicator.errors import TableError
    with pytest.raises(TableError, match="beyond the new end"):
        ring.resize(LOG_SECTORS)
    r2 = open_ring(store)
    assert r2.log_size == 2 * LOG_SECTORS and len(r2.entries) == len(ring.entries)


@given(st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 255)), min_size=1,
                max_size=6))
@settings(max_examples=120, deadline=None)
def test_random_corruption_never_yields_wrong_data(flips: list[tuple[int, int]]) -> None:
    store = new_store()
    ring = open_ring(store, "create")
    rng = random.Random(len(flips))
    written = []
    for i in range(30):
        data = rng.randbytes(rng.randint(1, 8) * 512)
        written.append((append(ring, i % 2, i * 4096, data), i % 2, i * 4096, data))
    for off, val in flips:
        store.data[off] ^= val | 1
    try:
        r2 = open_ring(store)
    except ReplogCorrupt:
        return
    got = contents(r2)
    # byte for byte what was written, lost entries (reported) left out
    assert [x for x, e in zip(got, r2.entries, strict=True) if not e.lost] == \
        [w for w, e in zip(written, r2.entries, strict=False) if not e.lost]


def test_large_entries_write_data_and_crc_in_parallel() -> None:
    store = FakeStore((LOG_SECTORS + 16) * 512, name="log")
    ring = open_ring(store, "create")
    rng = random.Random(4)
    big = [rng.randbytes(256 << 10) for _ in range(3)]
    written = [(append(ring, 0, i << 18, b), 0, i << 18, b) for i, b in enumerate(big)]
    ring.close()
    r2 = open_ring(store)
    assert contents(r2) == written
    store.data[r2.entries[1].pos + 512 + 5000] ^= 1  # data of the 2nd entry
    assert [(e.seq, e.lost) for e in open_ring(store).entries] == [
        (1, False), (2, True), (3, False)]


u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (16, 32, 64))


@settings(max_examples=200)
@given(flags=u16, epoch=u32, log_id=u64, seq=u64, pos=u64, dev=u32, length=u32,
       offset=u64, crc=u32, slinks=st.frozensets(st.integers(0, 2047), max_size=8))
def test_fast_entry_header_is_the_declared_layout(flags, epoch, log_id, seq, pos, dev,
                                                  length, offset, crc, slinks) -> None:
    """The hot-path packer (generated from the construct declaration) builds the
    same bytes as construct, and construct parses them back."""
    kw = dict(log_id=log_id, epoch=epoch, seq=seq, pos=pos, dev=dev, offset=offset,
              length=length, data_crc=crc, bitmap=ondisk.slink_bitmap(slinks), flags=flags)
    fast = ondisk.build_entry_header(**kw)
    assert fast == ondisk.build_entry_header_construct(**kw)
    h = ondisk.parse_entry_header(fast, log_id)
    assert (h["seq"], h["offset"], h["flags"], h["data_crc"]) == (seq, offset, flags, crc)
    # the hot-path parser reads every field as construct does
    slow = ondisk.parse_entry_header_construct(fast, log_id)
    slow.pop("_io", None)
    assert h == slow


@given(raw=st.binary(min_size=0, max_size=ondisk.ENTRY_HEADER_SIZE),
       log_id=st.sampled_from([5, 6]), cut=st.integers(0, ondisk.ENTRY_HEADER_SIZE))
def test_both_entry_header_parsers_refuse_the_same_bytes(raw: bytes, log_id: int,
                                                         cut: int) -> None:
    """Garbage, a header cut short, or one of another log: refused by both, or read
    alike by both."""
    def outcome(parse, data: bytes):
        try:
            h = parse(data, log_id)
        except FormatError:
            return "refused"
        h.pop("_io", None)
        return h
    for data in (raw, _entry(log_id=5)[:cut], _entry(log_id=5)):
        assert outcome(ondisk.parse_entry_header, data) == \
            outcome(ondisk.parse_entry_header_construct, data)


def test_flat_packer_refuses_what_it_cannot_pack() -> None:
    with pytest.raises(TypeError):
        ondisk.FlatPacker(ondisk.RingHeaderBody)  # a prefixed array: not flat


def test_positional_packer_takes_exactly_the_declared_fields() -> None:
    packer = ondisk.FlatPacker(ondisk.EntryHeaderBody)
    names = [f for f in packer.fields if f not in packer.consts]
    for bad in (names[:-1], [*names, names[0]], [*names[:-1], "nonsense"]):
        with pytest.raises(TypeError, match="exactly the fields"):
            packer.positional(*bad)
    values = {n: (b"\x07" * 256 if n == "slinks" else i + 1) for i, n in enumerate(names)}
    shuffled = list(reversed(names))
    assert packer.positional(*shuffled)(*(values[n] for n in shuffled)) == \
        ondisk.EntryHeaderBody.build(values)


# -- durable lone writes (RWF_DSYNC) ------------------------------------------------

def _reserve(ring: RingLog, data: bytes):
    with ring.lock:
        e = ring.reserve(0, 0, len(data), frozenset({0}), data)
    assert e is not None
    return e


def test_lone_durable_write_needs_no_flush() -> None:
    store = new_store()
    ring = open_ring(store, "create")
    flushes = store.flushes
    e = _reserve(ring, b"a" * 4096)
    ring.write_entry(e, b"a" * 4096, durable=True)
    assert ring.durable_seq == e.seq and store.durable_writes == 1
    ring.commit(e.seq)  # nothing left to do
    assert store.flushes == flushes and ring.stats["log_flushes"] == 0
    assert ring.stats["durable_writes"] == 1
    assert ring.epoch_end(e.seq) == e.seq  # a group of one
    assert contents(open_ring(store)) == [(e.seq, 0, 0, b"a" * 4096)]


def test_durable_write_behind_an_undurable_one_keeps_the_group_commit() -> None:
    """An entry behind one that is written but not durable is no lone writer: its
    own durable write would not make the earlier one durable, so neither may count
    as durable before the log flush."""
    store = new_store()
    ring = open_ring(store, "create")
    e1 = _reserve(ring, b"1" * 512)
    e2 = _reserve(ring, b"2" * 512)
    ring.write_entry(e1, b"1" * 512)  # written, not committed
    ring.write_entry(e2, b"2" * 512, durable=True)
    assert ring.durable_seq == 0 and store.durable_writes == 0
    ring.commit(e2.seq)
    assert ring.durable_seq == e2.seq and ring.stats["log_flushes"] == 1


def test_large_lone_write_is_one_durable_write() -> None:
    store = new_store()
    ring = open_ring(store, "create")
    data = bytes(range(256)) * 1024  # 256 KiB: past the parallel data write size
    e = _reserve(ring, data)
    ring.write_entry(e, data, durable=True)
    assert store.durable_writes == 1 and ring.durable_seq == e.seq
    assert contents(open_ring(store)) == [(e.seq, 0, 0, data)]


def test_file_store_durable_write(tmp_path) -> None:
    from dmrepl.replicator.store import FileStore
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    st = FileStore(str(path))
    fallback = FileStore(str(path), dsync=False)  # a file system without RWF_DSYNC
    try:
        st.pwritev_durable(512, [b"h" * 512, b"d" * 1024])
        fallback.pwritev_durable(4096, [b"x" * 512])
    finally:
        st.close()
        fallback.close()
    raw = path.read_bytes()
    assert raw[512:1024] == b"h" * 512 and raw[1024:2048] == b"d" * 1024
    assert raw[4096:4608] == b"x" * 512 and len(raw) == 8192


def test_history_from_ring_rebuilds_large_entries_written_in_two_parts() -> None:
    """Entries from 128 KiB on are written as header + data (two writes, in either
    order); the test helper rebuilding the history must pair them up."""
    from dmrepl_testing.replicator import Recorder, history_from_ring
    rec = Recorder()
    store = FakeStore((LOG_SECTORS + 16) * 512, name="log", recorder=rec)
    ring = open_ring(store, "create")
    writes = [(0, 0, bytes([1]) * (256 << 10)), (0, 4096, b"s" * 4096),
              (1, 8192, bytes([2]) * (128 << 10)), (0, 0, bytes([3]) * (192 << 10))]
    for dev, offset, data in writes:
        with ring.lock:
            e = ring.reserve(dev, offset, len(data), frozenset({0}), data)
        assert e is not None
        ring.write_entry(e, data)
        ring.commit(e.seq)
    assert store.durable_writes == 0  # every large one took the two-part path
    assert history_from_ring(rec, "log") == writes


def test_written_and_commit_ready_follow_the_entries_writes() -> None:
    """A reserved entry is not written (its data undefined to readers) and holds
    back the group commit of every entry after it until its own write is done."""
    ring = open_ring(new_store(), "create")
    with ring.lock:
        first = ring.reserve(0, 0, 512, frozenset({0}), b"a" * 512)
        second = ring.reserve(0, 512, 512, frozenset({0}), b"b" * 512)
    assert first is not None and second is not None
    with ring.lock:
        assert not ring.written_locked(first.seq) and not ring.written_locked(second.seq)
        assert ring.commit_ready_locked() is None
    ring.write_entry(second, b"b" * 512)
    with ring.lock:
        assert ring.written_locked(second.seq)
        assert ring.commit_ready_locked() is None  # the first is still being written
    ring.write_entry(first, b"a" * 512)
    with ring.lock:
        assert ring.written_locked(first.seq)
        assert ring.commit_ready_locked() == second.seq
    ring.commit(second.seq)
    with ring.lock:
        assert ring.commit_ready_locked() is None  # nothing left to commit
    ring.close()
