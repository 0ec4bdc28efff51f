"""The dirty-log interface, its configuration and the table-argument parser."""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dmrepl.dirtylog.format import SyncMode
from dmrepl.errors import DmreplError, UserError
from dmrepl.numbers import parse_int

# Accepted type names -> canonical type.  ulogd receives the clustered-* names from
# dm-log-userspace tables (cmirrord's names); they behave exactly like core/disk.
TYPE_NAMES = {
    "core": "core",
    "disk": "disk",
    "clustered-core": "core",
    "clustered-disk": "disk",
}

_DEVNUM = re.compile(r"^([0-9]+):([0-9]+)$")
_U32_MAX = 0xFFFFFFFF


class DirtyLogError(DmreplError):
    """A dirty-log operation failed; the log's state says what is still trusted."""


class LogDeviceError(DirtyLogError):
    """I/O on the log device failed.  The log is marked failed ('D', or 'F' for a
    failed cache flush) and the operation's effect is not durable; report the error
    to whoever asked (the kernel, the replicator).  ``errno`` is the OS error."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class RegionOutOfRange(UserError, IndexError):
    """A region number outside ``[0, region_count)``: the request is wrong."""


@dataclass(frozen=True, slots=True)
class DirtyLogConfig:
    """A validated dirty-log constructor line (``<type> <#args> <args...>``)."""

    type_name: str  # canonical: "core" | "disk"
    name: str  # as given: "core", "clustered-disk", ...
    region_size: int  # sectors, power of two, 2 <= size <= target_sectors
    region_count: int  # ceil(target_sectors / region_size)
    target_sectors: int
    sync: SyncMode
    device: str | None = None  # disk only: the argument as given (path or major:minor)

    def args(self) -> list[str]:
        """The log arguments, in table order (without type and count)."""
        out = [] if self.device is None else [self.device]
        out.append(str(self.region_size))
        if self.sync is not SyncMode.DEFAULT:
            out.append(self.sync.value)
        return out


@dataclass(frozen=True, slots=True)
class LogCounts:
    """A cheap snapshot of a log's counters (for status reporting)."""

    region_count: int
    sync_count: int  # regions in sync
    clean_count: int  # regions with the clean bit set
    recovering: int  # regions handed out by get_resync_work and not yet reported

    @property
    def dirty_count(self) -> int:
        return self.region_count - self.clean_count

    @property
    def out_of_sync_count(self) -> int:
        return self.region_count - self.sync_count


def _parse_region_size(arg: str, target_sectors: int) -> int:
    # The kernel reads it with sscanf("%u%c"): plain decimal, nothing after it.
    size = parse_int(arg, "region size (sectors)", lo=None)
    if size > _U32_MAX:
        raise UserError(f"invalid region size {arg!r}: larger than 32 bits")
    if size < 2:
        raise UserError(f"invalid region size {arg!r}: must be at least 2 sectors")
    if size & (size - 1):
        raise UserError(f"invalid region size {arg!r}: not a power of two")
    if size > target_sectors:
        raise UserError(f"invalid region size {arg!r}: larger than the target "
                        f"({target_sectors} sectors)")
    return size


def _parse_sync(arg: str) -> SyncMode:
    if arg == "sync":
        return SyncMode.FORCESYNC
    if arg == "nosync":
        return SyncMode.NOSYNC
    raise UserError(f"unrecognised sync argument to dirty region log: {arg!r} "
                    "(expected 'sync' or 'nosync')")


def parse_dirty_log_args(type_name: str, args: Sequence[str],
                         target_sectors: int) -> DirtyLogConfig:
    """Validate a log type and its arguments like ``dm-log.c`` does.

    core: ``<region_size> [sync|nosync]``; disk: ``<dev> <region_size> [sync|nosync]``
    where ``<dev>`` is a path or ``major:minor``.  Raises :class:`UserError` naming
    the bad argument.  The device is not looked up here (see :func:`open_dirty_log`).
    """
    canonical = TYPE_NAMES.get(type_name)
    if canonical is None:
        raise UserError(f"unknown dirty log type {type_name!r} "
                        f"(expected one of {', '.join(TYPE_NAMES)})")
    if isinstance(target_sectors, bool) or not isinstance(target_sectors, int) \
            or target_sectors <= 0:
        raise UserError(f"invalid target length {target_sectors!r}: must be > 0 sectors")
    args = list(args)
    device: str | None = None
    if canonical == "disk":
        if not 2 <= len(args) <= 3:
            raise UserError(f"wrong number of arguments to {type_name} dirty log: "
                            f"{len(args)} given, expected <dev> <region_size> [sync|nosync]")
        device = args.pop(0)
        if not device:
            raise UserError("invalid log device '': empty")
    elif not 1 <= len(args) <= 2:
        raise UserError(f"wrong number of arguments to {type_name} dirty log: "
                        f"{len(args)} given, expected <region_size> [sync|nosync]")
    region_size = _parse_region_size(args[0], target_sectors)
    sync = _parse_sync(args[1]) if len(args) > 1 else SyncMode.DEFAULT
    return DirtyLogConfig(
        type_name=canonical,
        name=type_name,
        region_size=region_size,
        region_count=-(-target_sectors // region_size),
        target_sectors=target_sectors,
        sync=sync,
        device=device,
    )


def parse_devnum(spec: str) -> tuple[int, int] | None:
    """``"7:2"`` -> (7, 2); anything else -> None."""
    m = _DEVNUM.match(spec)
    if m is None:
        return None
    return (parse_int(m.group(1), "device major", hi=_U32_MAX),
            parse_int(m.group(2), "device minor", hi=_U32_MAX))


class DirtyLog(abc.ABC):
    """A dirty region log with the semantics of ``drivers/md/dm-log.c``.

    Two bitsets: *clean* (persisted by ``disk``: no write in flight since the last
    clear) and *sync* (the legs agree).  ``mark_region``/``clear_region`` change the
    clean bits in memory; ``flush`` makes them durable.  Resync walks the sync bits
    through ``get_resync_work``/``set_region_sync``.  Not thread-safe: callers
    serialise calls on one log.
    """

    type_name: str  # "core" | "disk"
    name: str  # type name as given ("clustered-disk", ...), used in status strings
    region_size: int
    region_count: int
    config: DirtyLogConfig

    @property
    def persistent(self) -> bool:
        """Do the marks survive a crash of the host (a ``disk`` log, once flushed)?"""
        return self.type_name == "disk"

    @abc.abstractmethod
    def resume(self) -> None:
        """disk: read header and bitmap (or initialise); both: restart the resync scan."""

    @abc.abstractmethod
    def presuspend(self) -> None: ...

    @abc.abstractmethod
    def postsuspend(self) -> None:
        """disk: write out the state (a flush)."""

    @abc.abstractmethod
    def is_clean(self, region: int) -> bool: ...

    @abc.abstractmethod
    def in_sync(self, region: int) -> bool: ...

    @abc.abstractmethod
    def mark_region(self, region: int) -> None:
        """Region about to be written: clear its clean bit (durable after flush())."""

    @abc.abstractmethod
    def clear_region(self, region: int) -> None:
        """No writes in flight any more: set the clean bit (unless a flush failed)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make marks and clears durable; marks are on stable storage on return."""

    @abc.abstractmethod
    def get_resync_work(self) -> int | None:
        """The next region to resynchronise (now 'recovering'), or None."""

    @abc.abstractmethod
    def set_region_sync(self, region: int, in_sync: bool) -> None: ...

    @abc.abstractmethod
    def get_sync_count(self) -> int: ...

    @abc.abstractmethod
    def status_info(self) -> str: ...

    @abc.abstractmethod
    def status_table(self) -> str: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def counts(self) -> LogCounts:
        """Snapshot of region/sync/clean/recovering counts, O(1)."""

    def _validated(self, regions: Iterable[int]) -> tuple[int, ...]:
        """``regions`` as a tuple (no copy if it is one: the hot path), each checked:
        a request naming one region out of range changes nothing."""
        regions = tuple(regions)
        n = self.region_count
        for region in regions:
            if not 0 <= region < n:
                raise RegionOutOfRange(
                    f"region {region} out of range: log has {self.region_count} regions")
        return regions

    def mark_regions(self, regions: Iterable[int]) -> None:
        """mark_region for each (a MARK_REGION request carries up to 32).  If one is
        out of range, RegionOutOfRange is raised and no region was changed."""
        for region in self._validated(regions):
            self.mark_region(region)

    def clear_regions(self, regions: Iterable[int]) -> None:
        """clear_region for each; all or nothing, like mark_regions."""
        for region in self._validated(regions):
            self.clear_region(region)

    # -- the sync bits as a whole ------------------------------------------------
    # Bitset layout of these three: bit ``r % 8`` of byte ``r // 8`` is region r,
    # ``(region_count + 7) // 8`` bytes, bits past the last region zero.  The
    # defaults go region by region; implementations override them with bulk code.

    def get_sync_bits(self) -> bytes:
        """Every region's sync bit, as one bitset."""
        bits = bytearray((self.region_count + 7) // 8)
        for region in range(self.region_count):
            if self.in_sync(region):
                bits[region >> 3] |= 1 << (region & 7)
        return bytes(bits)

    def set_sync_bits(self, bits: bytes | bytearray | memoryview) -> int:
        """Make every region's sync bit what ``bits`` says; returns how many changed.

        The same as ``set_region_sync(r, bit)`` for each region ``r`` whose bit
        differs (so only those stop being 'recovering').  Bits past the last region
        are ignored.  Raises ValueError if ``bits`` is shorter than the bitset.
        """
        if len(bits) < (self.region_count + 7) // 8:
            raise ValueError(f"{len(bits)} bytes of sync bits for {self.region_count} regions")
        changed = 0
        for region in range(self.region_count):
            want = bool(bits[region >> 3] >> (region & 7) & 1)
            if self.in_sync(region) != want:
                self.set_region_sync(region, want)
                changed += 1
        return changed

    def first_out_of_sync(self, start: int = 0) -> int | None:
        """The lowest region >= ``start`` that is not in sync, or None."""
        for region in range(max(start, 0), self.region_count):
            if not self.in_sync(region):
                return region
        return None

    def region_of_sector(self, sector: int) -> int:
        """The region holding a target sector (region_size is a power of two)."""
        return sector // self.region_size

    def __enter__(self) -> DirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
