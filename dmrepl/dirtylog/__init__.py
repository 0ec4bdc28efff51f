"""The one dirty-log implementation: ``core`` and ``disk`` logs of dm-log.c.

Used by ulogd (kernel mirrors through dm-log-userspace, where the types arrive as
``clustered-core``/``clustered-disk``) and by the replicator engine.  Typical use::

    log = open_dirty_log("disk", ["/dev/loop2", "1024"], target_sectors)
    log.resume()                      # reads the on-disk state
    log.mark_region(5); log.flush()   # region 5 is durably dirty
    ...
    log.postsuspend(); log.close()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dmrepl.dirtylog._base import (
    TYPE_NAMES,
    DirtyLog,
    DirtyLogConfig,
    DirtyLogError,
    LogCounts,
    LogDeviceError,
    RegionOutOfRange,
    parse_devnum,
    parse_dirty_log_args,
)
from dmrepl.dirtylog._core import BitmapLog, CoreLog
from dmrepl.dirtylog.disk import DiskLog
from dmrepl.dirtylog.format import SyncMode, area_size, bitset_size
from dmrepl.dirtylog.storage import FileStorage, MemoryStorage, Storage, resolve_device
from dmrepl.errors import UserError

__all__ = [
    "TYPE_NAMES",
    "BitmapLog",
    "CoreLog",
    "DirtyLog",
    "DirtyLogConfig",
    "DirtyLogError",
    "DiskLog",
    "FileStorage",
    "LogCounts",
    "LogDeviceError",
    "MemoryStorage",
    "RegionOutOfRange",
    "Storage",
    "SyncMode",
    "bitmap_memory",
    "create_dirty_log",
    "open_dirty_log",
    "parse_devnum",
    "parse_dirty_log_args",
    "resolve_device",
]


def bitmap_memory(config: DirtyLogConfig) -> int:
    """Bytes of memory the log's bitsets take (clean and sync: two bits a region;
    a disk log keeps its clean bits inside an image of its on-disk area)."""
    if config.type_name == "core":
        return 2 * bitset_size(config.region_count)
    return area_size(config.region_count) + bitset_size(config.region_count)


def create_dirty_log(config: DirtyLogConfig, *, storage: Storage | None = None,
                     flush_callback: Callable[[], object] | None = None) -> DirtyLog:
    """Build the log for a parsed config (the kernel's ctr; call resume() next).

    For disk logs, ``storage`` overrides opening ``config.device``.  Raises
    :class:`UserError` if the device is missing or too small for the log.
    """
    if config.type_name == "core":
        return CoreLog(config)
    if storage is None:
        assert config.device is not None
        path = resolve_device(config.device)
        try:
            storage = FileStorage(path)
        except OSError as e:
            raise UserError(f"log device {config.device}: cannot open {path}: "
                            f"{e.strerror}") from e
    need = area_size(config.region_count, storage.logical_block_size)
    if storage.size < need:
        storage.close()
        raise UserError(f"log device {config.device or storage.name} too small: need "
                        f"{need} bytes for {config.region_count} regions, "
                        f"has {storage.size}")
    return DiskLog(config, storage, flush_callback=flush_callback)


def open_dirty_log(type_name: str, args: Sequence[str], target_sectors: int, *,
                   storage: Storage | None = None,
                   flush_callback: Callable[[], object] | None = None) -> DirtyLog:
    """Parse ``args`` (see :func:`parse_dirty_log_args`) and build the log."""
    config = parse_dirty_log_args(type_name, args, target_sectors)
    return create_dirty_log(config, storage=storage, flush_callback=flush_callback)
