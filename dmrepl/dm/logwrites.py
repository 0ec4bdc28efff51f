"""The kernel's ``log-writes`` target: its table, its status and its log's format.

``log-writes <dev> <logdev>`` (drivers/md/dm-log-writes.c) passes every bio to
``dev`` and logs each completed write -- sector, length and a copy of the data --
on ``logdev`` in completion order, bounded by flushes: a write that completed
before a FLUSH completed is logged before the FLUSH.  The log is written by a
kernel thread, after the write completed; when the target is destroyed (its
table replaced or removed) it logs what it still holds, a final mark, and the
super block.  ``logdev`` full: it stops logging (status ``logging_disabled``)
and goes on writing ``dev``.

On ``logdev`` (little-endian; ``S`` = the logical block size of ``dev``, the
super's ``sectorsize``)::

    byte 0       struct log_write_super   (in a block of S bytes)
    byte S       entry 0: struct log_write_entry (in a block of S bytes),
                 then its data: nr_sectors blocks of S bytes (none for a
                 discard, a flush or a mark; a mark's text follows the entry
                 struct inside its block)
    ...          entry 1, ...  ``nr_entries`` of them

The structs are declared once here (construct) and as C in
:mod:`cdefs.logwrites`; ``tests/unit/test_logwrites.py`` checks that they agree.
Sans-I/O: :func:`parse_super` and :func:`parse_entry` take bytes;
:func:`entries` walks a log through a ``read(offset, length)`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from construct import Int32ul, Int64ul, Struct

from dmrepl.errors import DmreplError
from dmrepl.flatstruct import FlatPacker

#: ``WRITE_LOG_MAGIC`` and ``WRITE_LOG_VERSION``.
LOG_MAGIC = 0x6A736677736872
LOG_VERSION = 1

# ``LOG_*_FLAG``: an entry's flags.
FLAG_FLUSH = 1 << 0
FLAG_FUA = 1 << 1
FLAG_DISCARD = 1 << 2
FLAG_MARK = 1 << 3
FLAG_METADATA = 1 << 4
#: The largest ``sectorsize`` (a logical block size): an entry's block at most.
MAX_SECTORSIZE = 4096

#: ``struct log_write_super``.
LOG_WRITE_SUPER = Struct(
    "magic" / Int64ul,
    "version" / Int64ul,
    "nr_entries" / Int64ul,
    "sectorsize" / Int32ul,
)

#: ``struct log_write_entry``.
LOG_WRITE_ENTRY = Struct(
    "sector" / Int64ul,       # in blocks of ``sectorsize``
    "nr_sectors" / Int64ul,
    "flags" / Int64ul,
    "data_len" / Int64ul,     # a mark's text length
)

_SUPER_SIZE = LOG_WRITE_SUPER.sizeof()
_ENTRY_SIZE = LOG_WRITE_ENTRY.sizeof()
# a drain parses every entry: construct's parse cost about 10 us of the 13 us an
# entry took (host), the struct derived from the declaration well under 1 us
_ENTRY_S = FlatPacker(LOG_WRITE_ENTRY).struct


class LogFormatError(DmreplError):
    """A log-writes log is not what the kernel writes: the caller must not trust
    it (treat every write it may hold as lost)."""


@dataclass(frozen=True)
class LogSuper:
    nr_entries: int
    sectorsize: int


@dataclass(frozen=True)
class LogEntry:
    """One logged bio: ``nr_sectors`` blocks of ``sectorsize`` at block ``sector``
    of the device; its data at ``data_offset`` of the log."""

    sector: int
    nr_sectors: int
    flags: int
    data_offset: int

    @property
    def has_data(self) -> bool:
        return bool(self.nr_sectors) and not self.flags & (FLAG_DISCARD | FLAG_MARK)


def parse_super(raw: bytes) -> LogSuper | None:
    """The super block of a log (its first bytes); None if there is none (a log
    never finished, or one zeroed after use).  Raises LogFormatError for a super
    of another version or an impossible block size."""
    if len(raw) < _SUPER_SIZE:
        return None
    sup = LOG_WRITE_SUPER.parse(raw[:_SUPER_SIZE])
    if sup.magic != LOG_MAGIC:
        return None
    if sup.version != LOG_VERSION:
        raise LogFormatError(f"log-writes version {sup.version}, not {LOG_VERSION}")
    size = sup.sectorsize
    if size < 512 or size & (size - 1) or size > 1 << 16:
        raise LogFormatError(f"log-writes block size {size}")
    return LogSuper(sup.nr_entries, size)


def parse_entry(raw: bytes, offset: int, sectorsize: int) -> tuple[LogEntry, int]:
    """The entry whose block starts at ``offset`` of the log (``raw``: that
    block's first bytes), and the offset of the next entry."""
    if len(raw) < _ENTRY_SIZE:
        raise LogFormatError(f"log-writes entry at {offset}: short read")
    sector, nr_sectors, flags, data_len = _ENTRY_S.unpack_from(raw)
    data_offset = offset + sectorsize
    entry = LogEntry(sector, nr_sectors, flags, data_offset)
    if flags & FLAG_MARK and data_len > sectorsize - _ENTRY_SIZE:
        raise LogFormatError(f"log-writes mark at {offset}: {data_len} bytes")
    end = data_offset + (nr_sectors * sectorsize if entry.has_data else 0)
    return entry, end


def entries(read: Callable[[int, int], bytes], size: int) -> Iterator[LogEntry]:
    """The entries of the log of ``size`` bytes that ``read(offset, length)``
    reads, in log order (none without a super).  Raises LogFormatError where the
    log runs past its end."""
    sup = parse_super(read(0, _SUPER_SIZE))
    if sup is None:
        return
    offset = sup.sectorsize
    for _ in range(sup.nr_entries):
        if offset + sup.sectorsize > size:
            raise LogFormatError(f"log-writes entry at {offset}: past the log's end ({size})")
        entry, offset = parse_entry(read(offset, _ENTRY_SIZE), offset, sup.sectorsize)
        if offset > size:
            raise LogFormatError(f"log-writes data at {entry.data_offset}: past the "
                                 f"log's end ({size})")
        yield entry


@dataclass(frozen=True)
class LogWritesStatus:
    """``<logged entries> <highest allocated sector> [logging_disabled]``."""

    logged: int
    highest_sector: int
    disabled: bool


def parse_status(params: str) -> LogWritesStatus:
    words = params.split()
    try:
        return LogWritesStatus(int(words[0]), int(words[1]), "logging_disabled" in words[2:])
    except (ValueError, IndexError) as e:
        raise LogFormatError(f"unexpected log-writes status {params!r}") from e


def target_params(dev: str, logdev: str) -> str:
    """The table's parameters: ``<dev> <logdev>``."""
    return f"{dev} {logdev}"
