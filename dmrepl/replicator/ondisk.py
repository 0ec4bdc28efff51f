"""On-disk format of the ringbuffer replication log, version 1.1 (little-endian).

Layout, in bytes from ``<dev_start> * 512``::

    0      log header      (4 KiB slot; static: written once by create)
    4096   ring header A   (4 KiB slot)   the valid one with the highest
    8192   ring header B   (4 KiB slot)   generation wins; writes alternate
    12288  ring            entries up to the log size

Each entry is a 512-byte header slot followed by its data, padded to 512 bytes.
An entry is placed at the tail if it fits before the end of the ring, else at the
ring start.  Every structure carries a CRC32C over all its bytes (the CRC field
excluded); the data carries its own CRC32C in the entry header.  Nothing read from
disk is trusted before its magic, version, log id and CRC check out.

Version 1.1 adds, compatibly (1.0 logs open; 1.0 code refuses 1.1 headers by their
minor version): the ring header's ``lost`` report (acknowledged writes the replay
could not recover, kept until an operator clears it), and in the entry header slot,
after the header's CRC (zeros in 1.0), the ``durable_seq`` the log had reached when
the entry was written, with its own CRC.  That is the evidence replay needs: an
intact entry written after entry k was durable proves k was durable (so possibly
acknowledged); entries in flight with a torn k all carry a smaller value.

Differences from the kernel original (RB, see replication-peers.md section 1):
the CRC covers the whole structure (the original covered 8 bytes), the version
check accepts the same major and an older-or-equal minor (the original's check was
inverted), sizes are bytes or sectors as named, and copy progress is kept as one
"applied up to sequence number" per site link in the ring header (the original
rewrote each entry header once per completed copy).  Entries keep the 2048-bit
site-link bitmap of the copies outstanding when they were written.
"""

from __future__ import annotations

import functools

from construct import (
    Bytes,
    Checksum,
    ChecksumError,
    Const,
    ConstError,
    ConstructError,
    If,
    Int16ul,
    Int32ul,
    Int64ul,
    PaddedString,
    Padding,
    PrefixedArray,
    RawCopy,
    Struct,
    this,
)

from dmrepl.crc import crc32c
from dmrepl.flatstruct import FlatPacker

SECTOR = 512
SLOT = 4096
LOG_HEADER_OFFSET = 0
RING_HEADER_OFFSETS = (SLOT, 2 * SLOT)
RING_OFFSET = 3 * SLOT
ENTRY_HEADER_SIZE = SECTOR
FORMAT_MAJOR = 1
FORMAT_MINOR = 1
LOST_REPORT_MINOR = 1  # ring headers carry the lost report from this minor on
SLINK_BITMAP_BYTES = 256  # 2048 site links
HANDLER_NAME = "ringbuffer"
MAX_RECORDED_SLINKS = 300  # positions that fit in a ring header slot


def _with_crc(body: Struct) -> Struct:
    """``body`` followed by the CRC32C of its bytes (checked on parse)."""
    return Struct(
        "body" / RawCopy(body),
        "crc" / Checksum(Int32ul, crc32c, this.body.data),
    )


# Log header: static description of the log (written by create only).
# Kernel counterpart: struct log_header_disk in dm-repl-log-ringbuffer.c.
LOG_MAGIC = b"dm-replicatorPY1"
RING_MAGIC = b"DMRPRING"
ENTRY_MAGIC = b"DMRPENTR"
LogHeaderBody = Struct(
    "magic" / Const(LOG_MAGIC),
    "major" / Int16ul,
    "minor" / Int16ul,
    "log_id" / Int64ul,  # random per create; entries and ring headers carry it
    "dev_start" / Int64ul,  # sectors, as in the table (sanity check)
    "ring_offset" / Int64ul,  # bytes from the log start
    "handler" / PaddedString(16, "ascii"),
)
LogHeader = _with_crc(LogHeaderBody).compile()

