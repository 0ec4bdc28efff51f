"""The bitmap logic shared by the core and disk logs, and the core log itself."""

from __future__ import annotations

import re
from collections.abc import Iterable

from dmrepl.dirtylog._base import DirtyLog, DirtyLogConfig, LogCounts, RegionOutOfRange
from dmrepl.dirtylog.format import SyncMode, bitset_size, fill_bits

# A byte with at least one zero bit: lets get_resync_work skip fully-synced
# stretches of the sync bitset in C instead of a per-bit Python loop.
_NOT_ALL_ONES = re.compile(rb"[^\xff]")


class BitmapLog(DirtyLog):
    """Clean/sync/recovering bitsets with the kernel's core-log semantics.

    The clean bitset lives in ``self._img`` at byte ``self._off`` (0 for core; for
    disk it is the on-disk area itself, at LOG_OFFSET, so a flush writes slices of
    it as they are).  Every change of a clean bit records the index of the
    ``2**self._block_shift``-byte block it is in, so a flush writes only those.
    """

    def __init__(self, config: DirtyLogConfig, img: bytearray, off: int,
                 block_shift: int) -> None:
        self.config = config
        self.type_name = config.type_name
        self.name = config.name
        self.region_size = config.region_size
        self.region_count = config.region_count
        self.sync = config.sync
        self._img = img
        self._off = off
        self._block_shift = block_shift
        self._bitset_bytes = bitset_size(self.region_count)
        # Kernel ctr: all clean; sync bits all set only for nosync.
        fill_bits(self._img, off, 0, self._bitset_bytes * 8, True)
        self._clean_count = self.region_count
        nosync = self.sync is SyncMode.NOSYNC
        self._sync_bits = bytearray(self._bitset_bytes)
        if nosync:
            fill_bits(self._sync_bits, 0, 0, self._bitset_bytes * 8, True)
        self._sync_count = self.region_count if nosync else 0
        self._recovering: set[int] = set()
        self._sync_search = 0
        self._changed: set[int] = set()  # blocks of _img with changed clean bits
        self._touched_dirtied = False
        self._touched_cleaned = False
        self._flush_failed = False
        self._closed = False

    # -- region state -----------------------------------------------------------

    def _check(self, region: int) -> None:
        if not 0 <= region < self.region_count:
            raise RegionOutOfRange(
                f"region {region} out of range: log has {self.region_count} regions")

    def is_clean(self, region: int) -> bool:
        if not 0 <= region < self.region_count:
            self._check(region)
        return bool(self._img[self._off + (region >> 3)] & (1 << (region & 7)))

    def in_sync(self, region: int) -> bool:
        if not 0 <= region < self.region_count:
            self._check(region)
        return bool(self._sync_bits[region >> 3] & (1 << (region & 7)))

    def mark_region(self, region: int) -> None:
        if not 0 <= region < self.region_count:
            self._check(region)
        i = self._off + (region >> 3)
        mask = 1 << (region & 7)
        byte = self._img[i]
        if byte & mask:
            self._img[i] = byte ^ mask
            self._clean_count -= 1
            self._changed.add(i >> self._block_shift)
            self._touched_dirtied = True

    def clear_region(self, region: int) -> None:
        if not 0 <= region < self.region_count:
            self._check(region)
        if self._flush_failed:
            # The kernel's rule: after a failed leg flush nothing may become clean.
            return
        i = self._off + (region >> 3)
        mask = 1 << (region & 7)
        byte = self._img[i]
        if not byte & mask:
            self._img[i] = byte | mask
            self._clean_count += 1
            self._changed.add(i >> self._block_shift)
            self._touched_cleaned = True

    def mark_regions(self, regions: Iterable[int]) -> None:
        # mark_region inlined: this is the per-request hot path (up to 32 a request).
        regions = self._validated(regions)
        img, off, shift = self._img, self._off, self._block_shift
        for region in regions:
            i = off + (region >> 3)
            mask = 1 << (region & 7)
            byte = img[i]
            if byte & mask:
                img[i] = byte ^ mask
                self._clean_count -= 1
                self._changed.add(i >> shift)
                self._touched_dirtied = True

    def clear_regions(self, regions: Iterable[int]) -> None:
        regions = self._validated(regions)
        if self._flush_failed:
            return
        img, off, shift = self._img, self._off, self._block_shift
        for region in regions:
            i = off + (region >> 3)
            mask = 1 << (region & 7)
            byte = img[i]
            if not byte & mask:
                img[i] = byte | mask
                self._clean_count += 1
                self._changed.add(i >> shift)
                self._touched_cleaned = True

    def _mark_all_dirty(self) -> None:
        fill_bits(self._img, self._off, 0, self.region_count, False)
        self._clean_count = 0
        first = self._off >> self._block_shift
        last = (self._off + self._bitset_bytes - 1) >> self._block_shift
        self._changed.update(range(first, last + 1))
        self._touched_dirtied = True

    # -- resync -----------------------------------------------------------------

    def _next_out_of_sync(self, start: int) -> int:
        """First region >= start whose sync bit is 0, or region_count."""
        n = self.region_count
        bits = self._sync_bits
        while start < n:
            index = start >> 3
            # Pretend the bits below `start` in this byte are set.
            byte = bits[index] | ((1 << (start & 7)) - 1)
            if byte != 0xFF:
                zeros = ~byte & 0xFF
                region = (index << 3) + (zeros & -zeros).bit_length() - 1
                return region if region < n else n
            found = _NOT_ALL_ONES.search(bits, index + 1)
            if found is None:
                return n
            start = found.start() << 3
        return n

    def get_resync_work(self) -> int | None:
        # Kernel semantics: a forward-only scan from sync_search (reset by resume),
        # skipping regions already handed out and not yet reported.
        n = self.region_count
        if self._sync_search >= n:
            return None
        while True:
            region = self._next_out_of_sync(self._sync_search)
            self._sync_search = region + 1
            if region >= n:
                return None
            if region not in self._recovering:
                break
        self._recovering.add(region)
        return region

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        self._check(region)
        self._recovering.discard(region)
        i = region >> 3
        mask = 1 << (region & 7)
        byte = self._sync_bits[i]
        if in_sync:
            if not byte & mask:  # unlike the kernel, never count a region twice
                self._sync_bits[i] = byte | mask
                self._sync_count += 1
        elif byte & mask:
            self._sync_bits[i] = byte ^ mask
            self._sync_count -= 1

    def get_sync_count(self) -> int:
        return self._sync_count

    @property
    def resync_position(self) -> int:
        """Where the resync scan continues (kernel ``sync_search``); a lower bound of
        regions still waiting for get_resync_work since the last resume."""
        return self._sync_search

    def first_out_of_sync(self, start: int = 0) -> int | None:
        """Lowest region >= ``start`` not in sync, or None (for IS_REMOTE_RECOVERING
        hints)."""
        region = self._next_out_of_sync(max(start, 0))
        return None if region >= self.region_count else region

    def get_sync_bits(self) -> bytes:
        n = self.region_count
        nbytes = (n + 7) // 8
        # _sync_bits is padded to unsigned longs (set past the end under nosync)
        bits = int.from_bytes(self._sync_bits[:nbytes], "little") & ((1 << n) - 1)
        return bits.to_bytes(nbytes, "little")

    def set_sync_bits(self, bits: bytes | bytearray | memoryview) -> int:
        n = self.region_count
        nbytes = (n + 7) // 8
        if len(bits) < nbytes:
            raise ValueError(f"{len(bits)} bytes of sync bits for {n} regions")
        mask = (1 << n) - 1
        new = int.from_bytes(bits[:nbytes], "little") & mask
        current = int.from_bytes(self._sync_bits[:nbytes], "little")
        diff = (current & mask) ^ new
        if not diff:
            return 0
        if self._recovering:
            self._recovering = {r for r in self._recovering if not diff >> r & 1}
        # the padding bits past the last region stay as they were
        self._sync_bits[:nbytes] = (new | (current & ~mask)).to_bytes(nbytes, "little")
        self._sync_count = new.bit_count()
        return diff.bit_count()

    def recovering_regions(self) -> frozenset[int]:
        return frozenset(self._recovering)

    def counts(self) -> LogCounts:
        return LogCounts(region_count=self.region_count, sync_count=self._sync_count,
                         clean_count=self._clean_count, recovering=len(self._recovering))

    def clean_bitmap(self) -> bytes:
        """The clean bitset as the kernel lays it out (LE bit order, padded to u64)."""
        return bytes(self._img[self._off:self._off + self._bitset_bytes])

    def sync_bitmap(self) -> bytes:
        return bytes(self._sync_bits)

    def _sync_suffix(self) -> str:
        return "" if self.sync is SyncMode.DEFAULT else f" {self.sync.value}"

    def _sync_argc(self) -> int:
        return 0 if self.sync is SyncMode.DEFAULT else 1


class CoreLog(BitmapLog):
    """The ``core`` log: state in memory only; flush is a no-op."""

    def __init__(self, config: DirtyLogConfig) -> None:
        if config.type_name != "core":
            raise ValueError(f"CoreLog needs a core config, not {config.type_name!r}")
        super().__init__(config, bytearray(bitset_size(config.region_count)), 0, 30)

    def resume(self) -> None:
        self._sync_search = 0

    def presuspend(self) -> None:
        pass

    def postsuspend(self) -> None:
        pass

    def flush(self) -> None:
        self._changed.clear()
        self._touched_dirtied = self._touched_cleaned = False

    def status_info(self) -> str:
        return f"1 {self.name}"

    def status_table(self) -> str:
        return f"{self.name} {1 + self._sync_argc()} {self.region_size}{self._sync_suffix()}"

    def close(self) -> None:
        self._closed = True
