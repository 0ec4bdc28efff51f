"""The replicator engine: devices, site links, copiers, resync, messages, status.

Rules / theory of operation
---------------------------
* One ring (:mod:`dmrepl.replicator.ringlog`) per replicator holds every write of
  every device in one order.  A write is acknowledged once its entry is durable in
  the ring and every site link that holds acknowledgements (policy ``sync``, or an
  async one in forced sync after passing its fall-behind threshold) has the data
  durable on its device.  A site link that is down holds no acknowledgement.
* Each site link has one copier thread that applies the durable entries in log
  order (site link 0 = the local devices, written from the ring like any site).
  It reads each entry once (shared in-memory copy; the ring is re-read only for
  entries that did not fit the cache), writes batches without waiting per copy,
  and records progress as one sequence number per site link: *applied* (written),
  *durable* (device flushed) and *persisted* (in the ring header).
* Epochs: the entries one log flush made durable (a group commit) were in flight
  together at the primary, none acknowledged before another was submitted, so
  their order is free; a copier writes the copies of one epoch together (up to
  ``copy_inflight`` in flight, on the site link's I/O threads) and starts the
  next epoch only when all of them completed.  So each site holds, at every
  moment, all epochs before some epoch k plus a part of epoch k: a state the
  primary's devices could have held (a crash of the primary shows the same).
  Entries replayed at open are one epoch each.
* Idempotent replay: a copier never applies an entry that overlaps another entry
  applied since its last persisted position; it first flushes its devices and
  persists its position.  After a crash the replay from the persisted position
  therefore only rewrites data the device already holds until it reaches new
  entries, so each site holds a prefix of the write history at every moment.
* Ring full: writers wait.  If only async, non-stall remote site links hold the
  oldest entry (down ones at once, slow ones after ``full_grace`` seconds), their
  outstanding entries are dropped: the regions are marked out of sync in their
  devices' dirty logs (flushed first), their position jumps, the ring head moves.
  Such a site is resynchronised region by region from the local devices once it is
  up and has no entries outstanding; it is reported inconsistent until done.
* A failing remote device takes its site link down; it is tested (a 512-byte read)
  every ``retry_interval`` seconds and the copier resumes where it stopped.  A
  failing local device fails the writes waiting for it and new writes to it
  (:class:`LocalIOError`); it is retried the same way.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from dmrepl.errors import UserError
from dmrepl.numbers import parse_int
from dmrepl.replicator import ondisk
from dmrepl.replicator._state import (
    AckEvent,
    AckState,
    DeviceEvent,
    DeviceState,
    LinkEvent,
    LinkState,
    ResyncEvent,
    ResyncState,
    StateMachine,
    machine,
)
from dmrepl.replicator.errors import (
    DeviceBusy,
    LocalIOError,
    MessageError,
    ReplicatorClosed,
    ReplogIOError,
    TableError,
)
from dmrepl.replicator.ringlog import Entry, RingLog
from dmrepl.replicator.store import BlockStore, DeviceOpener, open_file_store
from dmrepl.replicator.table import (
    LOG_SIZE_MIN,
    DeviceConfig,
    LegConfig,
    ReplicatorConfig,
    SlinkConfig,
    format_rate,
    parse_device,
    parse_fallbehind,
    parse_legs,
    parse_policy,
    parse_rate,
    parse_replicator,
    parse_slinks,
)

VERSION = "1.0.0"
SECTOR = 512
MAX_ENTRY = 8 << 20  # larger writes are split into several entries
INDEX_BUCKET = 1 << 20  # bytes per bucket of the pending-entry index
_NO_SYNCS: frozenset[int] = frozenset()  # a write no site link holds
# writes up to this size fit a quarter of the smallest ring (see _write): never split
_NEVER_SPLIT = ((LOG_SIZE_MIN * SECTOR - ondisk.RING_OFFSET) // 4
                - ondisk.ENTRY_HEADER_SIZE) // SECTOR * SECTOR

log = logging.getLogger("dmrepl.replicator")
LOST_CLEAR_MESSAGE = "replog clear_lost"

_active_lock = threading.Lock()
_active_logs: set[tuple[str, int]] = set()


def _log_key(path: str, start: int) -> tuple[str, int]:
    return (os.path.realpath(path), start)


@dataclass(eq=False)
class Leg:
    """A device on one site link (local: slink 0)."""

    slink_nr: int
    cfg: LegConfig
    store: BlockStore
    dlog: Any = None  # dmrepl.dirtylog.DirtyLog for remote legs
    error: str = ""  # "", "R", "W" or "RW"
    lock: threading.Lock = field(default_factory=threading.Lock)
    cursor: int = 0  # resync scan position
    resynced: int = 0  # regions copied by resync

    def out_of_sync(self) -> int:
        if self.dlog is None:
            return 0
        with self.lock:
            return int(self.dlog.region_count - self.dlog.get_sync_count())


Copy = tuple[Entry, "Leg | None", int]  # an entry, its leg (None: skip), its epoch end
Failure = tuple[Entry, "Leg", OSError]  # a copy that failed


@dataclass(eq=False)
class Slink:
    cfg: SlinkConfig
    applied: int
    durable: int
    persisted: int
    error: str = ""
    next_retry: float = 0.0
    drop_requested: bool = False
    drops: int = 0
    closing: bool = False
    thread: threading.Thread | None = None
    window: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    window_n: int = 0
    touched: set[int] = field(default_factory=set)
    out_ios: int = 0
    out_bytes: int = 0
    want_durable: int = 0
    # set when someone needs this site link's copier now: ends a coalescing pause
    hurry: threading.Event = field(default_factory=threading.Event)
    last_persist: float = field(default_factory=time.monotonic)
    copies: int = 0
    copied_bytes: int = 0
    batches: int = 0
    failures: int = 0
    # the state machines of _state.py (link up/down, ack mode, resync)
    link: StateMachine = field(default_factory=lambda: machine("site link: link"))
    ack: StateMachine = field(default_factory=lambda: machine("site link: ack mode"))
    resync: StateMachine = field(default_factory=lambda: machine("site link: resync"))
    pool: ThreadPoolExecutor | None = None  # copies of one epoch in flight together
    resync_next: float = 0.0  # resync rate limit: next region not before (clock)
    resync_throttled: bool = False  # waiting for the rate limit now
    resync_bytes: int = 0
    inflight_max: int = 0  # most copies seen in flight at once

    @property
    def nr(self) -> int:
        return self.cfg.slink_nr

    @property
    def up(self) -> bool:
        return self.link.state is LinkState.UP

    @property
    def forced(self) -> bool:
        return self.ack.state is AckState.FORCED_SYNC

    @property
    def resyncing(self) -> bool:
        return self.resync.state is ResyncState.RESYNCING

    def window_overlaps(self, dev: int, start: int, end: int) -> bool:
        return _overlaps(self.window.get(dev), start, end)

    def window_add(self, dev: int, start: int, end: int) -> None:
        bisect.insort(self.window.setdefault(dev, []), (start, end))
        self.window_n += 1


def _overlaps(iv: list[tuple[int, int]] | None, start: int, end: int) -> bool:
    """Does [start, end) overlap an interval of ``iv`` (sorted, non-overlapping)?"""
    if not iv:
        return False
    i = bisect.bisect_left(iv, (start, start))
    if i < len(iv) and iv[i][0] < end:
        return True
    return i > 0 and iv[i - 1][1] > start


class Replicator:
    """A replication log with its site links and devices; see the module docstring.

    Thread-safe.  Copies run only between :meth:`start` and :meth:`stop`."""

    def __init__(self, cfg: ReplicatorConfig, *, opener: DeviceOpener | None = None,
                 retry_interval: float = 15.0, persist_interval: float = 0.5,
                 full_grace: float = 1.0, cache_bytes: int = 128 << 20,
                 batch_bytes: int = 16 << 20, batch_entries: int = 512,
                 window_entries: int = 8192, resync_chunk: int = 1 << 20,
                 durable_acks: bool = True, copier_nice: int = 0,
                 copy_inflight: int = 8, coalesce_delay: float = 0.002,
                 coalesce_entries: int = 32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.copy_inflight = copy_inflight
        # An async copier that just copied a small batch pauses this long before it
        # looks again, so that the next batch carries more entries: waking both
        # copiers for every logged write cost more CPU (and GIL hand-offs to the
        # writer) than the copies themselves (4 KiB durable writes: 1244 IOPS with
        # the copiers running, 2461 without).  Never while a write waits for the site
        # link (sync, forced sync), nor when the ring needs space; close ends it.
        self.coalesce_delay = coalesce_delay
        self.coalesce_entries = coalesce_entries
        self.clock = clock  # the resync rate limiter's time (tests: a fake one)
        self.copier_nice = copier_nice
        # durable_acks=False: a write is acknowledged once written to the log store
        # (like a disk with a volatile write cache); flush() and FUA writes make it
        # durable.  Copies are still made only of durable entries.
        self.durable_acks = durable_acks
        self.opener: DeviceOpener = opener or open_file_store
        self.retry_interval = retry_interval
        self.persist_interval = persist_interval
        self.full_grace = full_grace
        self.batch_bytes = batch_bytes
        self.batch_entries = batch_entries
        self.window_entries = window_entries
        self.resync_chunk = resync_chunk
        self._key = _log_key(cfg.replog.dev_path, cfg.replog.dev_start)
        with _active_lock:
            if self._key in _active_logs:
                raise TableError(f"replication log {cfg.replog.dev_path} at "
                                 f"{cfg.replog.dev_start} is already active")
            _active_logs.add(self._key)
        try:
            try:
                store = self.opener(cfg.replog.dev_path)
            except OSError as e:
                raise TableError(f"cannot open replog device {cfg.replog.dev_path}: "
                                 f"{e.strerror or e}") from e
            try:
                # one writer per log, across processes too (a store that cannot
                # be claimed, e.g. a test's fake, has no claim_exclusive)
                claim = getattr(store, "claim_exclusive", None)
                if claim is not None:
                    claim()
            except BaseException:
                store.close()
                raise
            self.ring = RingLog(store, cfg.replog, cache_bytes=cache_bytes)
            try:
                self.ring.open()
            except BaseException:
                store.close()
                raise
        except BaseException:
            with _active_lock:
                _active_logs.discard(self._key)
            raise
        self.lock = self.ring.lock
        self.cond = self.ring.cond
        # entries not yet on the local devices, by device and 1 MiB bucket (reads
        # and resync look only at the buckets they touch)
        self._index: dict[int, dict[int, dict[int, Entry]]] = {}
        for entry in self.ring.entries:
            self._index_add(entry)
        self.slinks: dict[int, Slink] = {}
        for s in cfg.slinks:
            sl = self._add_slink(s)
            # the lag counters cover the replayed entries this site link still
            # needs (else they go negative as the replay applies them)
            for entry in self.ring.entries:
                if entry.seq > sl.applied and sl.nr in entry.slinks:
                    sl.out_ios += 1
                    sl.out_bytes += entry.length
        self.devices: dict[int, ReplicatedDevice] = {}
        self.running = False
        self.closed = False
        self.event_nr = 0
        self.statistics = False
        self.stats = {"r": 0, "w": 0, "rs": 0, "ws": 0, "nc": 0, "c": 0}
        self._space_wanted = False
        self._full_since: float | None = None
        self._graveyard: list[BlockStore] = []
        self.messages: list[str] = []  # recent notable events, newest last
        if self.ring.lost_regions or self.ring.lost_whole:
            log.error("%s: replay found lost entries: their regions are marked out of "
                      "sync on every site link as their devices are added", cfg.replog.dev_path)
        report = self.lost_report()
        if report is not None:
            log.error("%s", report)
            self.messages.append(report)

    # -- construction -----------------------------------------------------------

    @classmethod
    def from_table(cls, line: str, *, opener: DeviceOpener | None = None,
                   **tuning: Any) -> Replicator:
        """Build from a ``replicator`` table line (or its parameters only)."""
        return cls(parse_replicator(line), opener=opener, **tuning)

    def _add_slink(self, s: SlinkConfig) -> Slink:
        base = self.ring.head_seq - 1
        pos = self.ring.positions.get(s.slink_nr, base)
        pos = max(pos, base)
        sl = Slink(cfg=s, applied=pos, durable=pos, persisted=pos)
        self.slinks[s.slink_nr] = sl
        return sl

    def _bump(self, note: str | None = None) -> None:
        # caller holds the lock
        self.event_nr += 1
        if note:
            self.messages.append(note)
            del self.messages[:-50]
        self.cond.notify_all()

    def wait_event(self, after: int, timeout: float | None) -> int:
        """Block until ``event_nr > after`` (or timeout); return ``event_nr``."""
        with self.cond:
            self.cond.wait_for(lambda: self.event_nr > after or self.closed, timeout)
            return self.event_nr

    # -- devices ------------------------------------------------------------------

    def add_device(self, line: str) -> ReplicatedDevice:
        """Add a device from a ``replicator-dev`` line (or its parameters)."""
        self._check_open()
        cfg = parse_device(line)
        with self.lock:
            if cfg.dev_nr in self.devices:
                raise TableError(f"device number {cfg.dev_nr} is already in use")
        local = cfg.leg(0)
        if local is None:
            raise TableError(f"device {cfg.dev_nr}: the local device (site link 0) is "
                             "missing")
        legs = self._open_legs(cfg.dev_nr, cfg.legs, cfg.length, [])
        try:
            size = legs[0].store.size if cfg.length is None else cfg.length * SECTOR
            if cfg.length is None:
                cfg = replace(cfg, length=size // SECTOR)
            self._mark_lost(cfg.dev_nr, legs)
            dev = ReplicatedDevice(self, cfg, legs, size)
            with self.cond:
                if cfg.dev_nr in self.devices:
                    raise TableError(f"device number {cfg.dev_nr} is already in use")
                self.devices[cfg.dev_nr] = dev
                self._bump(f"device {cfg.dev_nr} added")
            return dev
        except BaseException:
            for leg in legs.values():
                self._close_leg(leg)
            raise

    def _open_legs(self, dev_nr: int, cfgs: Sequence[LegConfig], length: int | None,
                   existing: Sequence[Leg]) -> dict[int, Leg]:
        """Validate legs against the replicator and open them (all or none)."""
        paths: dict[str, tuple[int, int]] = {}
        with self.lock:
            region = self._region_size()
            for d in self.devices.values():
                for leg in d.legs.values():
                    paths[os.path.realpath(leg.cfg.dev_path)] = (d.dev_nr, leg.slink_nr)
        for leg in existing:
            paths[os.path.realpath(leg.cfg.dev_path)] = (dev_nr, leg.slink_nr)
        for c in cfgs:
            if c.slink_nr not in self.slinks:
                raise TableError(f"device {dev_nr}: site link {c.slink_nr} is not defined by "
                                 "the replicator")
            rp = os.path.realpath(c.dev_path)
            if rp in paths:
                other = paths[rp]
                raise TableError(f"device {c.dev_path} is already used by device {other[0]} "
                                 f"on site link {other[1]}")
            rs = c.region_size()
            if rs is not None:
                if region is not None and rs != region:
                    raise TableError(f"device {dev_nr}: region size {rs} of {c.dev_path} "
                                     f"differs from the replicator's region size {region}")
                region = rs
        legs: dict[int, Leg] = {}
        try:
            # every device is opened and checked, then every dirty log opened, before
            # any dirty log is resumed (writes): a refused leg leaves nothing behind
            for c in cfgs:
                try:
                    store = self.opener(c.dev_path)
                except OSError as e:
                    raise TableError(f"cannot open device {c.dev_path} (site link "
                                     f"{c.slink_nr}): {e.strerror or e}") from e
                legs[c.slink_nr] = Leg(c.slink_nr, c, store)
            self._check_leg_sizes(dev_nr, legs, length, existing)
            from dmrepl.dirtylog import open_dirty_log
            for leg in legs.values():
                if leg.slink_nr:
                    sectors = length if length is not None else legs[0].store.size // SECTOR
                    try:
                        leg.dlog = open_dirty_log(leg.cfg.dlog_type, leg.cfg.dlog_args,
                                                  sectors)
                    except UserError as e:
                        raise TableError(f"dirty log of {leg.cfg.dev_path} (site link "
                                         f"{leg.slink_nr}): {e}") from e
            for leg in legs.values():
                if leg.dlog is not None:
                    leg.dlog.resume()
        except BaseException:
            for leg in legs.values():
                self._close_leg(leg)
            raise
        return legs

    def _mark_lost(self, dev_nr: int, legs: dict[int, Leg]) -> None:
        """Mark out of sync, on every remote leg of a device being added, the
        regions of the entries the replay lost (all of them where a lost header was
        unreadable): before its copiers run, so no site link ships the entries after
        the loss and stays in sync where it lacks the lost one (the resync copies
        the local device's content there)."""
        ring = self.ring
        ranges = [(lo, hi) for d, lo, hi in ring.lost_regions if d == dev_nr]
        if not ranges and not ring.lost_whole:
            return
        for leg in legs.values():
            if leg.dlog is None:
                continue
            rs = leg.dlog.region_size * SECTOR
            if ring.lost_whole:
                regions = set(range(leg.dlog.region_count))
            else:
                regions = {r for lo, hi in ranges
                           for r in range(lo // rs, (max(hi, lo + 1) - 1) // rs + 1)}
            try:
                with leg.lock:
                    for r in sorted(regions):
                        leg.dlog.mark_region(r)
                        leg.dlog.set_region_sync(r, False)
                    leg.dlog.flush()
            except Exception as err:
                raise TableError(f"device {dev_nr}: cannot mark the regions of lost "
                                 f"replication log entries out of sync in the dirty log "
                                 f"of {leg.cfg.dev_path}: {err}") from err
            log.warning("device %d, site link %d: %d regions marked out of sync after "
                        "lost replication log entries", dev_nr, leg.slink_nr, len(regions))

    def lost_report(self) -> str | None:
        """The lost-writes error (one line), or None: shown until cleared."""
        lost = self.ring.lost
        if not lost["entries"]:
            return None
        where = ("whole devices" if lost["whole"] else "their regions")
        return (f"ERROR: replication log {self.cfg.replog.dev_path}: "
                f"{lost['entries']} acknowledged writes lost (entries {lost['first_seq']}"
                f"..{lost['last_seq']} damaged): the local devices may lack them; "
                f"{where} marked out of sync on every site link; check the local data, "
                f"then clear with the message '{LOST_CLEAR_MESSAGE}'")

    @staticmethod
    def _check_leg_sizes(dev_nr: int, legs: dict[int, Leg], length: int | None,
                         existing: Sequence[Leg]) -> None:
        """Every device holds the replicated device: ``length`` sectors, or (none
        given) the local device's size."""
        local = legs.get(0) or next((leg for leg in existing if leg.slink_nr == 0), None)
        if local is None:
            raise TableError(f"device {dev_nr}: the local device (site link 0) is missing")
        size = local.store.size if length is None else length * SECTOR
        if size > local.store.size:
            raise TableError(f"device {dev_nr}: length {size // SECTOR} sectors exceeds "
                             f"local device {local.cfg.dev_path} "
                             f"({local.store.size // SECTOR} sectors)")
        for leg in legs.values():
            if leg.slink_nr and leg.store.size < size:
                raise TableError(f"device {dev_nr}: remote device {leg.cfg.dev_path} "
                                 f"(site link {leg.slink_nr}) is smaller than the local "
                                 "device")

    def _region_size(self) -> int | None:
        for d in self.devices.values():
            for leg in d.legs.values():
                rs = leg.cfg.region_size()
                if rs is not None:
                    return rs
        return None

    def _close_leg(self, leg: Leg) -> None:
        if leg.dlog is not None:
            try:
                leg.dlog.postsuspend()
                leg.dlog.close()
            except Exception:
                pass
        try:
            leg.store.close()
        except OSError:
            pass

    def remove_device(self, dev_nr: int, timeout: float = 0.0) -> None:
        """Remove a device; waits up to ``timeout`` seconds for its writes to reach
        every site link, then refuses (:class:`DeviceBusy`) while some are not
        copied.  An unknown device number is a UserError."""
        deadline = time.monotonic() + timeout
        with self.cond:
            dev = self.devices.get(dev_nr)
            if dev is None:
                raise UserError(f"no device number {dev_nr}")
            while True:
                pending = self._pending_for_dev(dev_nr)
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    break
                self.cond.wait(min(left, 0.05))
            if pending:
                raise DeviceBusy(f"device {dev_nr} has {pending} writes not yet copied to "
                                 "all its site links; retry when they drained")
            del self.devices[dev_nr]
            dev.sm.fire(DeviceEvent.REMOVE)
            self._bump(f"device {dev_nr} removed")
        for leg in dev.legs.values():
            self._close_leg(leg)

    def _pending_for_dev(self, dev_nr: int) -> int:
        n = 0
        low = min(s.applied for s in self.slinks.values())
        for seq in range(low + 1, self.ring.next_seq):
            e = self.ring.entry(seq)
            if e is not None and e.dev == dev_nr:
                for nr in e.slinks:
                    s = self.slinks.get(nr)
                    if s is not None and s.applied < seq:
                        n += 1
                        break
        return n

    # -- lifecycle ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ReplicatorClosed("replicator is closed")

    def start(self) -> None:
        """Start (resume) copying to every site link."""
        self._check_open()
        with self.cond:
            self.running = True
            for s in self.slinks.values():
                self._ensure_thread(s)
            self._bump("started")

    def _ensure_thread(self, s: Slink) -> None:
        if s.thread is None or not s.thread.is_alive():
            s.closing = False
            s.thread = threading.Thread(target=self._copier, args=(s,), daemon=True,
                                        name=f"repl-slink{s.nr}")
            s.thread.start()

    def stop(self) -> None:
        """Stop copying (entries stay in the ring); positions are persisted."""
        with self.cond:
            if not self.running:
                return
            self.running = False
            self._bump("stopped")
        self._persist_all()

    def close(self) -> None:
        """Stop everything, persist progress, close devices and the log."""
        with self.cond:
            if self.closed:
                return
            self.running = False
            self.closed = True
            threads = []
            for s in self.slinks.values():
                s.closing = True
                s.hurry.set()
                if s.thread is not None:
                    threads.append(s.thread)
            for d in self.devices.values():
                d.sm.fire(DeviceEvent.REMOVE)
            self._bump("closed")
        for t in threads:
            t.join()
        try:
            if self.ring.failed is None:
                self._persist_all()
        except (OSError, ReplogIOError):
            pass
        for d in self.devices.values():
            for leg in d.legs.values():
                self._close_leg(leg)
        for st in self._graveyard:
            try:
                st.close()
            except OSError:
                pass
        self.ring.close()
        with _active_lock:
            _active_logs.discard(self._key)

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- write path -----------------------------------------------------------------

    def _targets(self, dev: ReplicatedDevice) -> frozenset[int]:
        return frozenset(dev.legs.keys() & self.slinks.keys())

    def _holds_ack(self, s: Slink) -> bool:
        return s.up and (s.cfg.sync or s.forced)

    def _oldest_ts(self, s: Slink) -> float | None:
        seq = s.applied + 1
        while seq < self.ring.next_seq:
            e = self.ring.entry(seq)
            if e is None:
                return None
            if s.nr in e.slinks:
                return e.ts
            seq += 1
        return None

    def _check_fallbehind(self, s: Slink, now: float) -> None:
        fb = s.cfg.fallbehind
        if s.cfg.sync or not fb.enabled:
            over = False
        elif fb.kind == "ios":
            over = s.out_ios > fb.value
        elif fb.kind == "size":
            over = s.out_bytes > fb.value * SECTOR
        else:
            ts = self._oldest_ts(s)
            over = ts is not None and (now - ts) * 1000 > fb.value
        if over != s.forced:
            s.ack.fire(AckEvent.OVER_THRESHOLD if over else AckEvent.UNDER_THRESHOLD)
            self._bump(f"{'enforcing' if over else 'releasing'} fallbehind sync on "
                       f"slink={s.nr}")

    def _write(self, dev: ReplicatedDevice, offset: int, data: bytes | None,
               length: int, fua: bool = False, count: bool = False) -> None:
        last: Entry | None = None
        sync_sets: list[tuple[Entry, frozenset[int]]] = []
        pos = 0
        ring = self.ring
        # an entry never needs more than a quarter of the ring (else it could wait
        # for space forever)
        limit = length if length <= _NEVER_SPLIT else \
            min(MAX_ENTRY, max(SECTOR, ((ring.ring_end - ring.ring_start) // 4
                                        - ondisk.ENTRY_HEADER_SIZE) // SECTOR * SECTOR))
        durable = self.durable_acks or fua
        held = False  # does a sync (or forced sync) site link hold the acknowledgement?
        while pos < length:
            n = min(limit, length - pos)
            chunk = None if data is None else (data if n == length else data[pos:pos + n])
            e, syncs = self._append(dev, offset + pos, chunk, n, count and pos == 0)
            ring.write_entry(e, chunk, durable=durable or bool(syncs))
            sync_sets.append((e, syncs))
            held = held or bool(syncs)
            last = e
            pos += n
        assert last is not None
        # (the copiers were woken when the entries were written and committed)
        if held:
            ring.commit(last.seq)
            with self.cond:
                for e, syncs in sync_sets:
                    self._wait_sync(dev, e, syncs)
        elif durable and ring.durable_seq < last.seq:
            # (a lone writer's entry is durable already: its write was)
            ring.commit(last.seq)

    def _append(self, dev: ReplicatedDevice, offset: int, data: bytes | None,
                length: int, count: bool = False) -> tuple[Entry, frozenset[int]]:
        with self.lock:  # (the condition's lock; cheaper to enter than the condition)
            waited: float | None = None
            while True:
                self._check_io(dev)
                targets = self._targets(dev)
                now = time.monotonic()
                e = self.ring.reserve(dev.dev_nr, offset, length, targets, data,
                                      zero=data is None, now=now)
                if e is not None:
                    self._index_add(e)
                    break
                if waited is None:
                    waited = now
                    self.stats["c"] += 1
                self._ring_full(now - waited)
                self.cond.wait(0.05)
            if waited is None:
                self.stats["nc"] += 1
            else:
                now = time.monotonic()
            syncs = []
            for nr in targets:
                s = self.slinks[nr]
                s.out_ios += 1
                s.out_bytes += length
                cfg = s.cfg
                if not cfg.sync and not cfg.fallbehind.value and \
                        s.ack.state is AckState.ASYNC:
                    continue  # plain async: nothing to check, never holds the ack
                self._check_fallbehind(s, now)
                if self._holds_ack(s):
                    syncs.append(nr)
                    s.want_durable = max(s.want_durable, e.seq)
                    s.hurry.set()
            self.stats["ws"] += 1
            if count:
                self.stats["w"] += 1
            return e, frozenset(syncs) if syncs else _NO_SYNCS

    def _check_io(self, dev: ReplicatedDevice) -> None:
        while not dev.running and not dev.closed and not self.closed:
            self.cond.wait()
        if dev.closed or self.closed:
            raise ReplicatorClosed(f"device {dev.dev_nr} is closed")
        local = dev.legs[0]
        if local.error:
            raise LocalIOError(f"device {dev.dev_nr}: local device {local.cfg.dev_path} "
                               f"failed ({local.error}); write not acknowledged")

    def _wait_sync(self, dev: ReplicatedDevice, e: Entry, syncs: frozenset[int]) -> None:
        # caller holds the lock
        def pending() -> list[Slink]:
            out = []
            for nr in syncs:
                s = self.slinks.get(nr)
                if s is not None and s.durable < e.seq and s.up and not s.closing:
                    out.append(s)
            return out

        while True:
            if 0 in syncs:
                s0 = self.slinks[0]
                if s0.durable < e.seq and (not s0.up or dev.legs[0].error):
                    raise LocalIOError(f"device {dev.dev_nr}: local copy failed "
                                       f"({s0.error}); write not acknowledged")
            if not pending():
                return
            if self.closed:
                raise ReplicatorClosed(f"device {dev.dev_nr}: closed before the synchronous "
                                       "site links acknowledged the write (it is in the log)")
            self.cond.wait(0.5)

    def _ring_full(self, waited: float) -> None:
        # caller holds the lock
        self._space_wanted = True
        for s in self.slinks.values():
            s.hurry.set()
        self.cond.notify_all()
        head = self.ring.entries[0] if self.ring.entries else None
        if head is None:
            return
        # The head is held by the site links' *durable* positions (see persist): a
        # link holds it while its durable position is below the head, whatever it
        # has applied.  Local devices behind: writers wait for them (nothing to
        # drop).  A link that is up and has applied the head but not flushed it
        # yet releases it by itself (the copier persists when space is wanted).
        s0 = self.slinks.get(0)
        if s0 is not None and s0.applied < head.seq:
            return
        for s in self.slinks.values():
            if s.nr == 0 or s.durable >= head.seq:
                continue
            if s.cfg.sync or s.cfg.stall or s.drop_requested:
                continue
            if not s.up or (s.applied < head.seq and waited >= self.full_grace):
                s.drop_requested = True
                self.cond.notify_all()

    # -- reads ------------------------------------------------------------------------

    def _read(self, dev: ReplicatedDevice, offset: int, length: int) -> bytes:
        for _ in range(10):
            with self.cond:
                self._check_io_read(dev)
                snap: list[tuple[Entry, bytes | None]] = []
                end = offset + length
                for e in self._pending_local(dev.dev_nr, offset, end):
                    if e.data is None and not e.zero and e.seq in self.ring._unwritten:
                        continue  # concurrent write not on disk yet: undefined data
                    snap.append((e, e.data))
                self.stats["r"] += 1
            try:
                buf = bytearray(dev.legs[0].store.pread(offset, length))
            except OSError as err:
                raise LocalIOError(f"device {dev.dev_nr}: read failed: {err}") from err
            try:
                for e, d in snap:
                    if d is None:
                        d = bytes(e.length) if e.zero else self.ring.entry_data(e)
                    lo, hi = max(offset, e.offset), min(end, e.end)
                    buf[lo - offset:hi - offset] = d[lo - e.offset:hi - e.offset]
            except Exception:
                continue
            return bytes(buf)
        raise LocalIOError(f"device {dev.dev_nr}: read kept racing with log release")

    def _check_io_read(self, dev: ReplicatedDevice) -> None:
        if dev.closed or self.closed:
            raise ReplicatorClosed(f"device {dev.dev_nr} is closed")

    # -- copiers ------------------------------------------------------------------------

    def _copier(self, s: Slink) -> None:
        try:
            self._copier_loop(s)
        finally:
            pool, s.pool = s.pool, None
            if pool is not None:
                pool.shutdown(wait=True)

    def _set_nice(self) -> None:
        if self.copier_nice:
            # Background copies yield the CPU to the application's writers (Linux:
            # per-thread nice value); synchronous acknowledgements are unaffected
            # when the CPU is idle.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                   + self.copier_nice))

    def _copier_loop(self, s: Slink) -> None:
        self._set_nice()
        while True:
            with self.cond:
                job = self._next_job(s)
                if job is None:
                    continue
                kind, arg = job
            if kind == "exit":
                return
            try:
                if kind == "batch":
                    self._do_batch(s, arg)
                    if len(arg) < self.coalesce_entries and self.coalesce_delay > 0:
                        with self.cond:
                            pause = self._may_coalesce(s)
                            if pause:
                                s.hurry.clear()
                        if pause:
                            # not on the cond: each logged write does not wake it
                            s.hurry.wait(self.coalesce_delay)
                elif kind == "persist":
                    self._do_persist(s)
                elif kind == "flush":
                    self._do_flush(s)
                elif kind == "commit":
                    self.ring.commit(arg)
                elif kind == "drop":
                    self._do_drop(s)
                elif kind == "retry":
                    self._do_retry(s)
                elif kind == "resync":
                    self._do_resync(s, *arg)
            except ReplogIOError as err:
                with self.cond:
                    self._bump(f"slink {s.nr}: replication log failed: {err}")
                    s.closing = True
                return

    def _may_coalesce(self, s: Slink) -> bool:
        # caller holds the lock: the copier caught up with the log (a batch cut short
        # by an overlap or its size limit goes on at once) and nobody is waiting for
        # this site link's copies
        return (s.applied >= self.ring.durable_seq
                and self.running and s.up and not s.closing and not s.drop_requested
                and not self._holds_ack(s) and s.want_durable <= s.durable
                and not self._space_wanted)

    def _next_job(self, s: Slink) -> tuple[str, Any] | None:
        # caller holds the lock; returns None after waiting
        now = time.monotonic()
        if s.closing:
            return ("exit", None)
        if s.drop_requested:
            return ("drop", None)
        if not s.up:
            if now >= s.next_retry:
                return ("retry", None)
            self.cond.wait(max(0.0, s.next_retry - now))
            return None
        if not self.running:
            if s.applied > s.persisted and now - s.last_persist >= self.persist_interval:
                return ("persist", None)
            self.cond.wait(self.persist_interval)
            return None
        dirty = s.applied > s.persisted or s.touched
        if dirty and (self._space_wanted or s.window_n >= self.window_entries
                      or now - s.last_persist >= self.persist_interval):
            return ("persist", None)
        if s.want_durable > s.durable and s.applied > s.durable:
            return ("flush", None)
        ring = self.ring
        if ring.durable_seq < ring.next_seq - 1 and not ring._syncing and \
                ring._contiguous() > ring.durable_seq:
            return ("commit", ring._contiguous())
        batch, blocked = self._collect(s)
        if batch:
            return ("batch", batch)
        if blocked == "overlap":
            return ("persist", None)
        if s.nr and blocked is None and s.applied >= self.ring.durable_seq:
            work = self._resync_work(s)
            if work is not None:
                wait = s.resync_next - self.clock() if s.cfg.resync_rate else 0.0
                if wait <= 0:
                    s.resync_throttled = False
                    return ("resync", work)
                # rate limited: new writes still go first (they wake us up)
                if not s.resync_throttled:
                    s.resync_throttled = True
                    self._bump()
                self.cond.wait(min(wait, 0.1))
                return None
        timeout = self.persist_interval if dirty else 1.0
        self.cond.wait(timeout)
        return None

    def _collect(self, s: Slink) -> tuple[list[Copy], str | None]:
        """Entries to apply next (with their leg, None = skip, and the last sequence
        number of their epoch); and why it stopped."""
        out: list[Copy] = []
        nbytes = 0
        seq = s.applied + 1
        new: dict[int, list[tuple[int, int]]] = {}  # this batch's ranges by device
        ring = self.ring
        while seq <= ring.durable_seq and len(out) < self.batch_entries:
            e = ring.entry(seq)
            if e is None:
                break
            leg = None
            if s.nr in e.slinks:
                dev = self.devices.get(e.dev)
                leg = dev.legs.get(s.nr) if dev is not None else None
                if dev is None:
                    # wait for the device to be added (after a reopen the copiers may
                    # start before the devices are back: skipping would lose the
                    # replayed entries at that site); a removed device has no
                    # entries left (remove_device waits for them)
                    return out, "nodev"
                if leg is None:
                    if s.nr == 0:
                        return out, "nodev"  # wait for the local device to be added
                elif not dev.running:
                    return out, "stopped"
                else:
                    start, end = e.offset, e.end
                    if s.window_overlaps(e.dev, start, end) or \
                            _overlaps(new.get(e.dev), start, end):
                        return out, "overlap"
                    bisect.insort(new.setdefault(e.dev, []), (start, end))
                    nbytes += e.length
            out.append((e, leg, ring.epoch_end(seq)))
            seq += 1
            if nbytes >= self.batch_bytes:
                break
        return out, None

    def _do_batch(self, s: Slink, batch: list[Copy]) -> None:
        """Apply a batch epoch by epoch: the copies of one epoch are in flight
        together (up to ``copy_inflight``), the next epoch starts when all of them
        completed.  Entries of a batch never overlap each other nor anything applied
        since the last persisted position (_collect), so their order within an
        epoch does not matter, and a crash replay stays idempotent."""
        done = s.applied
        failed: tuple[Leg, OSError] | None = None
        written: list[Entry] = []
        i = 0
        while i < len(batch) and failed is None:
            j = i
            while j < len(batch) and batch[j][2] == batch[i][2]:
                j += 1
            group = batch[i:j]
            ok, failure = self._apply_epoch(s, group)
            for e, leg, _ep in group:
                if leg is not None:
                    if e.seq not in ok:  # failed, or not sent after a failure
                        assert failure is not None
                        failed = (failure[1], failure[2])
                        break
                    written.append(e)
                done = e.seq
            i = j
        now = time.monotonic()
        with self.cond:
            for e in written:
                s.window_add(e.dev, e.offset, e.end)
                s.touched.add(e.dev)
                s.copies += 1
                s.copied_bytes += e.length
            for e, _leg, _ep in batch:
                if e.seq > done:
                    break
                if s.nr in e.slinks:
                    s.out_ios -= 1
                    s.out_bytes -= e.length
            s.applied = max(s.applied, done)
            s.batches += 1
            if s.nr == 0:
                for e, _leg, _ep in batch:
                    if e.seq <= done:
                        self._index_drop(e)
            self._check_fallbehind(s, now)
            self._drop_cached(batch)
            if failed is not None:
                self._leg_failed(s, failed[0], "W", failed[1])
            self.cond.notify_all()

    def _apply_epoch(self, s: Slink, group: list[Copy]) -> tuple[set[int], Failure | None]:
        """Write the copies of one epoch; returns the sequence numbers written and
        the first failure (None: all written).

        Copies to stores that take several writes at once (``concurrent_writes``:
        the NBD client of a remote site) go to the site link's I/O threads, up to
        ``copy_inflight`` at once, and all of them are waited for (the epoch
        barrier); no more are sent after a failure.  The others (files, local
        block devices through the page cache) are written inline, one after the
        other, stopping at a failure: there a thread per write costs more CPU and
        GIL hand-offs than it overlaps (measured: it slowed 4 KiB and 1 MiB copies
        to local files)."""
        done: set[int] = set()
        failure: Failure | None = None
        conc: list[tuple[Entry, Leg]] = []
        inline: list[tuple[Entry, Leg]] = []
        for e, leg, _ep in group:
            if leg is None:
                continue
            if self.copy_inflight > 1 and getattr(leg.store, "concurrent_writes", False):
                conc.append((e, leg))
            else:
                inline.append((e, leg))
        if len(conc) == 1:
            inline, conc = conc + inline, []
        if conc:
            failure = self._apply_concurrently(s, conc, done)
        for e, leg in inline if failure is None else ():
            try:
                self._copy_one(e, leg)
            except OSError as err:
                failure = (e, leg, err)
                break
            done.add(e.seq)
        return done, failure

    def _apply_concurrently(self, s: Slink, todo: list[tuple[Entry, Leg]],
                            done: set[int]) -> Failure | None:
        pool = s.pool
        if pool is None:
            pool = s.pool = ThreadPoolExecutor(max_workers=self.copy_inflight,
                                               thread_name_prefix=f"repl-slink{s.nr}-io",
                                               initializer=self._set_nice)
        # at most copy_inflight submitted at once, and none after a failure: a dead
        # site costs one round of time-outs, not one per copy of the epoch
        inflight: deque[tuple[Entry, Leg, Future[None]]] = deque()
        failure: Failure | None = None
        most = 0

        def reap() -> None:
            nonlocal failure
            e0, leg0, f0 = inflight.popleft()
            try:
                f0.result()
            except OSError as err:
                if failure is None or e0.seq < failure[0].seq:
                    failure = (e0, leg0, err)
                return
            done.add(e0.seq)

        for e, leg in todo:
            if len(inflight) >= self.copy_inflight:
                reap()
                if failure is not None:
                    break
            inflight.append((e, leg, pool.submit(self._copy_one, e, leg)))
            most = max(most, len(inflight))
        while inflight:
            reap()
        with self.cond:
            s.inflight_max = max(s.inflight_max, most)
        return failure

    def _copy_one(self, e: Entry, leg: Leg) -> None:
        if e.zero:
            _write_zeros(leg.store, e.offset, e.length)
        else:
            leg.store.pwrite(e.offset, self.ring.entry_data(e))

    def _drop_cached(self, batch: list[Copy]) -> None:
        low = min(sl.applied for sl in self.slinks.values())
        for e, _leg, _ep in batch:
            if e.seq <= low:
                self.ring.drop_cache(e)

    def _leg_failed(self, s: Slink, leg: Leg, kind: str, err: BaseException) -> None:
        # caller holds the lock
        if kind not in leg.error:
            leg.error = "RW" if leg.error else kind
        s.link.fire(LinkEvent.IO_ERROR)
        s.failures += 1
        s.error = f"{leg.cfg.dev_path}: {err}"
        s.next_retry = time.monotonic() + self.retry_interval
        self._bump(f"slink {s.nr} down: {leg.cfg.dev_path}: {err}")

    def _flush_touched(self, s: Slink) -> bool:
        with self.cond:
            devs = [self.devices[d] for d in s.touched if d in self.devices]
            target = s.applied
            touched = set(s.touched)
        for d in devs:
            leg = d.legs.get(s.nr)
            if leg is None:
                continue
            try:
                leg.store.flush()
            except OSError as err:
                with self.cond:
                    self._leg_failed(s, leg, "W", err)
                return False
        with self.cond:
            s.touched -= touched
            s.durable = max(s.durable, target)
            self.cond.notify_all()
        return True

    def _do_flush(self, s: Slink) -> None:
        self._flush_touched(s)

    def _do_persist(self, s: Slink) -> None:
        if not self._flush_touched(s):
            return
        with self.cond:
            target = s.durable
        self._persist_all(flush=False)
        with self.cond:
            if s.persisted >= target and s.applied == target:
                s.window.clear()
                s.window_n = 0
            s.last_persist = time.monotonic()

    def _persist_all(self, flush: bool = True) -> None:
        if flush:
            for s in list(self.slinks.values()):
                if s.up:
                    self._flush_touched(s)
        def snapshot() -> dict[int, int]:
            # called by the ring under the lock, in header-write order
            self._space_wanted = False
            return {nr: s.durable for nr, s in self.slinks.items()}

        _, positions = self.ring.persist(snapshot)
        with self.cond:
            for nr, pos in positions.items():
                sl = self.slinks.get(nr)
                if sl is not None:
                    sl.persisted = max(sl.persisted, pos)
            self.cond.notify_all()

    def _do_drop(self, s: Slink) -> None:
        with self.cond:
            upto = self.ring.durable_seq
            marks: dict[int, tuple[Leg, set[int]]] = {}
            dropped = 0
            dbytes = 0
            # from the durable position: entries applied but not flushed may be lost
            # at the site (it is down, or its flush fails), so they are marked too
            for seq in range(min(s.applied, s.durable) + 1, upto + 1):
                e = self.ring.entry(seq)
                if e is None or s.nr not in e.slinks:
                    continue
                if seq > s.applied:  # still counted as outstanding
                    dropped += 1
                    dbytes += e.length
                dev = self.devices.get(e.dev)
                leg = dev.legs.get(s.nr) if dev is not None else None
                if leg is None or leg.dlog is None:
                    continue
                rs = leg.dlog.region_size * SECTOR
                regions = marks.setdefault(e.dev, (leg, set()))[1]
                regions.update(range(e.offset // rs, (e.end - 1) // rs + 1))
        try:
            for leg, regions in marks.values():
                with leg.lock:
                    for r in sorted(regions):
                        leg.dlog.mark_region(r)
                        leg.dlog.set_region_sync(r, False)
                    leg.dlog.flush()
        except Exception as err:
            with self.cond:
                s.drop_requested = False
                self._bump(f"slink {s.nr}: dirty log flush failed, entries kept: {err}")
            return
        with self.cond:
            s.applied = max(s.applied, upto)
            s.durable = max(s.durable, upto)
            s.out_ios -= dropped
            s.out_bytes -= dbytes
            s.drop_requested = False
            s.drops += 1
            s.ack.fire(AckEvent.DROPPED)
            self._bump(f"slink {s.nr}: {dropped} entries dropped to dirty logs "
                       f"({sum(len(r) for _, r in marks.values())} regions out of sync)")
            up = s.up
        # Persist the new position (releasing the ring head) even if this site's
        # devices can't be flushed (it is down): what it may lack is in its dirty
        # logs.  Nobody else may persist soon (the others can be idle, their
        # positions persisted, the writers waiting for space).
        flushed = self._flush_touched(s) if up else False
        self._persist_all(flush=False)
        with self.cond:
            if flushed and s.persisted >= s.durable and s.applied == s.durable:
                s.window.clear()
                s.window_n = 0
            s.last_persist = time.monotonic()

    def _do_retry(self, s: Slink) -> None:
        with self.cond:
            legs = [d.legs[s.nr] for d in self.devices.values()
                    if s.nr in d.legs and d.legs[s.nr].error]
        ok = True
        for leg in legs:
            try:
                leg.store.pread(0, SECTOR)
            except OSError:
                ok = False
                continue
            with self.cond:
                leg.error = ""
        with self.cond:
            if ok:
                s.link.fire(LinkEvent.RETRY_OK)
                s.error = ""
                self._bump(f"slink {s.nr} up again")
            else:
                s.next_retry = time.monotonic() + self.retry_interval

    # -- resync --------------------------------------------------------------------------

    def _resync_work(self, s: Slink) -> tuple[ReplicatedDevice, Leg, int] | None:
        # caller holds the lock
        for dev in self.devices.values():
            leg = dev.legs.get(s.nr)
            if leg is None or leg.dlog is None or not dev.running:
                continue
            with leg.lock:
                log = leg.dlog
                if log.get_sync_count() >= log.region_count:
                    continue
                # from the cursor on, then wrapping round (the bitmap is scanned
                # whole by the log, not region by region here)
                found = log.first_out_of_sync(leg.cursor % log.region_count)
                if found is None:
                    found = log.first_out_of_sync(0)
                if found is None:
                    continue
                r = found
            rs = log.region_size * SECTOR
            lo, hi = r * rs, min((r + 1) * rs, dev.size_bytes)
            if self._local_pending_overlap(dev.dev_nr, lo, hi):
                continue  # the local copy is not there yet: later
            return (dev, leg, r)
        if s.resyncing:
            s.resync.fire(ResyncEvent.ALL_IN_SYNC)
            self._bump(f"slink {s.nr}: resynchronisation complete")
        return None

    def _local_pending_overlap(self, dev_nr: int, lo: int, hi: int) -> bool:
        return bool(self._pending_local(dev_nr, lo, hi))

    # -- index of entries not yet on the local devices (caller holds the lock) ------

    def _index_add(self, e: Entry) -> None:
        buckets = self._index.setdefault(e.dev, {})
        for b in range(e.offset // INDEX_BUCKET, (max(e.end, e.offset + 1) - 1)
                       // INDEX_BUCKET + 1):
            buckets.setdefault(b, {})[e.seq] = e

    def _index_drop(self, e: Entry) -> None:
        buckets = self._index.get(e.dev)
        if buckets is None:
            return
        for b in range(e.offset // INDEX_BUCKET, (max(e.end, e.offset + 1) - 1)
                       // INDEX_BUCKET + 1):
            bucket = buckets.get(b)
            if bucket is not None:
                bucket.pop(e.seq, None)
                if not bucket:
                    del buckets[b]

    def _pending_local(self, dev_nr: int, lo: int, hi: int) -> list[Entry]:
        """Entries overlapping [lo, hi) of a device not yet applied locally, in log
        order."""
        buckets = self._index.get(dev_nr)
        if not buckets or hi <= lo:
            return []
        applied = self.slinks[0].applied
        found: dict[int, Entry] = {}
        for b in range(lo // INDEX_BUCKET, (hi - 1) // INDEX_BUCKET + 1):
            bucket = buckets.get(b)
            if not bucket:
                continue
            for seq, e in bucket.items():
                if seq > applied and e.offset < hi and lo < e.end:
                    found[seq] = e
        return [found[k] for k in sorted(found)]

    def _do_resync(self, s: Slink, dev: ReplicatedDevice, leg: Leg, region: int) -> None:
        with self.cond:
            if not s.resyncing:
                s.resync.fire(ResyncEvent.REGION_STARTED)
                self._bump(f"slink {s.nr}: resynchronisation started")
        rs = leg.dlog.region_size * SECTOR
        lo, hi = region * rs, min((region + 1) * rs, dev.size_bytes)
        local = dev.legs[0]
        pos = lo
        while pos < hi:
            n = min(self.resync_chunk, hi - pos)
            try:
                data = local.store.pread(pos, n)
            except OSError as err:
                with self.cond:
                    self._leg_failed(self.slinks[0], local, "R", err)
                return
            try:
                leg.store.pwrite(pos, data)
            except OSError as err:
                with self.cond:
                    self._leg_failed(s, leg, "W", err)
                return
            pos += n
        try:
            leg.store.flush()
        except OSError as err:
            with self.cond:
                self._leg_failed(s, leg, "W", err)
            return
        with leg.lock:
            leg.dlog.set_region_sync(region, True)
            leg.dlog.clear_region(region)
            leg.dlog.flush()
            leg.cursor = region + 1
            leg.resynced += 1
        with self.cond:
            s.resync_bytes += hi - lo
            rate = s.cfg.resync_rate
            if rate:
                # one region at a time: the average rate is the limit, a burst is
                # at most one region (resync_next never lies in the past)
                s.resync_next = max(self.clock(), s.resync_next) + (hi - lo) / rate
            self.cond.notify_all()

    # -- messages --------------------------------------------------------------------------

    def message(self, argv: Sequence[str]) -> str:
        """A replicator target message; raises MessageError changing nothing."""
        self._check_open()
        argv = list(argv)
        if not argv:
            raise MessageError("too few message arguments")
        cmd = argv[0]
        if cmd in ("start", "resume", "stop", "suspend", "postsuspend"):
            if len(argv) > 2 or (len(argv) == 2 and argv[1] != "all"):
                raise MessageError(f"invalid {cmd} arguments {argv[1:]!r}: expected "
                                   "nothing or 'all'")
            every = len(argv) == 2
            if cmd in ("start", "resume"):
                if every:
                    for d in list(self.devices.values()):
                        d.resume()
                self.start()
            else:
                self.stop()
                if every:
                    for d in list(self.devices.values()):
                        d.suspend()
            return ""
        if cmd == "slink":
            return self._slink_message(argv[1:])
        if cmd == "statistics":
            if len(argv) != 2 or argv[1] not in ("on", "off", "reset"):
                raise MessageError("usage: statistics on|off|reset")
            with self.cond:
                if argv[1] == "on":
                    self.statistics = True
                elif argv[1] == "off":
                    self.statistics = False
                else:
                    self.stats = dict.fromkeys(self.stats, 0)
            return ""
        if cmd == "replog":
            return self._replog_message(argv[1:])
        raise MessageError(f"invalid message {cmd!r}: expected start, resume, stop, suspend, "
                           "postsuspend, slink, statistics or replog")

    def _slink_message(self, argv: list[str]) -> str:
        if len(argv) < 2:
            raise MessageError("too few slink message arguments: slink add|del|message ...")
        sub = argv[0]
        if sub == "add":
            words = argv[1:]
            if words[0] != "blockdev":
                words = ["blockdev", str(len(words)), *words]
            try:
                new, _used = parse_slinks(words, 0, existing=list(self.slinks))
            except TableError as e:
                raise MessageError(f"slink add: {e}") from e
            if len(new) != 1:
                raise MessageError("slink add takes exactly one site link")
            if new[0].slink_nr == 0:
                raise MessageError("can't add site link 0 via message")
            with self.cond:
                if new[0].slink_nr in self.slinks:
                    raise MessageError(f"site link {new[0].slink_nr} already exists")
                s = self._add_slink(new[0])
                s.applied = s.durable = s.persisted = self.ring.next_seq - 1
                if self.running:
                    self._ensure_thread(s)
                self._bump(f"slink {new[0].slink_nr} added")
            self._persist_all()
            return ""
        nr = _msg_int(argv[1], "site link number")
        if sub == "del":
            if len(argv) != 2:
                raise MessageError("usage: slink del <slink_nr>")
            if nr == 0:
                raise MessageError("can't delete site link 0 via message")
            with self.cond:
                gone = self.slinks.get(nr)
                if gone is None:
                    raise MessageError(f"site link {nr} doesn't exist")
                if any(nr in d.legs for d in self.devices.values()):
                    raise MessageError(f"site link {nr} still has devices")
                gone.closing = True
                gone.hurry.set()
                del self.slinks[nr]
                self._bump(f"slink {nr} deleted")
                t = gone.thread
            if t is not None:
                t.join()
            self._persist_all()
            return ""
        if sub == "message":
            rest = argv[2:]
            with self.cond:
                link = self.slinks.get(nr)
                if link is None:
                    raise MessageError(f"site link {nr} doesn't exist")
                # all settings are checked against the resulting configuration
                # before any applies: a refused message changes nothing
                cfg = link.cfg
                new_cfg = _slink_settings(cfg, rest)
                link.cfg = new_cfg
                if new_cfg.resync_rate != cfg.resync_rate:
                    link.resync_next = self.clock()  # the new rate applies from now
                self._check_fallbehind(link, time.monotonic())
                self._bump(f"slink {nr}: {' '.join(rest)}")
            return ""
        raise MessageError(f"invalid slink command {sub!r}: expected add, del or message")

    def _replog_message(self, argv: list[str]) -> str:
        if len(argv) == 2 and argv[0] == "statistics":
            return self.message(["statistics", argv[1]])
        if len(argv) == 2 and argv[0] == "resize":
            size = _msg_int(argv[1], "replog size (sectors)", lo=LOG_SIZE_MIN,
                            hi=((1 << 63) - 1) // SECTOR - self.cfg.replog.dev_start)
            try:
                self.ring.resize(size)
            except TableError as e:
                raise MessageError(str(e)) from e
            except OSError as e:
                if e.errno not in _CANNOT_GROW:
                    raise
                # the log file could not grow to the new size: nothing was written
                raise MessageError(f"replog resize {size}: cannot grow "
                                   f"{self.cfg.replog.dev_path}: {e.strerror or e}") from e
            with self.cond:
                self.cfg = replace(self.cfg, replog=replace(
                    self.cfg.replog, size=size,
                    mode=self.cfg.replog.mode or "open"))
                self._bump(f"replog resized to {size} sectors")
            return ""
        if argv == ["clear_lost"]:
            if self.lost_report() is None:
                raise MessageError("replog clear_lost: no lost acknowledged writes are "
                                   "reported")
            cleared = self.ring.clear_lost()
            log.warning("replication log %s: lost-writes report cleared by an operator "
                        "(%d entries, %d..%d)", self.cfg.replog.dev_path,
                        cleared["entries"], cleared["first_seq"], cleared["last_seq"])
            with self.cond:
                self._bump(f"replog: lost-writes report cleared ({cleared['entries']} "
                           "entries)")
            return ""
        raise MessageError("usage: replog resize <sectors> | replog statistics on|off|reset"
                           " | replog clear_lost")

    # -- status ----------------------------------------------------------------------------

    def table(self) -> str:
        """TABLE status: the live ``replicator`` parameters (after every message),
        which parse back to the same configuration."""
        return self.table_config().params()

    def check_device(self, line: str) -> None:
        """Refuse (TableError) a ``replicator-dev`` line this replicator could not
        take, without opening anything (a loaded table is checked before resume)."""
        cfg = parse_device(line)
        for leg in cfg.legs:
            if leg.slink_nr not in self.slinks:
                raise TableError(f"device {cfg.dev_nr}: site link {leg.slink_nr} is not "
                                 "defined by the replicator")
        if cfg.leg(0) is None:
            raise TableError(f"device {cfg.dev_nr}: the local device (site link 0) is "
                             "missing")

    def table_config(self) -> ReplicatorConfig:
        with self.lock:
            return replace(self.cfg, slinks=tuple(
                self.slinks[n].cfg for n in sorted(self.slinks)))

    def status(self, kind: str = "info") -> str:
        """``info``: ``[v= r= w= rs= ws= nc= c= ]<S|A>,<ios>,<sectors> ... <entries>/
        <sectors used>/<log sectors> <slink>:<up|down>[:resync][:rate=<N>k|m|g] ...``;
        ``table``: the parameters, which parse back to the same configuration."""
        if kind == "table":
            return self.table()
        if kind != "info":
            raise UserError(f"invalid status type {kind!r}: expected info or table")
        with self.lock:
            words = []
            if self.statistics:
                st = self.stats
                words.append(f"v={VERSION} r={st['r']} w={st['w']} rs={st['rs']} "
                             f"ws={st['ws']} nc={st['nc']} c={st['c']}")
            for nr in sorted(self.slinks):
                s = self.slinks[nr]
                words.append(f"{'S' if s.forced else 'A'},{s.out_ios},"
                             f"{s.out_bytes // SECTOR}")
            words.append(f"{len(self.ring.entries)}/{self.ring.used_bytes() // SECTOR}/"
                         f"{self.ring.log_size}")
            for nr in sorted(self.slinks):
                s = self.slinks[nr]
                words.append(f"{nr}:{'up' if s.up else 'down'}"
                             + (":resync" if s.resyncing else "")
                             + (f":rate={format_rate(s.cfg.resync_rate)}"
                                if s.cfg.resync_rate else ""))
            lost = self.ring.lost
            if lost["entries"]:
                # a word of its own, last: the other words keep their places
                words.append(f"ERROR:acknowledged_writes_lost={lost['entries']}:"
                             f"{lost['first_seq']}-{lost['last_seq']}")
            return " ".join(words)

    def status_dict(self) -> dict[str, Any]:
        """Machine-readable state (see the keys)."""
        now = time.monotonic()
        with self.lock:
            ring = self.ring
            out: dict[str, Any] = {
                "version": VERSION,
                "running": self.running,
                "event_nr": self.event_nr,
                "ring": {
                    "log_size_sectors": ring.log_size,
                    "ring_bytes": ring.ring_end - ring.ring_start,
                    "used_bytes": ring.used_bytes(),
                    "entries": len(ring.entries),
                    "next_seq": ring.next_seq,
                    "durable_seq": ring.durable_seq,
                    "head_seq": ring.head_seq,
                    "replayed_at_open": ring.replayed,
                    "created": ring.created,
                    "failed": None if ring.failed is None else str(ring.failed),
                    **ring.stats,
                },
                "slinks": {},
                "devices": {},
                "stats": dict(self.stats),
                "notes": list(self.messages[-10:]),
                "errors": [],
            }
            lost = ring.lost
            out["ring"]["acknowledged_writes_lost"] = (
                {"entries": lost["entries"], "first_seq": lost["first_seq"],
                 "last_seq": lost["last_seq"], "whole_devices": bool(lost["whole"]),
                 "clear_with": LOST_CLEAR_MESSAGE} if lost["entries"] else None)
            report = self.lost_report()
            if report is not None:
                out["errors"].append(report)
            for nr, s in sorted(self.slinks.items()):
                ts = self._oldest_ts(s)
                out_of_sync = 0
                for d in self.devices.values():
                    leg = d.legs.get(nr)
                    if leg is not None:
                        out_of_sync += leg.out_of_sync()
                out["slinks"][nr] = {
                    "policy": s.cfg.policy,
                    "fallbehind": {"type": s.cfg.fallbehind.kind,
                                   "value": s.cfg.fallbehind.value},
                    "state": "up" if s.up else "down",
                    "error": s.error,
                    "forced_sync": s.forced,
                    "lag_ios": s.out_ios,
                    "lag_bytes": s.out_bytes,
                    "lag_seconds": 0.0 if ts is None else now - ts,
                    "applied_seq": s.applied,
                    "durable_seq": s.durable,
                    "persisted_seq": s.persisted,
                    "drops": s.drops,
                    "failures": s.failures,
                    "copies": s.copies,
                    "copied_bytes": s.copied_bytes,
                    "batches": s.batches,
                    "copies_in_flight_max": s.inflight_max,
                    "resyncing": s.resyncing,
                    "resync_rate": s.cfg.resync_rate,
                    "resync_throttled": s.resync_throttled,
                    "resync_bytes": s.resync_bytes,
                    "regions_out_of_sync": out_of_sync,
                    "consistent": out_of_sync == 0,
                }
            for nr, d in sorted(self.devices.items()):
                legs = {}
                for snr, leg in sorted(d.legs.items()):
                    info: dict[str, Any] = {"path": leg.cfg.dev_path, "error": leg.error}
                    if leg.dlog is not None:
                        with leg.lock:
                            info["regions"] = leg.dlog.region_count
                            info["in_sync"] = leg.dlog.get_sync_count()
                        info["resynced"] = leg.resynced
                    legs[snr] = info
                out["devices"][nr] = {"size_bytes": d.size_bytes, "running": d.running,
                                      "legs": legs}
            return out

    def drained(self) -> bool:
        """True if every site link has applied every logged entry and is in sync.

        Every entry counts, not only the durable ones: without durable_acks a write
        returns before its entries are committed (a copier commits them later), and
        the copiers apply only committed entries -- comparing with ``durable_seq``
        would call the log drained while the last writes are at no site yet."""
        with self.lock:
            last = self.ring.next_seq - 1
            if self.ring.durable_seq < last or any(
                    s.applied < last or not s.up for s in self.slinks.values()):
                return False
        for d in list(self.devices.values()):
            for leg in d.legs.values():
                if leg.out_of_sync():
                    return False
        return True

    def wait_drained(self, timeout: float) -> bool:
        """Wait (on events and progress) until :meth:`drained`; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.drained():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self.cond:
                self.cond.wait(min(left, 0.05))
        return True


# ftruncate's refusals of a size (nothing changed): too large for the file system,
# beyond its limits, or no room
_CANNOT_GROW = frozenset({errno.EFBIG, errno.EINVAL, errno.ENOSPC, errno.EDQUOT})

SLINK_MESSAGE_USAGE = ("usage: slink message <nr> <setting>... with settings policy "
                       "<policy>, fallbehind <type> <value> (or <type>=<value>), "
                       "resync_rate <N>[k|m|g]")


def _slink_settings(cfg: SlinkConfig, words: Sequence[str]) -> SlinkConfig:
    """The site link configuration after the settings of ``slink message <nr>
    <setting>...``; MessageError (nothing applied) if any setting is bad or the
    result is not a valid site link (as its table line would be refused)."""
    if not words:
        raise MessageError(SLINK_MESSAGE_USAGE)
    seen: set[str] = set()
    i = 0
    try:
        while i < len(words):
            key = words[i]
            if key in seen:
                raise MessageError(f"slink message: {key} given twice")
            seen.add(key)
            if key == "policy" and i + 1 < len(words):
                sync, stall = parse_policy(words[i + 1])
                cfg = replace(cfg, sync=sync, stall=stall)
                i += 2
            elif key == "fallbehind" and i + 1 < len(words):
                kind, eq, value = words[i + 1].partition("=")
                if eq:
                    i += 2
                elif i + 2 < len(words):
                    value = words[i + 2]
                    i += 3
                else:
                    raise MessageError("usage: fallbehind <type> <value> or <type>=<value>")
                cfg = replace(cfg, fallbehind=parse_fallbehind(kind, value))
            elif key == "resync_rate" and i + 1 < len(words):
                cfg = replace(cfg, resync_rate=parse_rate(words[i + 1]))
                i += 2
            else:
                raise MessageError(SLINK_MESSAGE_USAGE)
    except TableError as e:
        raise MessageError(str(e)) from e
    if cfg.sync and cfg.fallbehind.enabled:
        raise MessageError(f"site link {cfg.slink_nr}: a synchronous site link can't keep "
                           "a fall-behind threshold; clear it in the same message: "
                           "fallbehind ios 0 policy sync")
    return cfg


def _msg_int(word: str, what: str, *, lo: int = 0, hi: int | None = None) -> int:
    return parse_int(word, what, lo=lo, hi=hi, error=MessageError)


def _write_zeros(store: BlockStore, offset: int, length: int) -> None:
    # one write per entry (entries are at most MAX_ENTRY): a zero-write reaches the
    # device whole, like any other entry
    zero = bytes(min(length, MAX_ENTRY))
    pos = 0
    while pos < length:
        n = min(len(zero), length - pos)
        store.pwrite(offset + pos, zero[:n] if n < len(zero) else zero)
        pos += n


class ReplicatedDevice:
    """A replicated device (a ``replicator-dev`` target): the I/O entry point.

    ``write`` returns once the write is durable in the log (with ``durable_acks``,
    the default; else once written to the log store, durable after ``flush`` or
    with ``fua``) and on every site link holding acknowledgements; ``read`` returns
    the newest data; ``flush`` makes every acknowledged write durable; ``trim`` is
    a replicated write of zeros (a zero-write entry without data in the log).

    Writes wait (by design, like a suspended dm device) while the device is
    suspended, while the log is full and only site link 0, sync or ``stall`` site
    links hold its oldest entry, and for sync/forced-sync site links that are up
    but not copying because the replicator is stopped."""

    def __init__(self, rep: Replicator, cfg: DeviceConfig, legs: dict[int, Leg],
                 size_bytes: int) -> None:
        self.rep = rep
        self.cfg = cfg
        self.dev_nr = cfg.dev_nr
        self.size_bytes = size_bytes
        self.legs = legs
        self.sm = machine("device")  # running / suspended / removed (_state.py)

    @property
    def running(self) -> bool:
        return self.sm.state is DeviceState.RUNNING

    @property
    def closed(self) -> bool:
        return self.sm.state is DeviceState.REMOVED

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset % SECTOR or length % SECTOR:
            raise UserError(f"I/O at {offset}+{length}: offset and length must be "
                            "multiples of 512")
        if offset + length > self.size_bytes:
            raise UserError(f"I/O at {offset}+{length} beyond the device end "
                            f"({self.size_bytes})")

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              fua: bool = False) -> None:
        """Write; returns when acknowledged (see the class docstring).

        Raises :class:`LocalIOError` (not acknowledged) or ReplogIOError."""
        payload = data if isinstance(data, bytes) else bytes(data)
        self._check(offset, len(payload))
        if payload:
            self.rep._write(self, offset, payload, len(payload), fua, count=True)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.rep._read(self, offset, length)

    def flush(self) -> None:
        """Everything acknowledged before is durable (waits for writes in flight)."""
        ring = self.rep.ring
        with ring.lock:
            seq = ring.next_seq - 1
        if seq > 0:
            ring.commit(seq)

    def trim(self, offset: int, length: int) -> None:
        """Discard = a replicated zero-write: reads return zeros, at every site."""
        self._check(offset, length)
        if length:
            self.rep._write(self, offset, None, length)

    def suspend(self) -> None:
        with self.rep.cond:
            self._fire(DeviceEvent.SUSPEND)
            self.rep._bump(f"device {self.dev_nr} suspended")

    def resume(self) -> None:
        with self.rep.cond:
            self._fire(DeviceEvent.RESUME)
            self.rep._bump(f"device {self.dev_nr} resumed")

    def _fire(self, event: DeviceEvent) -> None:
        # caller holds the lock
        if self.closed:
            raise ReplicatorClosed(f"device {self.dev_nr} is removed")
        self.sm.fire(event)

    def message(self, argv: Sequence[str]) -> str:
        """replicator-dev messages: device add|del, start|resume, stop|suspend|postsuspend."""
        argv = list(argv)
        if not argv:
            raise MessageError("too few message arguments")
        if argv[0] in ("start", "resume") and len(argv) == 1:
            self.resume()
            return ""
        if argv[0] in ("stop", "suspend", "postsuspend") and len(argv) == 1:
            self.suspend()
            return ""
        if argv[0] == "device" and len(argv) >= 2:
            if argv[1] == "add":
                return self._add_legs(argv[2:])
            if argv[1] == "del":
                if len(argv) != 3:
                    raise MessageError("usage: device del <slink_nr>")
                nr = _msg_int(argv[2], "site link number")
                if nr < 1:
                    raise MessageError("invalid site link number argument; must be > 0")
                return self._del_leg(nr)
            raise MessageError(f"invalid device command {argv[1]!r}: expected add or del")
        raise MessageError(f"invalid message {' '.join(argv)!r}: expected device add|del, "
                           "start|resume or stop|suspend|postsuspend")

    def _add_legs(self, argv: list[str]) -> str:
        if len(argv) < 2:
            raise MessageError("usage: device add <replicator> <dev_nr> <tuples>")
        if _msg_int(argv[1], "device number") != self.dev_nr:
            raise MessageError(f"device add: device number {argv[1]} is not this device's "
                               f"({self.dev_nr})")
        try:
            cfgs = parse_legs(argv[2:], self.size_bytes // SECTOR)
            if not cfgs:
                raise TableError("no device tuple given")
            for c in cfgs:
                if c.slink_nr in self.legs:
                    raise TableError(f"device {self.dev_nr} already has a device on site "
                                     f"link {c.slink_nr}")
            legs = self.rep._open_legs(self.dev_nr, cfgs, self.size_bytes // SECTOR,
                                       list(self.legs.values()))
        except TableError as e:
            raise MessageError(f"device add: {e}") from e
        with self.rep.cond:
            self.legs.update(legs)
            self.cfg = replace(self.cfg, legs=tuple(lg.cfg for _, lg in
                                                    sorted(self.legs.items())))
            self.rep._bump(f"device {self.dev_nr}: legs added on site links "
                           f"{sorted(legs)}")
        return ""

    def _del_leg(self, nr: int) -> str:
        with self.rep.cond:
            leg = self.legs.get(nr)
            if leg is None:
                raise MessageError(f"device {self.dev_nr} has no device on site link {nr}")
            del self.legs[nr]
            self.cfg = replace(self.cfg, legs=tuple(lg.cfg for _, lg in
                                                    sorted(self.legs.items())))
            self.rep._graveyard.append(leg.store)
            self.rep._bump(f"device {self.dev_nr}: site link {nr} device deleted")
        return ""

    def table(self) -> str:
        """TABLE status: the replicator-dev parameters."""
        with self.rep.lock:
            return self.cfg.params()

    def status(self, kind: str = "info") -> str:
        """``info``: ``<replicator> <dev_nr>`` then per site link ``<R|W|RW|A>,-`` (local)
        or ``<R|W|RW|A>,<in_sync>[+]/<regions>``; ``table``: as :meth:`table`."""
        if kind == "table":
            return self.table()
        if kind != "info":
            raise UserError(f"invalid status type {kind!r}: expected info or table")
        with self.rep.lock:
            words = [self.cfg.replicator, str(self.dev_nr)]
            for nr, leg in sorted(self.legs.items()):
                state = leg.error or "A"
                if leg.dlog is None:
                    words.append(f"{state},-")
                else:
                    s = self.rep.slinks.get(nr)
                    with leg.lock:
                        sync, total = leg.dlog.get_sync_count(), leg.dlog.region_count
                    plus = "+" if s is not None and s.resyncing and sync < total else ""
                    words.append(f"{state},{sync}{plus}/{total}")
            return " ".join(words)


__all__ = ["MAX_ENTRY", "Leg", "ReplicatedDevice", "Replicator", "Slink", "ondisk"]
