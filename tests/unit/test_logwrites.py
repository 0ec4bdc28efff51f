"""The log-writes log format: the construct declarations agree with the C ones,
and a log as the kernel lays it out parses back into its entries."""

from __future__ import annotations

import pytest

from cdefs import logwrites as c
from dmrepl.dm import logwrites as lw

S = 512


def test_the_declarations_agree_with_the_c_structs() -> None:
    for struct, decl in (("log_write_super", lw.LOG_WRITE_SUPER),
                         ("log_write_entry", lw.LOG_WRITE_ENTRY)):
        offset = 0
        for sub in decl.subcons:
            assert c.ffi.offsetof(f"struct {struct}", sub.name) == offset, (struct, sub.name)
            offset += sub.sizeof()
        align = c.ffi.alignof(f"struct {struct}")
        assert c.ffi.sizeof(f"struct {struct}") == -(-decl.sizeof() // align) * align
    lib = c.ffi.dlopen(None)
    assert (lib.WRITE_LOG_MAGIC, lib.WRITE_LOG_VERSION) == (lw.LOG_MAGIC, lw.LOG_VERSION)
    assert (lib.LOG_FLUSH_FLAG, lib.LOG_FUA_FLAG, lib.LOG_DISCARD_FLAG, lib.LOG_MARK_FLAG,
            lib.LOG_METADATA_FLAG) == (lw.FLAG_FLUSH, lw.FLAG_FUA, lw.FLAG_DISCARD,
                                       lw.FLAG_MARK, lw.FLAG_METADATA)


def block(raw: bytes) -> bytes:
    return raw + bytes(-len(raw) % S)


def entry(sector: int, nr: int, flags: int, data: bytes = b"", mark: bytes = b"") -> bytes:
    head = lw.LOG_WRITE_ENTRY.build({"sector": sector, "nr_sectors": nr, "flags": flags,
                                     "data_len": len(mark) if mark else len(data)})
    return block(head + mark) + data


def log(*entries: bytes, nr: int | None = None) -> bytes:
    sup = lw.LOG_WRITE_SUPER.build({"magic": lw.LOG_MAGIC, "version": lw.LOG_VERSION,
                                    "nr_entries": len(entries) if nr is None else nr,
                                    "sectorsize": S})
    return block(sup) + b"".join(entries)


def reader(raw: bytes):  # type: ignore[no-untyped-def]
    return lambda offset, length: raw[offset:offset + length]


def test_a_log_parses_into_its_entries_in_order() -> None:
    data = bytes(range(256)) * 4
    raw = log(entry(8, 2, 0, data), entry(0, 16, lw.FLAG_DISCARD),
              entry(0, 0, lw.FLAG_FLUSH), entry(3, 2, lw.FLAG_FUA, data[::-1]),
              entry(0, 0, lw.FLAG_MARK, mark=b"dm-log-writes-end"))
    got = list(lw.entries(reader(raw), len(raw)))
    assert [(e.sector, e.nr_sectors, e.flags, e.has_data) for e in got] == [
        (8, 2, 0, True), (0, 16, lw.FLAG_DISCARD, False), (0, 0, lw.FLAG_FLUSH, False),
        (3, 2, lw.FLAG_FUA, True), (0, 0, lw.FLAG_MARK, False)]
    assert raw[got[0].data_offset:got[0].data_offset + 2 * S] == data
    assert raw[got[3].data_offset:got[3].data_offset + 2 * S] == data[::-1]


def test_a_log_without_a_super_has_no_entries_and_a_bad_one_is_refused() -> None:
    assert list(lw.entries(reader(bytes(4096)), 4096)) == []
    raw = bytearray(log(entry(0, 1, 0, bytes(S))))
    raw[8] = 2        # version 2
    with pytest.raises(lw.LogFormatError, match="version"):
        list(lw.entries(reader(bytes(raw)), len(raw)))


def test_a_log_whose_entries_run_past_its_end_is_refused() -> None:
    raw = log(entry(0, 1, 0, bytes(S)), nr=3)       # the super claims 3 entries
    with pytest.raises(lw.LogFormatError, match="past the log's end"):
        list(lw.entries(reader(raw), len(raw)))
    raw = log(entry(0, 64, 0, bytes(S)))           # data longer than the log
    with pytest.raises(lw.LogFormatError, match="past the log's end"):
        list(lw.entries(reader(raw), len(raw)))


def test_status() -> None:
    assert lw.parse_status("17958 161494") == lw.LogWritesStatus(17958, 161494, False)
    assert lw.parse_status("5 40 logging_disabled").disabled
    with pytest.raises(lw.LogFormatError):
        lw.parse_status("garbage")
