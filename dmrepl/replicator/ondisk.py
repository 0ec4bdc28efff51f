"""On-disk format of the ringbuffer replication log, version 1.0 (little-endian).

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
import struct
from collections.abc import Callable
from typing import Any

from construct import (
    Bytes,
    Checksum,
    ChecksumError,
    Const,
    ConstructError,
    FormatField,
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

from dmrepl.replicator.crc import crc32c

SECTOR = 512
SLOT = 4096
LOG_HEADER_OFFSET = 0
RING_HEADER_OFFSETS = (SLOT, 2 * SLOT)
RING_OFFSET = 3 * SLOT
ENTRY_HEADER_SIZE = SECTOR
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
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
LogHeaderBody = Struct(
    "magic" / Const(b"dm-replicatorPY1"),
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
RingHeaderBody = Struct(
    "magic" / Const(b"DMRPRING"),
    "major" / Int16ul,
    "minor" / Int16ul,
    "epoch" / Int32ul,  # incremented by every open; entries carry it
    "log_id" / Int64ul,
    "generation" / Int64ul,  # highest valid slot wins
    "log_size" / Int64ul,  # sectors, incl. headers (replog resize changes it)
    "head_pos" / Int64ul,  # bytes from log start: first live entry (or next slot)
    "head_seq" / Int64ul,  # its sequence number (next one if the ring is empty)
    "slinks" / PrefixedArray(Int16ul, SlinkPosition),
)
RingHeader = _with_crc(RingHeaderBody).compile()

# Entry header, in a 512-byte slot before the entry's data.
# Kernel counterpart: struct data_header_disk (512 bytes, 2048-bit slink_bits).
EntryHeaderBody = Struct(
    "magic" / Const(b"DMRPENTR"),
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

assert EntryHeaderBody.sizeof() + 4 <= ENTRY_HEADER_SIZE


class FormatError(ValueError):
    """A structure did not validate (bad magic, CRC, version or size)."""


def _parse(fmt: Struct, data: bytes, what: str) -> dict:
    try:
        obj = fmt.parse(data)
    except ChecksumError as e:
        raise FormatError(f"{what}: CRC mismatch") from e
    except ConstructError as e:
        raise FormatError(f"{what}: {e.__class__.__name__}") from e
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


def build_ring_header(*, log_id: int, epoch: int, generation: int, log_size: int,
                      head_pos: int, head_seq: int,
                      slinks: dict[int, int]) -> bytes:
    if len(slinks) > MAX_RECORDED_SLINKS:
        raise ValueError("too many site links for a ring header")
    raw = RingHeader.build(dict(body=dict(value=dict(
        major=FORMAT_MAJOR, minor=FORMAT_MINOR, epoch=epoch, log_id=log_id,
        generation=generation, log_size=log_size, head_pos=head_pos, head_seq=head_seq,
        slinks=[dict(slink_nr=n, applied_seq=s) for n, s in sorted(slinks.items())]))))
    assert len(raw) <= SLOT
    return raw.ljust(SLOT, b"\0")


def parse_ring_header(data: bytes, log_id: int) -> dict:
    h = _parse(RingHeader, data, "ring header")
    _check_version(h["major"], h["minor"], "ring header")
    if h["log_id"] != log_id:
        raise FormatError("ring header: belongs to another log")
    h["slinks"] = {p.slink_nr: p.applied_seq for p in h["slinks"]}
    return h


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


class FlatPacker:
    """A ``struct.Struct`` derived from a flat construct ``Struct`` of named
    fixed-size fields (little-endian integers, ``Const`` and ``Bytes``), for the
    write hot path.

    The construct declaration stays the one definition of the layout: this packer is
    generated from it (nothing is retyped) and the unit tests check that both build
    the same bytes.  construct's build costs ~100 us per entry header, the packer
    ~2 us: with 4 KiB writes that was most of the engine's per-write CPU."""

    def __init__(self, body: Struct) -> None:
        fmt = ["<"]
        self.fields: list[str] = []
        self.consts: dict[str, bytes] = {}
        for sc in body.subcons:
            inner = sc.subcon
            if isinstance(inner, FormatField):
                if inner.fmtstr[0] != "<":
                    raise TypeError(f"{sc.name}: not a little-endian integer")
                fmt.append(inner.fmtstr[1:])
            elif isinstance(inner, Const) and isinstance(inner.value, bytes):
                fmt.append(f"{len(inner.value)}s")
                self.consts[sc.name] = inner.value
            elif isinstance(inner, Bytes) and isinstance(inner.length, int):
                fmt.append(f"{inner.length}s")
            else:
                raise TypeError(f"{sc.name}: {type(inner).__name__} has no flat packing")
            self.fields.append(sc.name)
        self.struct = struct.Struct("".join(fmt))
        if self.struct.size != body.sizeof():
            raise TypeError("flat packing size differs from the declaration")

    def positional(self, *names: str) -> Callable[..., bytes]:
        """A packing function taking the fields ``names`` (every non-constant
        field, in any order) positionally: no keyword dict, no generator per call.

        Generated once from the declaration's field order, as ``dataclasses`` and
        ``namedtuple`` generate their methods."""
        wanted = [f for f in self.fields if f not in self.consts]
        if sorted(names) != sorted(wanted) or len(set(names)) != len(names):
            raise TypeError(f"positional packer needs exactly the fields {wanted}")
        args = ", ".join(f"_c_{f}" if f in self.consts else f for f in self.fields)
        src = f"def pack({', '.join(names)}):\n    return _pack({args})\n"
        namespace: dict[str, Any] = {"_pack": self.struct.pack}
        namespace.update({f"_c_{k}": v for k, v in self.consts.items()})
        exec(src, namespace)  # the source is built from our own field names only
        fn: Callable[..., bytes] = namespace["pack"]
        return fn


