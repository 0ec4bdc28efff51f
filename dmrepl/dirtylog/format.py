"""On-disk format of the kernel's ``disk`` dirty log, declared once, sans-I/O.

Layout (``drivers/md/dm-log.c``, struct ``log_header_disk``; cmirrord copies it)::

    byte 0      __le32 magic        MIRROR_MAGIC 0x4D695272 ("MiRr"; bytes 72 52 69 4D)
    byte 4      __le32 version      MIRROR_DISK_VERSION 2 (1 is read as 2 on LE hosts)
    byte 8      __le64 nr_regions   region count when the log was last written
    byte 16     unused up to byte 1023; preserved as read (the kernel never zeroes it)
    byte 1024   clean bitmap        LOG_OFFSET = 2 sectors; bit i%8 of byte i/8 is
                                    region i; 1 = clean, 0 = dirty / needs resync;
                                    round_up(region_count, 64) / 8 bytes

The whole area is ``round_up(1024 + bitmap bytes, logical block size)`` bytes from
sector 0, and the log device must be at least that big.

Only *clean* bits are persisted.  On resume the kernel copies clean bits to sync
bits, so a dirty (or never synced) region is resynchronised.  :func:`load_area` is
that resume step as a pure function of the bytes read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from construct import Int32ul, Int64ul, Struct

MIRROR_MAGIC = 0x4D695272
MIRROR_DISK_VERSION = 2
SECTOR_SIZE = 512
LOG_OFFSET = 2 * SECTOR_SIZE  # bitmap start in bytes: LOG_OFFSET sectors << SECTOR_SHIFT
HEADER_SIZE = 16
BITS_PER_LONG = 64  # the kernel sizes bitsets in unsigned longs (64-bit hosts)

# struct log_header_disk { __le32 magic; __le32 version; __le64 nr_regions; } __packed;
log_header_disk = Struct(
    "magic" / Int32ul,
    "version" / Int32ul,
    "nr_regions" / Int64ul,
)


class SyncMode(enum.Enum):
    """The optional ``[sync|nosync]`` log argument (kernel ``enum sync``)."""

    DEFAULT = "default"  # synchronise what the log says needs it
    NOSYNC = "nosync"  # legs known to be in sync: everything clean and in sync
    FORCESYNC = "sync"  # ignore the on-disk state: full resync


@dataclass(frozen=True, slots=True)
class LogHeader:
    """The decoded ``log_header_disk``."""

    magic: int = MIRROR_MAGIC
    version: int = MIRROR_DISK_VERSION
    nr_regions: int = 0


def parse_header(data: bytes | bytearray | memoryview) -> LogHeader:
    """Decode the 16 header bytes (at least 16 bytes must be given)."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"log header needs {HEADER_SIZE} bytes, got {len(data)}")
    c = log_header_disk.parse(bytes(data[:HEADER_SIZE]))
    return LogHeader(magic=c.magic, version=c.version, nr_regions=c.nr_regions)


def build_header(header: LogHeader) -> bytes:
    """Encode a header into its 16 on-disk bytes."""
    return log_header_disk.build(
        {"magic": header.magic, "version": header.version, "nr_regions": header.nr_regions})