# Ring header: the dynamic state; two alternating slots.
# Kernel counterpart: struct buffer_header_disk (start/head/tail/flags).
SlinkPosition = Struct(
    "slink_nr" / Int16ul,
    Padding(2),
    "applied_seq" / Int64ul,  # every entry with seq <= this is done for the slink
)
# Acknowledged writes the replay could not recover (see ringlog: replay).
LostReport = Struct(
    "entries" / Int32ul,  # entries lost in the report being shown (0: none)
    "first_seq" / Int64ul,  # lowest lost sequence number (of the report)
    "last_seq" / Int64ul,  # highest lost sequence number (of the report)
    "known_upto" / Int64ul,  # every gap up to here was reported (also once cleared)
    "whole" / Int32ul,  # 1: a lost entry's header was unreadable (region unknown)
)
RingHeaderBody = Struct(
    "magic" / Const(RING_MAGIC),
    "major" / Int16ul,
    "minor" / Int16ul,
    "epoch" / Int32ul,  # incremented by every open; entries carry it
    "log_id" / Int64ul,
    "generation" / Int64ul,  # highest valid slot wins
    "log_size" / Int64ul,  # sectors, incl. headers (replog resize changes it)
    "head_pos" / Int64ul,  # bytes from log start: first live entry (or next slot)
    "head_seq" / Int64ul,  # its sequence number (next one if the ring is empty)
    "slinks" / PrefixedArray(Int16ul, SlinkPosition),
    "lost" / If(this.minor >= LOST_REPORT_MINOR, LostReport),
)
RingHeader = _with_crc(RingHeaderBody).compile()

# Entry header, in a 512-byte slot before the entry's data.
# Kernel counterpart: struct data_header_disk (512 bytes, 2048-bit slink_bits).
EntryHeaderBody = Struct(
    "magic" / Const(ENTRY_MAGIC),
    "major" / Int16ul,
    "flags" / Int16ul,
    "epoch" / Int32ul,
    "log_id" / Int64ul,
    "seq" / Int64ul,
    "pos" / Int64ul,  # bytes from log start: where this header is
    "dev" / Int32ul,  # device number in the replicator (not major:minor)
    "length" / Int32ul,  # bytes of data
    "offset" / Int64ul,  # bytes on the device
    "data_crc" / Int32ul,
    "slinks" / Bytes(SLINK_BITMAP_BYTES),  # bit n: a copy to site link n outstanding
)
EntryHeader = _with_crc(EntryHeaderBody).compile()
ENTRY_FLAG_ZERO = 1  # a zero-write (trim): no data follows, length bytes of zeros
# Version 1.1: after the entry header's CRC, in the slot's padding (zeros in 1.0).
EntryDurableBody = Struct(
    "durable_seq" / Int64ul,  # every entry up to this one was durable at this write
)
EntryDurable = _with_crc(EntryDurableBody).compile()
ENTRY_DURABLE_OFFSET = EntryHeaderBody.sizeof() + 4

assert ENTRY_DURABLE_OFFSET + EntryDurableBody.sizeof() + 4 <= ENTRY_HEADER_SIZE


class FormatError(ValueError):
    """A structure did not validate (bad magic, CRC, version or size)."""


def _parse(fmt: Struct, data: bytes, what: str) -> dict:
    try:
        obj = fmt.parse(data)
    except ChecksumError as e:
        raise FormatError(f"{what}: checksum (CRC32C) mismatch") from e
    except ConstError as e:
        raise FormatError(f"{what}: no signature (magic)") from e
    except ConstructError as e:
        raise FormatError(f"{what}: size: too short or malformed "
                          f"({e.__class__.__name__})") from e
    return dict(obj.body.value)


def _check_version(major: int, minor: int, what: str) -> None:
    # Readable: same major, and not written by a newer minor than ours.
    if major != FORMAT_MAJOR or minor > FORMAT_MINOR:
        raise FormatError(f"{what}: unsupported format version {major}.{minor} "
                          f"(this code reads {FORMAT_MAJOR}.0..{FORMAT_MAJOR}.{FORMAT_MINOR})")


def build_log_header(log_id: int, dev_start: int) -> bytes:
    raw = LogHeader.build(dict(body=dict(value=dict(
        major=FORMAT_MAJOR, minor=FORMAT_MINOR, log_id=log_id, dev_start=dev_start,
        ring_offset=RING_OFFSET, handler=HANDLER_NAME))))
    return raw.ljust(SLOT, b"\0")


def parse_log_header(data: bytes) -> dict:
    h = _parse(LogHeader, data, "log header")
    _check_version(h["major"], h["minor"], "log header")
    if h["handler"] != HANDLER_NAME:
        raise FormatError(f"log header: handler {h['handler']!r} is not {HANDLER_NAME!r}")
    if h["ring_offset"] != RING_OFFSET:
        raise FormatError(f"log header: ring offset {h['ring_offset']} unsupported")
    return h