_ENTRY_PACKER = FlatPacker(EntryHeaderBody)
_ENTRY_PAD = bytes(ENTRY_HEADER_SIZE - EntryHeaderBody.sizeof() - 4)
_pack_entry_body = _ENTRY_PACKER.positional(
    "major", "flags", "epoch", "log_id", "seq", "pos", "dev", "length", "offset",
    "data_crc", "slinks")


def entry_header(log_id: int, epoch: int, seq: int, pos: int, dev: int, offset: int,
                 length: int, data_crc: int, bitmap: bytes, flags: int) -> bytes:
    """The entry header slot (the write path's form: positional arguments)."""
    body = _pack_entry_body(FORMAT_MAJOR, flags, epoch, log_id, seq, pos, dev, length,
                            offset, data_crc, bitmap)
    return body + crc32c(body).to_bytes(4, "little") + _ENTRY_PAD


def build_entry_header(*, log_id: int, epoch: int, seq: int, pos: int, dev: int,
                       offset: int, length: int, data_crc: int, bitmap: bytes,
                       flags: int = 0) -> bytes:
    return entry_header(log_id, epoch, seq, pos, dev, offset, length, data_crc, bitmap,
                        flags)


def build_entry_header_construct(*, log_id: int, epoch: int, seq: int, pos: int,
                                 dev: int, offset: int, length: int, data_crc: int,
                                 bitmap: bytes, flags: int = 0) -> bytes:
    """The same header built by construct from the declaration (tests compare)."""
    raw = EntryHeader.build(dict(body=dict(value=dict(
        major=FORMAT_MAJOR, flags=flags, epoch=epoch, log_id=log_id, seq=seq, pos=pos,
        dev=dev, length=length, offset=offset, data_crc=data_crc, slinks=bitmap))))
    return raw.ljust(ENTRY_HEADER_SIZE, b"\0")


def parse_entry_header(data: bytes, log_id: int) -> dict:
    h = _parse(EntryHeader, data, "entry header")
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
