"""The ``disk`` log: the core log's bitsets plus the kernel's on-disk format."""

from __future__ import annotations

from collections.abc import Callable

from dmrepl.dirtylog._base import DirtyLogConfig, LogDeviceError
from dmrepl.dirtylog._core import BitmapLog
from dmrepl.dirtylog.format import (
    LOG_OFFSET,
    HeaderProblem,
    LoadResult,
    area_size,
    load_area,
    load_failed,
    popcount,
)
from dmrepl.dirtylog.storage import Storage

# Changed blocks closer than this are written as one I/O (the few bytes in between
# are rewritten unchanged; one syscall is cheaper than two).
_MERGE_GAP_BLOCKS = 8


class DiskLog(BitmapLog):
    """A persistent log in the kernel's format (see :mod:`dmrepl.dirtylog.format`).

    ``flush_callback``, if given, is called before clean bits reach the disk, to flush
    the data legs (the kernel's ``flush_callback_fn``).  If it raises, every region is
    marked dirty and no region becomes clean again for the life of the log.
    """

    def __init__(self, config: DirtyLogConfig, storage: Storage, *,
                 flush_callback: Callable[[], object] | None = None) -> None:
        if config.type_name != "disk":
            raise ValueError(f"DiskLog needs a disk config, not {config.type_name!r}")
        lbs = storage.logical_block_size
        if lbs < 512 or lbs & (lbs - 1):
            raise ValueError(f"logical block size {lbs} is not a power of two >= 512")
        self.storage = storage
        self.area_size = area_size(config.region_count, lbs)
        super().__init__(config, bytearray(self.area_size), LOG_OFFSET,
                         lbs.bit_length() - 1)
        self._flush_callback = flush_callback
        self.device_failed = False  # 'D'
        self.device_flush_failed = False  # 'F'
        self.load_result: LoadResult | None = None
        self._unsynced = False  # written since the last cache flush

    # -- lifecycle --------------------------------------------------------------

    def resume(self) -> None:
        """Read the area, apply the kernel's resume rules, write it back and flush.

        A read error is not raised: like the kernel, every region is then out of
        sync and the log device is failed ('D').  A write error raises
        :class:`LogDeviceError` (the state in memory is still the right one).
        """
        try:
            data = self.storage.read(0, self.area_size)
        except OSError:
            result = load_failed(self._img, self.region_count, self.sync)
        else:
            self._img[:] = data
            result = load_area(self._img, self.region_count, self.sync)
        self.load_result = result
        if result.device_failed:
            self.device_failed = True
        bitmap = memoryview(self._img)[LOG_OFFSET:LOG_OFFSET + self._bitset_bytes]
        self._sync_bits[:] = bitmap
        self._clean_count = self._sync_count = popcount(bitmap)
        bitmap.release()
        self._sync_search = 0
        self._changed.clear()
        self._touched_dirtied = self._touched_cleaned = False
        try:
            self.storage.write(0, self._img)
        except OSError as e:
            self._fail()
            self._changed.update(range(self.area_size >> self._block_shift))
            self._touched_dirtied = True
            raise LogDeviceError(f"{self.storage.name}: failed to write dirty log header: "
                                 f"{e.strerror}", e.errno) from e
        try:
            self.storage.flush()
        except OSError as e:
            self.device_flush_failed = True
            self._fail()
            self._touched_dirtied = True
            raise LogDeviceError(f"{self.storage.name}: failed to flush dirty log header: "
                                 f"{e.strerror}", e.errno) from e

    def presuspend(self) -> None:
        pass

    def postsuspend(self) -> None:
        """Write out the state.  Unlike the kernel (whose postsuspend is a plain
        flush), this always ends with a cache flush, so a log suspended or removed
        cleanly does not cost a resync after a power failure."""
        self.flush(durable=True)

    def _fail(self) -> None:
        self.device_failed = True

    # -- flush ------------------------------------------------------------------

    def flush(self, *, durable: bool = False) -> None:
        """Write changed blocks; if regions were marked (or ``durable``), also flush
        the device cache before returning.  Raises LogDeviceError."""
        if not (self._touched_dirtied or self._touched_cleaned or (durable and self._unsynced)):
            return
        if self._touched_cleaned and self._flush_callback is not None:
            try:
                self._flush_callback()
            except Exception:
                # The legs may not hold what the clean bits promise: trust nothing.
                self._flush_failed = True
                self._mark_all_dirty()
        try:
            self._write_changed()
        except OSError as e:
            self._fail()
            raise LogDeviceError(f"{self.storage.name}: failed to write dirty log: "
                                 f"{e.strerror}", e.errno) from e
        self._unsynced = True
        if self._touched_dirtied or durable:
            try:
                self.storage.flush()
            except OSError as e:
                self.device_flush_failed = True
                self._fail()
                raise LogDeviceError(f"{self.storage.name}: failed to flush dirty log: "
                                     f"{e.strerror}", e.errno) from e
            self._touched_dirtied = self._unsynced = False
        self._touched_cleaned = False
        self._changed.clear()

    def _write_changed(self) -> None:
        if not self._changed:
            return
        blocks = sorted(self._changed)
        shift = self._block_shift
        img = memoryview(self._img)
        try:
            start = prev = blocks[0]
            for block in blocks[1:]:
                if block - prev > _MERGE_GAP_BLOCKS:
                    self.storage.write(start << shift, img[start << shift:(prev + 1) << shift])
                    start = block
                prev = block
            self.storage.write(start << shift, img[start << shift:(prev + 1) << shift])
        finally:
            img.release()

    # -- status -----------------------------------------------------------------

    def _health(self) -> str:
        if self.device_flush_failed:
            return "F"
        return "D" if self.device_failed else "A"

    def status_info(self) -> str:
        return f"3 {self.name} {self.storage.name} {self._health()}"

    def status_table(self) -> str:
        return (f"{self.name} {2 + self._sync_argc()} {self.storage.name} "
                f"{self.region_size}{self._sync_suffix()}")

    @property
    def load_problem(self) -> HeaderProblem | None:
        """Why resume did not trust (all of) the on-disk state, if it did not."""
        return None if self.load_result is None else self.load_result.problem

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.storage.close()