NO_LOST_REPORT = {"entries": 0, "first_seq": 0, "last_seq": 0, "known_upto": 0,
                  "whole": 0}


def build_ring_header(*, log_id: int, epoch: int, generation: int, log_size: int,
                      head_pos: int, head_seq: int, slinks: dict[int, int],
                      lost: dict[str, int] | None = None) -> bytes:
    if len(slinks) > MAX_RECORDED_SLINKS:
        raise ValueError("too many site links for a ring header")
    raw = RingHeader.build(dict(body=dict(value=dict(
        major=FORMAT_MAJOR, minor=FORMAT_MINOR, epoch=epoch, log_id=log_id,
        generation=generation, log_size=log_size, head_pos=head_pos, head_seq=head_seq,
        slinks=[dict(slink_nr=n, applied_seq=s) for n, s in sorted(slinks.items())],
        lost=dict(lost or NO_LOST_REPORT)))))
    assert len(raw) <= SLOT
    return raw.ljust(SLOT, b"\0")


def parse_ring_header(data: bytes, log_id: int) -> dict:
    h = _parse(RingHeader, data, "ring header")
    _check_version(h["major"], h["minor"], "ring header")
    if h["log_id"] != log_id:
        raise FormatError("ring header: belongs to another log")
    h["slinks"] = {p.slink_nr: p.applied_seq for p in h["slinks"]}
    lost = h["lost"]
    h["lost"] = (dict(NO_LOST_REPORT) if lost is None
                 else {k: lost[k] for k in NO_LOST_REPORT})
    return h


def signatures(area: bytes) -> list[str]:
    """The headers of ours whose signature (magic) is in ``area`` (the start of a
    log: log header and both ring header slots), damaged or not.  A signature
    anywhere else in the area counts too (a shifted or partly overwritten header
    area is still a log of ours: ``auto`` must not re-create it)."""
    found = []
    for name, off, magic in (("log header", LOG_HEADER_OFFSET, LOG_MAGIC),
                             ("ring header A", RING_HEADER_OFFSETS[0], RING_MAGIC),
                             ("ring header B", RING_HEADER_OFFSETS[1], RING_MAGIC)):
        if area[off:off + len(magic)] == magic:
            found.append(name)
    for what, magic in (("log header", LOG_MAGIC), ("ring header", RING_MAGIC)):
        at = area.find(magic)
        while at >= 0:
            if at not in (LOG_HEADER_OFFSET, *RING_HEADER_OFFSETS):
                found.append(f"a {what} signature misplaced at byte {at}")
            at = area.find(magic, at + 1)
    return found


def slink_bitmap(slinks: set[int] | frozenset[int]) -> bytes:
    # frozenset() of a frozenset is the same object: no copy on the write path
    return _bitmap_of(frozenset(slinks))


@functools.lru_cache(maxsize=256)  # a few distinct sets per replicator
def _bitmap_of(slinks: frozenset[int]) -> bytes:
    value = 0
    for n in slinks:
        value |= 1 << n
    return value.to_bytes(SLINK_BITMAP_BYTES, "little")


def slinks_of_bitmap(bitmap: bytes) -> frozenset[int]:
    value = int.from_bytes(bitmap, "little")
    out = []
    n = 0
    while value:
        if value & 1:
            out.append(n)
        value >>= 1
        n += 1
    return frozenset(out)


_ENTRY_PACKER = FlatPacker(EntryHeaderBody)
_DURABLE_PACKER = FlatPacker(EntryDurableBody)
_pack_durable = _DURABLE_PACKER.positional("durable_seq")
_ENTRY_PAD = bytes(ENTRY_HEADER_SIZE - ENTRY_DURABLE_OFFSET - EntryDurableBody.sizeof() - 4)
_pack_entry_body = _ENTRY_PACKER.positional(
    "major", "flags", "epoch", "log_id", "seq", "pos", "dev", "length", "offset",
    "data_crc", "slinks")


