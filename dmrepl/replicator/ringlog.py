"""The ringbuffer replication log: placement, group commit, replay, release, resize.

Theory of operation
-------------------
* Every write becomes an *entry* (header slot + data) appended at the ring's tail,
  with the next sequence number.  Writers reserve space under the lock, write
  header and data with one ``pwritev`` outside it, and then *commit*: one
  ``flush()`` (fdatasync) of the log store covers every entry written so far (group
  commit).  A lone writer (all earlier entries durable) writes its entry durably
  in the same system call instead (``RWF_DSYNC``) and has nothing left to commit.
  ``durable_seq`` is the longest prefix of entries known durable; only those are
  acknowledged and only those are copied to site links, so no site ever
  holds a write the log could lose.
* Copy progress is one sequence number per site link (``positions``), persisted in
  the ring header, never by rewriting entry headers.  The head (space release)
  moves to the first entry some site link still needs, and the freed space is
  reused only after the ring header recording that head is durable: a scan from
  the recorded head always finds the entries that were live.
* Open scans from the recorded head: an entry is accepted only with the expected
  sequence number, its own position, this log's id, a non-decreasing epoch not
  newer than the header's, valid CRCs of header and data.  The scan stops at the
  first entry that fails (a torn, never acknowledged write).  The epoch is bumped
  and persisted by every open before anything is written, so an entry left over
  from before a crash can never be taken for a newer one with the same number.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dmrepl.blockio._range import Buffer
from dmrepl.crc import crc32c
from dmrepl.replicator import ondisk
from dmrepl.replicator.errors import ReplogCorrupt, ReplogIOError, TableError
from dmrepl.replicator.ondisk import (
    ENTRY_FLAG_ZERO,
    ENTRY_HEADER_SIZE,
    RING_HEADER_OFFSETS,
    RING_OFFSET,
    SECTOR,
    FormatError,
)
from dmrepl.replicator.store import BlockStore, FileStore, pwritev
from dmrepl.replicator.table import LOG_SIZE_MIN, ReplogConfig

LOST_DEV = -1  # the device of a placeholder for a lost entry (see _scan)
PARALLEL_DATA_WRITE = 128 << 10  # bytes: from here on, data write and CRC overlap
IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one pwritev takes
_ZERO_PAD = bytes(SECTOR)  # the tail of an entry's last sector


@dataclass(eq=False, slots=True)
class Entry:
    """One logged write (in memory)."""

    seq: int
    dev: int
    offset: int  # bytes on the device
    length: int  # bytes
    pos: int  # bytes from the log start
    size: int  # bytes occupied in the ring
    slinks: frozenset[int]  # site links the copy was outstanding for when written
    flags: int = 0
    data: bytes | None = None  # cached data (None: read it from the ring)
    ts: float = field(default_factory=time.monotonic)

    @property
    def zero(self) -> bool:
        return bool(self.flags & ENTRY_FLAG_ZERO)

    @property
    def lost(self) -> bool:
        """A placeholder for an entry the replay could not recover."""
        return self.dev == LOST_DEV

    @property
    def end(self) -> int:
        return self.offset + self.length


class RingLog:
    """A ringbuffer log on ``store`` at ``cfg.dev_start``; see the module docstring."""

    def __init__(self, store: BlockStore, cfg: ReplogConfig, *,
                 cache_bytes: int = 64 << 20) -> None:
        self.store = store
        # a store that writes durably in one call (FileStore: RWF_DSYNC), or None
        self._durable_write: Callable[[int, Sequence[Buffer]], None] | None = \
            getattr(store, "pwritev_durable", None)
        self.cfg = cfg
        self.base = cfg.dev_start * SECTOR
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.cache_budget = cache_bytes
        self.cached = 0
        self.entries: deque[Entry] = deque()  # live: not durably released
        self.log_id = 0
        self.epoch = 0
        self.generation = 0
        self.log_size = 0  # sectors
        self.next_seq = 1
        self.tail_pos = RING_OFFSET
        self.durable_seq = 0
        # Epochs (see epoch_end): the durable_seq values reached by each log flush,
        # ascending; entries up to _strict_upto (replayed at open) are one epoch each
        self._bounds: list[int] = []
        self._strict_upto = 0
        self.epoch_listener: Callable[[int], None] | None = None  # tests: boundaries
        self.positions: dict[int, int] = {}  # persisted per slink
        self.failed: BaseException | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._unwritten: set[int] = set()
        self._syncing = False
        self._persist_lock = threading.Lock()
        self.created = False
        self.replayed = 0
        # acknowledged writes the replay could not recover (see _scan): the report
        # persisted in the ring header, and what the engine marks out of sync
        self.lost: dict[str, int] = dict(ondisk.NO_LOST_REPORT)
        self.lost_regions: list[tuple[int, int, int]] = []  # (dev, start, end) bytes
        self.lost_whole = False  # a lost entry's region is unknown: whole devices
        self.stats = {"entries": 0, "bytes": 0, "header_writes": 0, "log_flushes": 0,
                      "durable_writes": 0, "data_reads": 0}

    # -- geometry -----------------------------------------------------------------

    @property
    def ring_start(self) -> int:
        return RING_OFFSET

    @property
    def ring_end(self) -> int:
        return self.log_size * SECTOR

    @property
    def head_seq(self) -> int:
        return self.entries[0].seq if self.entries else self.next_seq

    def used_bytes(self) -> int:
        if not self.entries:
            return 0
        head = self.entries[0].pos
        if self.tail_pos > head:
            return self.tail_pos - head
        return self.ring_end - head + self.tail_pos - self.ring_start

    def _place(self, size: int) -> int | None:
        start, end, tail = self.ring_start, self.ring_end, self.tail_pos
        if not self.entries:
            return tail if tail + size <= end else start
        head = self.entries[0].pos
        if tail > head:
            if tail + size <= end:
                return tail
            return start if start + size <= head else None
        if tail < head and tail + size <= head:
            return tail
        return None

    def fits_ever(self, length: int) -> bool:
        return ondisk.entry_size(length) <= self.ring_end - self.ring_start

    # -- create / open ------------------------------------------------------------

    def _read(self, off: int, length: int) -> bytes:
        return self.store.pread(self.base + off, length)

    def _write(self, off: int, data: bytes) -> None:
        self.store.pwrite(self.base + off, data)

    def _ensure_size(self, sectors: int) -> None:
        """The log device must already hold the log: like dmsetup, a table never
        grows a device (a file grown by a typo would fill the file system)."""
        need = self.base + sectors * SECTOR
        if self.store.size < need:
            how = (f"`truncate -s {need} {self.cfg.dev_path}`"
                   if isinstance(self.store, FileStore) and not self.store.is_blockdev
                   else "a larger device")
            raise TableError(f"replog device {self.cfg.dev_path} too small: the log needs "
                             f"{need} bytes (dev_start {self.cfg.dev_start} + {sectors} "
                             f"sectors), it has {self.store.size}; make room first: {how}")

    def _where(self) -> str:
        return f"replog {self.cfg.dev_path}@{self.cfg.dev_start}"

    def _refusal(self, damage: str) -> ReplogCorrupt:
        return ReplogCorrupt(
            f"{self._where()}: {damage}; not opened, nothing changed (to discard this "
            "log and every write not yet copied, open it with the mode 'create')")

    def _signatures(self) -> list[str]:
        """Our headers whose signature is on the device (damaged or not)."""
        have = self.store.size - self.base
        if have <= 0:
            return []
        return ondisk.signatures(self._read(0, min(have, RING_OFFSET)))

    def open(self) -> None:
        """create/open/auto per the table, then bump the epoch (persisted).

        ``auto`` creates only where no header of ours is found (no signature in the
        log header nor in either ring header slot); a log that carries our
        signature but does not validate is refused like ``open`` refuses it."""
        mode = self.cfg.open_mode
        if mode == "create":
            self._create()
        else:
            try:
                self._load()
            except FormatError as e:
                if mode == "open":
                    raise self._refusal(str(e)) from e
                found = self._signatures()
                if found:
                    raise self._refusal(f"{e} (our signature found: {', '.join(found)})"
                                        ) from e
                self._create()
        self.epoch += 1
        self._write_ring_header(self.positions, self.head_seq_pos())

    def _create(self) -> None:
        size = self.cfg.size or LOG_SIZE_MIN
        self._ensure_size(size)
        self.log_id = int.from_bytes(os.urandom(8), "little") or 1
        self.log_size = size
        self.epoch = 0
        self.generation = 0
        self.next_seq = 1
        self.tail_pos = RING_OFFSET
        self.positions = {}
        self.lost = dict(ondisk.NO_LOST_REPORT)
        self._write(ondisk.LOG_HEADER_OFFSET, ondisk.build_log_header(self.log_id,
                                                                      self.cfg.dev_start))
        self._write(RING_HEADER_OFFSETS[1], bytes(ondisk.SLOT))
        self.store.flush()
        self.created = True

    def _load(self) -> None:
        have = self.store.size - self.base
        if have < RING_OFFSET:
            raise FormatError(f"size: the device holds {max(have, 0)} bytes from dev_start "
                              f"{self.cfg.dev_start}, shorter than the {RING_OFFSET} "
                              "bytes of the log's headers")
        lh = ondisk.parse_log_header(self._read(ondisk.LOG_HEADER_OFFSET, ondisk.SLOT))
        if lh["dev_start"] != self.cfg.dev_start:
            raise FormatError(f"log header: written for dev_start {lh['dev_start']}")
        self.log_id = lh["log_id"]
        best: dict | None = None
        errors = []
        for name, off in zip(("A", "B"), RING_HEADER_OFFSETS, strict=True):
            try:
                rh = ondisk.parse_ring_header(self._read(off, ondisk.SLOT), self.log_id)
            except FormatError as e:
                errors.append(f"{name}: {e}")
                continue
            if best is None or rh["generation"] > best["generation"]:
                best = rh
        if best is None:
            raise self._refusal(f"valid log header but no valid ring header "
                                f"({'; '.join(errors)})")
        if best["log_size"] < LOG_SIZE_MIN or \
                self.base + best["log_size"] * SECTOR > self.store.size:
            raise self._refusal(f"ring header: size: log size {best['log_size']} "
                                "does not fit the device")
        self.generation = best["generation"]
        self.epoch = best["epoch"]
        self.log_size = best["log_size"]
        self.positions = dict(best["slinks"])
        self.lost = best["lost"]
        self._scan(best["head_pos"], best["head_seq"])

    def _try_entry(self, pos: int, seq: int, min_epoch: int
                   ) -> tuple[Entry | None, int, dict | None]:
        """The entry ``seq`` at ``pos`` if it is intact: (entry, its epoch, None);
        else (None, 0, its header) when only its data is damaged (its region is
        known), or (None, 0, None)."""
        if pos < self.ring_start or pos + ENTRY_HEADER_SIZE > self.ring_end:
            return None, 0, None
        try:
            h = ondisk.parse_entry_header(self._read(pos, ENTRY_HEADER_SIZE), self.log_id)
        except FormatError:
            return None, 0, None
        if h["seq"] != seq or h["pos"] != pos or not min_epoch <= h["epoch"] <= self.epoch:
            return None, 0, None
        size = ondisk.entry_size(h["length"], h["flags"])
        if pos + size > self.ring_end:
            return None, 0, None
        e = Entry(seq=seq, dev=h["dev"], offset=h["offset"], length=h["length"], pos=pos,
                  size=size, slinks=ondisk.slinks_of_bitmap(h["slinks"]), flags=h["flags"])
        if not e.zero:
            data = self._read(pos + ENTRY_HEADER_SIZE, h["length"])
            if crc32c(data) != h["data_crc"]:
                return None, 0, h
        return e, h["epoch"], None

    def _entries_after(self, seq: int, min_epoch: int) -> dict[int, tuple[int, int]]:
        """Intact-looking entry headers anywhere in the ring with a sequence number
        above ``seq`` (and an epoch the chain could reach): {seq: (pos, durable_seq
        recorded in it)}.  Read in chunks; only after a damaged entry."""
        found: dict[int, tuple[int, int]] = {}
        chunk = 1 << 20
        magic = ondisk.ENTRY_MAGIC
        for start in range(self.ring_start, self.ring_end, chunk):
            n = min(chunk, self.ring_end - start)
            buf = self._read(start, n)
            for off in range(0, n - ENTRY_HEADER_SIZE + 1, SECTOR):
                if buf[off:off + len(magic)] != magic:
                    continue
                slot = buf[off:off + ENTRY_HEADER_SIZE]
                try:
                    h = ondisk.parse_entry_header(slot, self.log_id)
                except FormatError:
                    continue
                if h["seq"] > seq and h["pos"] == start + off and \
                        min_epoch <= h["epoch"] <= self.epoch:
                    found[h["seq"]] = (start + off, ondisk.entry_durable_seq(slot))
        return found

    def _scan(self, head_pos: int, head_seq: int) -> None:
        """Replay from the recorded head (see the module docstring).

        At the first entry that fails, the rest of the ring is searched for later
        entries.  If one of them was written after the failed one was durable (its
        recorded ``durable_seq``), or a site link's recorded position passed it, the
        failed entry was durable, maybe acknowledged: it is lost, not torn.  The
        replay then goes on from the next intact entry (placeholders, ``lost``
        entries no site link needs, keep the sequence numbers), the lost entries'
        regions (or, where a header is unreadable, the whole devices) are recorded
        in ``lost_regions``/``lost_whole`` for the engine to mark out of sync, and
        the report is persisted in the ring header until cleared.  Otherwise the
        failed entry was in flight at a crash, never acknowledged: the replay ends
        there, as it always did."""
        pos, seq, min_epoch, total = head_pos, head_seq, 0, 0
        capacity = self.ring_end - self.ring_start
        now = time.monotonic()
        new_lost: list[int] = []
        while True:
            e, epoch, damaged = self._try_entry(pos, seq, min_epoch)
            if e is None and pos != self.ring_start:
                e, epoch, damaged2 = self._try_entry(self.ring_start, seq, min_epoch)
                damaged = damaged or damaged2
            if e is None:
                resume = self._lost_gap(seq, min_epoch)
                if resume is None:
                    break
                next_seq, next_pos = resume
                for missing in range(seq, next_seq):
                    self._record_lost(missing, pos, damaged if missing == seq else None,
                                      new_lost)
                if next_pos is None:  # lost up to a site link's position: nothing after
                    seq = next_seq
                    break
                pos, seq = next_pos, next_seq
                continue
            if total + e.size > capacity:
                break
            min_epoch = epoch
            e.ts = now
            total += e.size
            self.entries.append(e)
            pos, seq = e.pos + e.size, seq + 1
        self.next_seq = seq
        self.durable_seq = seq - 1
        self._strict_upto = self.durable_seq  # their epochs are unknown: one each
        self.tail_pos = pos if self.entries else head_pos
        if self.tail_pos > self.ring_end or self.tail_pos < self.ring_start:
            self.tail_pos = self.ring_start
        self.replayed = sum(1 for e in self.entries if not e.lost)
        fresh = [s for s in new_lost if s > self.lost["known_upto"]]
        if fresh:
            report = self.lost
            report["first_seq"] = (min(fresh) if not report["entries"]
                                   else min(report["first_seq"], *fresh))
            report["last_seq"] = max(report["last_seq"], *fresh)
            report["entries"] += len(fresh)
            report["known_upto"] = max(fresh)
            report["whole"] = int(bool(report["whole"]) or self.lost_whole)

    def _lost_gap(self, seq: int, min_epoch: int) -> tuple[int, int | None] | None:
        """Entry ``seq`` failed: where the replay goes on if it was durable
        (sequence number, position; None: nothing intact after it), None if it was
        a torn write in flight."""
        after = self._entries_after(seq, min_epoch)
        proof = max((d for _p, d in after.values()), default=0)
        if proof >= seq:
            for nxt in sorted(after):
                e, _epoch, _h = self._try_entry(after[nxt][0], nxt, min_epoch)
                if e is not None:
                    return nxt, after[nxt][0]
        recorded = max(self.positions.values(), default=0)
        if recorded >= seq:
            return recorded + 1, None
        return None

    def _record_lost(self, seq: int, pos: int, header: dict | None,
                     new_lost: list[int]) -> None:
        if header is not None:
            self.lost_regions.append((header["dev"], header["offset"],
                                      header["offset"] + header["length"]))
        else:
            self.lost_whole = True
        new_lost.append(seq)
        # a placeholder: keeps the numbering, no site link needs it, no data
        self.entries.append(Entry(seq=seq, dev=LOST_DEV, offset=0, length=0, pos=pos,
                                  size=0, slinks=frozenset(), flags=ENTRY_FLAG_ZERO))

    def clear_lost(self) -> dict[str, int]:
        """Clear the lost-writes report (an operator checked the local devices);
        returns the report cleared.  Persisted at once."""
        with self._persist_lock:
            with self.lock:
                cleared = dict(self.lost)
                self.lost = {**self.lost, "entries": 0, "first_seq": 0, "last_seq": 0,
                             "whole": 0}
                head = self.head_seq_pos()
                positions = dict(self.positions)
            self._write_ring_header(positions, head)
        return cleared

    def head_seq_pos(self) -> tuple[int, int]:
        if self.entries:
            return self.entries[0].pos, self.entries[0].seq
        return self.tail_pos, self.next_seq

    # -- appending -----------------------------------------------------------------

    def reserve(self, dev: int, offset: int, length: int, slinks: frozenset[int],
                data: bytes | None, *, zero: bool = False,
                now: float | None = None) -> Entry | None:
        """Reserve the next entry (call with ``self.lock`` held); None: no space.
        ``now``: the entry's time stamp (``time.monotonic()``), if the caller has it."""
        if self.failed is not None:
            raise ReplogIOError(f"replication log failed earlier: {self.failed}")
        flags = ENTRY_FLAG_ZERO if zero else 0
        size = ondisk.entry_size(length, flags)
        pos = self._place(size)
        if pos is None:
            return None
        if data is not None and self.cached + length <= self.cache_budget:
            self.cached += length
        else:
            data = None     # (not cached: read back from the ring when copied)
        # (positional: the write path's one object per write)
        e = Entry(self.next_seq, dev, offset, length, pos, size, slinks, flags, data,
                  time.monotonic() if now is None else now)
        self.next_seq += 1
        self.tail_pos = pos + size
        self.entries.append(e)
        self._unwritten.add(e.seq)
        return e

    parallel_min = PARALLEL_DATA_WRITE

    def write_entry(self, e: Entry, data: bytes | memoryview | None,
                    durable: bool = False) -> None:
        """Write header and data of a reserved entry (no lock held).

        Small entries: the CRC32C, then one ``pwritev`` of the contiguous header +
        data.  From ``parallel_min`` bytes on, a helper thread writes the data while
        the CRC is computed here (both release the GIL), then the header is
        written: the CRC (0.06 ms per MiB idle, 0.3 ms on a loaded host) costs no
        latency.

        ``durable``: the caller will commit this entry next.  If every entry before
        it is durable already (a lone writer, e.g. QD1) and the store can write
        durably in one call, the entry is written that way and is durable when this
        returns: its commit then costs nothing (no second system call, no flush of
        the whole log file).  Concurrent writers keep the group commit: one flush for
        all of them beats one durable write each."""
        durable_write = (self._durable_write
                         if durable and self.durable_seq == e.seq - 1 else None)
        lone = durable_write is not None
        if (not lone and not e.zero and data is not None
                and len(data) >= self.parallel_min and e.length % SECTOR == 0):
            fut = self._pool().submit(self.store.pwrite,
                                      self.base + e.pos + ENTRY_HEADER_SIZE, data)
            hdr = ondisk.entry_header(self.log_id, self.epoch, e.seq, e.pos, e.dev,
                                      e.offset, e.length, crc32c(data),
                                      ondisk.slink_bitmap(e.slinks), e.flags,
                                      self.durable_seq)
            try:
                self.store.pwrite(self.base + e.pos, hdr)
                fut.result()
            except OSError as err:
                self._fail(err)
                raise ReplogIOError(f"replication log write failed: {err}") from err
            self._written(e, False)
            return
        if e.flags & ENTRY_FLAG_ZERO or data is None:
            crc = 0
            bufs: list[bytes | memoryview] = []
        else:
            crc = crc32c(data)
            bufs = [data]
            pad = -e.length % SECTOR
            if pad:
                bufs.append(bytes(pad))
        bufs.insert(0, ondisk.entry_header(self.log_id, self.epoch, e.seq, e.pos, e.dev,
                                           e.offset, e.length, crc,
                                           ondisk.slink_bitmap(e.slinks), e.flags,
                                           self.durable_seq))
        try:
            if durable_write is not None:
                durable_write(self.base + e.pos, bufs)
            else:
                pwritev(self.store, self.base + e.pos, bufs)
        except OSError as err:
            self._fail(err)
            raise ReplogIOError(f"replication log write failed: {err}") from err
        self._written(e, lone)

    def write_entries(self, batch: Sequence[tuple[Entry, Buffer | None]],
                      durable: bool = False) -> None:
        """Write header and data of reserved entries of consecutive sequence
        numbers (no lock held): one ``pwritev`` per run of them contiguous in the
        ring (two where the batch wraps), then one update of the bookkeeping.

        ``durable``: as :meth:`write_entry`'s.  A batch written by one call after
        every earlier entry was durable is written durably by that call (the
        batch is then one group commit of its own, and durable on return)."""
        if not batch:
            return
        first, last = batch[0][0], batch[-1][0]
        runs: list[tuple[int, list[Buffer]]] = []
        end = -1
        log_id, epoch = self.log_id, self.epoch
        entry_header = ondisk.entry_header
        tail = ondisk.entry_header_tail(self.durable_seq)   # (the same for the batch)
        slinks: frozenset[int] | None = None
        bitmap = b""
        bufs: list[Buffer] = []
        for e, data in batch:
            if e.pos != end:
                bufs = []
                runs.append((e.pos, bufs))
            if e.slinks is not slinks:
                slinks = e.slinks
                bitmap = ondisk.slink_bitmap(slinks)
            if e.flags & ENTRY_FLAG_ZERO:
                data = None
            bufs.append(entry_header(log_id, epoch, e.seq, e.pos, e.dev, e.offset, e.length,
                                     0 if data is None else crc32c(data), bitmap, e.flags,
                                     tail=tail))
            if data is not None:
                bufs.append(data)
                pad = -e.length % SECTOR
                if pad:
                    bufs.append(_ZERO_PAD[:pad])
            end = e.pos + e.size
        durable_write = (self._durable_write if durable and len(runs) == 1
                         and len(runs[0][1]) <= IOV_MAX
                         and self.durable_seq == first.seq - 1 else None)
        try:
            for pos, bufs in runs:
                if durable_write is not None:
                    durable_write(self.base + pos, bufs)
                    continue
                for i in range(0, len(bufs), IOV_MAX):
                    part = bufs[i:i + IOV_MAX]
                    pwritev(self.store, self.base + pos, part)
                    pos += sum(len(b) for b in part)
        except OSError as err:
            self._fail(err)
            raise ReplogIOError(f"replication log write failed: {err}") from err
        nbytes = sum(e.length for e, _data in batch)
        with self.lock:
            self._unwritten.difference_update(range(first.seq, last.seq + 1))
            self.stats["bytes"] += nbytes
            self.stats["entries"] += len(batch)
            if durable_write is not None:
                self.stats["durable_writes"] += 1
                if self.durable_seq == first.seq - 1:
                    self._durable_upto(last.seq)   # the batch: a group of its own
            self.cond.notify_all()

    def _pool(self) -> ThreadPoolExecutor:
        with self.lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=4,
                                                    thread_name_prefix="replog-data")
            return self._executor

    def close(self) -> None:
        """Stop the helper threads and close the store."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.store.close()

    def _written(self, e: Entry, durable: bool) -> None:
        with self.lock:
            self._unwritten.discard(e.seq)
            self.stats["entries"] += 1
            self.stats["bytes"] += e.length
            if durable:
                self.stats["durable_writes"] += 1
                if self.durable_seq == e.seq - 1:
                    # everything before it was durable and it is: a group of one
                    self._durable_upto(e.seq)
            self.cond.notify_all()

    def _durable_upto(self, seq: int) -> None:
        # caller holds the lock; seq > durable_seq
        self.durable_seq = seq
        self._bounds.append(seq)
        if self.epoch_listener is not None:
            self.epoch_listener(seq)

    def _fail(self, err: BaseException) -> None:
        with self.cond:
            if self.failed is None:
                self.failed = err
            self.cond.notify_all()

    def _contiguous(self) -> int:
        return (min(self._unwritten) - 1) if self._unwritten else self.next_seq - 1

    def commit_ready_locked(self) -> int | None:
        """The newest entry a group commit started now would make durable (every
        entry up to it written), or None: none beyond ``durable_seq``, or a commit
        is running (it takes them)."""
        if self._syncing or self.durable_seq >= self.next_seq - 1:
            return None
        target = self._contiguous()
        return target if target > self.durable_seq else None

    def written_locked(self, seq: int) -> bool:
        """Is the data of entry ``seq`` on the log device (a reserved entry's is not
        until its write completes; reads of it are then undefined)?"""
        return seq not in self._unwritten

    def commit(self, seq: int, on_durable: Callable[[], None] | None = None) -> None:
        """Return once entries up to ``seq`` are durable (group commit)."""
        while True:
            with self.cond:
                while (self.durable_seq < seq and self.failed is None
                       and (self._syncing or self._contiguous() < seq)):
                    self.cond.wait()
                if self.failed is not None and self.durable_seq < seq:
                    raise ReplogIOError(f"replication log failed: {self.failed}")
                if self.durable_seq >= seq:
                    return
                self._syncing = True
                target = self._contiguous()
            try:
                self.store.flush()
            except OSError as err:
                self._fail(err)
                raise ReplogIOError(f"replication log flush failed: {err}") from err
            finally:
                with self.cond:
                    self._syncing = False
                    self.cond.notify_all()
            with self.cond:
                self.stats["log_flushes"] += 1
                if target > self.durable_seq:
                    self._durable_upto(target)
                self.cond.notify_all()
            if on_durable is not None:
                on_durable()

    # -- reading ------------------------------------------------------------------

    def entry_data(self, e: Entry) -> bytes:
        """The entry's data (cached, or read from the ring and checked)."""
        d = e.data
        if d is not None:
            return d
        if e.zero:
            return bytes(e.length)
        raw = self.store.pread(self.base + e.pos, ENTRY_HEADER_SIZE + e.length)
        try:
            h = ondisk.parse_entry_header(raw[:ENTRY_HEADER_SIZE], self.log_id)
        except FormatError as err:
            raise ReplogCorrupt(f"entry {e.seq} unreadable: {err}") from err
        data = raw[ENTRY_HEADER_SIZE:]
        if h["seq"] != e.seq or crc32c(data) != h["data_crc"]:
            raise ReplogCorrupt(f"entry {e.seq}: data CRC mismatch on re-read")
        self.stats["data_reads"] += 1
        with self.lock:
            # Re-read data may overshoot the budget (up to twice) so the other site
            # links find it in memory instead of reading the log again.
            if e.data is None and self.cached + e.length <= 2 * self.cache_budget:
                e.data = data
                self.cached += e.length
        return data

    def drop_cache(self, e: Entry) -> None:
        """Forget cached data (call with the lock held)."""
        if e.data is not None:
            self.cached -= e.length
            e.data = None

    def epoch_end(self, seq: int) -> int:
        """The last sequence number of the epoch of durable entry ``seq``.

        An epoch is the set of entries one log flush made durable (group commit):
        they were in flight together, none was acknowledged (nor covered by a
        completed flush) before another one was submitted, so no caller can depend
        on their relative order and a site may apply them in any order (DRBD's
        epochs).  Entries found by the replay at open are one epoch each (their
        groups are not recorded).  Call with the lock held."""
        if seq <= self._strict_upto:
            return seq
        i = bisect.bisect_left(self._bounds, seq)
        return self._bounds[i] if i < len(self._bounds) else seq

    def entry(self, seq: int) -> Entry | None:
        if not self.entries:
            return None
        i = seq - self.entries[0].seq
        if 0 <= i < len(self.entries):
            return self.entries[i]
        return None

    # -- progress, release ----------------------------------------------------------

    def _write_ring_header(self, positions: dict[int, int], head: tuple[int, int],
                           log_size: int | None = None) -> None:
        gen = self.generation + 1
        raw = ondisk.build_ring_header(
            log_id=self.log_id, epoch=self.epoch, generation=gen,
            log_size=log_size or self.log_size, head_pos=head[0], head_seq=head[1],
            slinks=positions, lost=self.lost)
        try:
            self._write(RING_HEADER_OFFSETS[gen % 2], raw)
            self.store.flush()
        except OSError as err:
            self._fail(err)
            raise ReplogIOError(f"ring header write failed: {err}") from err
        self.generation = gen
        self.stats["header_writes"] += 1

    def persist(self, positions: dict[int, int] | Callable[[], dict[int, int]],
                floors: Callable[[], dict[int, int]] | None = None
                ) -> tuple[int, dict[int, int]]:
        """Persist per-slink positions and release the entries all of them passed.

        ``positions`` (or the function giving them, called with the lock held and
        in the same order as the header writes, so that positions on disk never go
        back) must only hold progress already durable on the devices.  ``floors``
        (called right after, under the lock): positions the header records at most
        for some site links (the release still follows ``positions``: a recorded
        position below the head tells the next open that the site link lost
        released entries).  Returns the number of entries released and the
        positions persisted as progress (``positions``, not floored)."""
        with self._persist_lock:
            with self.lock:
                if callable(positions):
                    positions = positions()
                low = floors() if floors is not None else {}
                recorded = {nr: min(pos, low.get(nr, pos)) for nr, pos in positions.items()}
                release = min(positions.values()) if positions else self.durable_seq
                release = min(release, self.durable_seq)
                head = None
                for e in self.entries:
                    if e.seq > release:
                        head = (e.pos, e.seq)
                        break
                if head is None:
                    head = (self.tail_pos, self.next_seq)
                    # every live entry is released: keep the durable ones only
                    release = min(release, self.next_seq - 1)
                pos_copy = dict(positions)
            self._write_ring_header(recorded, head)
            n = 0
            with self.cond:
                self.positions = recorded
                while self.entries and self.entries[0].seq <= release \
                        and self.entries[0].seq not in self._unwritten:
                    e = self.entries.popleft()
                    self.drop_cache(e)
                    n += 1
                gone = bisect.bisect_left(self._bounds, self.head_seq)
                if gone:
                    del self._bounds[:gone]
                self.cond.notify_all()
            return n, pos_copy

    def resize(self, sectors: int) -> None:
        """``replog resize``: grow always; shrink only if the live entries fit."""
        if sectors < LOG_SIZE_MIN:
            raise TableError(f"replog resize {sectors}: below the minimum {LOG_SIZE_MIN}")
        with self._persist_lock:
            with self.lock:
                end = sectors * SECTOR
                if end < self.ring_end:
                    if any(e.pos + e.size > end for e in self.entries) or \
                            (self.entries and self.tail_pos > end):
                        raise TableError(f"replog resize {sectors}: live entries lie beyond "
                                         "the new end; retry when the log has drained")
            self._ensure_size(sectors)
            with self.lock:
                head = self.head_seq_pos()
                positions = dict(self.positions)
            self._write_ring_header(positions, head, sectors)
            with self.cond:
                self.log_size = sectors
                if self.tail_pos > self.ring_end:
                    self.tail_pos = self.ring_start
                self.cond.notify_all()