def bitset_size(region_count: int) -> int:
    """Bytes of one bitset: region_count rounded up to unsigned longs."""
    return -(-region_count // BITS_PER_LONG) * BITS_PER_LONG // 8


def area_size(region_count: int, logical_block_size: int = SECTOR_SIZE) -> int:
    """Bytes the kernel reads and writes from sector 0 (and the minimum device size)."""
    raw = LOG_OFFSET + bitset_size(region_count)
    return -(-raw // logical_block_size) * logical_block_size


# fill_bits and popcount work in slices of this many bytes: no temporary as large as
# the bitset (a 2**28-region log has 32 MiB bitsets), and other threads get the GIL
# between slices.
_FILL_CHUNK = 256 << 10
_ONES = memoryview(b"\xff" * _FILL_CHUNK)
_ZEROS = memoryview(bytes(_FILL_CHUNK))


def fill_bits(buf: bytearray, offset: int, start: int, stop: int, value: bool) -> None:
    """Set (``value``) or clear bits ``[start, stop)`` of the LE bitset at ``buf[offset:]``.

    Whole bytes are assigned as one slice; only the two edge bytes are masked.
    """
    if start >= stop:
        return
    first, last = start >> 3, (stop - 1) >> 3
    if first == last:
        mask = ((1 << (stop - start)) - 1) << (start & 7)
        _apply(buf, offset + first, mask, value)
        return
    _apply(buf, offset + first, (0xFF << (start & 7)) & 0xFF, value)
    _apply(buf, offset + last, (1 << (((stop - 1) & 7) + 1)) - 1, value)
    pattern = _ONES if value else _ZEROS
    for at in range(offset + first + 1, offset + last, _FILL_CHUNK):
        end = min(at + _FILL_CHUNK, offset + last)
        buf[at:end] = pattern[:end - at]


def _apply(buf: bytearray, index: int, mask: int, value: bool) -> None:
    buf[index] = (buf[index] | mask) if value else (buf[index] & ~mask & 0xFF)


def popcount(data: bytes | bytearray | memoryview) -> int:
    """Number of set bits."""
    view = memoryview(data).cast("B")
    try:
        return sum(int.from_bytes(view[at:at + _FILL_CHUNK], "little").bit_count()
                   for at in range(0, len(view), _FILL_CHUNK))
    finally:
        view.release()


class HeaderProblem(enum.Enum):
    """Why the on-disk state was not (fully) trusted at resume."""

    NONE = "none"
    FORCED = "sync or nosync given: on-disk state ignored"
    BAD_MAGIC = "no dirty log header (bad magic): new log"
    BAD_VERSION = "incompatible disk log version"
    READ_FAILED = "log device could not be read"


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What resume made of the on-disk area."""

    header: LogHeader  # the header as it is to be written back
    trusted_regions: int  # regions whose clean bits came from disk
    problem: HeaderProblem

    @property
    def device_failed(self) -> bool:
        """The kernel fails the log device ('D') for these problems."""
        return self.problem in (HeaderProblem.BAD_VERSION, HeaderProblem.READ_FAILED)


def load_area(area: bytearray, region_count: int, sync: SyncMode) -> LoadResult:
    """The kernel's ``read_header`` + ``disk_resume`` bit fix-ups, in place on ``area``.

    ``area`` is the whole on-disk area (header, gap, bitmap) as read.  On return
    ``area`` holds the state to write back: header with nr_regions = region_count,
    regions beyond what the disk vouched for set clean (nosync) or dirty, and the
    tail bits up to the next unsigned long cleared.
    """
    problem = HeaderProblem.NONE
    header = parse_header(area)
    if sync is not SyncMode.DEFAULT:
        problem = HeaderProblem.FORCED
        header = LogHeader()
    elif header.magic != MIRROR_MAGIC:
        problem = HeaderProblem.BAD_MAGIC
        header = LogHeader()
    if header.version == 1:  # LE hosts: version 1 is the same layout
        header = LogHeader(header.magic, MIRROR_DISK_VERSION, header.nr_regions)
    trusted = header.nr_regions
    if header.version != MIRROR_DISK_VERSION:
        problem = HeaderProblem.BAD_VERSION
        trusted = 0
    return _fix_bits(area, region_count, sync, trusted, problem)


def load_failed(area: bytearray, region_count: int, sync: SyncMode) -> LoadResult:
    """Resume after a read error: nothing from disk is trusted, the device is failed."""
    return _fix_bits(area, region_count, sync, 0, HeaderProblem.READ_FAILED)


def _fix_bits(area: bytearray, region_count: int, sync: SyncMode, trusted: int,
              problem: HeaderProblem) -> LoadResult:
    trusted = min(trusted, region_count)
    # Regions the disk does not vouch for (new log, or the device grew).
    fill_bits(area, LOG_OFFSET, trusted, region_count, sync is SyncMode.NOSYNC)
    # Stale bits past the end (the device shrank), up to the unsigned long boundary.
    fill_bits(area, LOG_OFFSET, region_count, bitset_size(region_count) * 8, False)
    header = LogHeader(MIRROR_MAGIC, MIRROR_DISK_VERSION, region_count)
    area[:HEADER_SIZE] = build_header(header)
    return LoadResult(header=header, trusted_regions=trusted, problem=problem)