def entry_header(log_id: int, epoch: int, seq: int, pos: int, dev: int, offset: int,
                 length: int, data_crc: int, bitmap: bytes, flags: int,
                 durable_seq: int = 0, *, tail: bytes | None = None) -> bytes:
    """The entry header slot (the write path's form: positional arguments).
    ``tail``: :func:`entry_header_tail` of ``durable_seq``, if the caller has it
    (a batch's entries share it)."""
    body = _pack_entry_body(FORMAT_MAJOR, flags, epoch, log_id, seq, pos, dev, length,
                            offset, data_crc, bitmap)
    return (body + crc32c(body).to_bytes(4, "little")
            + (entry_header_tail(durable_seq) if tail is None else tail))


def entry_header_tail(durable_seq: int) -> bytes:
    """What follows an entry header's body and its CRC: the ``durable_seq`` record
    and the slot's padding."""
    durable = _pack_durable(durable_seq)
    return durable + crc32c(durable).to_bytes(4, "little") + _ENTRY_PAD


def build_entry_header(*, log_id: int, epoch: int, seq: int, pos: int, dev: int,
                       offset: int, length: int, data_crc: int, bitmap: bytes,
                       flags: int = 0, durable_seq: int = 0) -> bytes:
    return entry_header(log_id, epoch, seq, pos, dev, offset, length, data_crc, bitmap,
                        flags, durable_seq)


def entry_durable_seq(slot: bytes) -> int:
    """The ``durable_seq`` recorded in an entry header slot; 0 (no evidence) for a
    1.0 entry or a damaged record."""
    try:
        return int(EntryDurable.parse(
            slot[ENTRY_DURABLE_OFFSET:ENTRY_DURABLE_OFFSET + EntryDurableBody.sizeof() + 4]
        ).body.value.durable_seq)
    except ConstructError:
        return 0


def build_entry_header_construct(*, log_id: int, epoch: int, seq: int, pos: int,
                                 dev: int, offset: int, length: int, data_crc: int,
                                 bitmap: bytes, flags: int = 0,
                                 durable_seq: int = 0) -> bytes:
    """The same header built by construct from the declaration (tests compare)."""
    raw = EntryHeader.build(dict(body=dict(value=dict(
        major=FORMAT_MAJOR, flags=flags, epoch=epoch, log_id=log_id, seq=seq, pos=pos,
        dev=dev, length=length, offset=offset, data_crc=data_crc, slinks=bitmap))))
    raw += EntryDurable.build(dict(body=dict(value=dict(durable_seq=durable_seq))))
    return raw.ljust(ENTRY_HEADER_SIZE, b"\0")


_ENTRY_BODY_SIZE = _ENTRY_PACKER.struct.size
_unpack_entry_body = _ENTRY_PACKER.struct.unpack_from
_ENTRY_FIELDS = tuple(_ENTRY_PACKER.fields)


def parse_entry_header(data: bytes, log_id: int) -> dict:
    """An entry header's fields, checked (signature, CRC, version, this log's).

    Unpacked by the struct the declaration generates, as built: a copier reading
    back entries no longer in memory (one behind by more than ``cache_bytes``)
    spent most of its CPU in construct's parse, ~15 us a header."""
    if len(data) < _ENTRY_BODY_SIZE + 4:
        raise FormatError("entry header: size: too short or malformed")
    h = dict(zip(_ENTRY_FIELDS, _unpack_entry_body(data), strict=True))
    if h["magic"] != ENTRY_MAGIC:
        raise FormatError("entry header: no signature (magic)")
    if crc32c(data[:_ENTRY_BODY_SIZE]) != int.from_bytes(
            data[_ENTRY_BODY_SIZE:_ENTRY_BODY_SIZE + 4], "little"):
        raise FormatError("entry header: checksum (CRC32C) mismatch")
    return _check_entry_header(h, log_id)


def parse_entry_header_construct(data: bytes, log_id: int) -> dict:
    """The same parsed by construct from the declaration (tests compare)."""
    return _check_entry_header(_parse(EntryHeader, data, "entry header"), log_id)


def _check_entry_header(h: dict, log_id: int) -> dict:
    if h["major"] != FORMAT_MAJOR:
        raise FormatError(f"entry header: unsupported major version {h['major']}")
    if h["log_id"] != log_id:
        raise FormatError("entry header: belongs to another log")
    return h


def entry_size(length: int, flags: int = 0) -> int:
    """Bytes an entry occupies in the ring (header slot + padded data)."""
    if flags & ENTRY_FLAG_ZERO:
        return ENTRY_HEADER_SIZE
    return ENTRY_HEADER_SIZE + -(-length // SECTOR) * SECTOR
