"""The ``ringbuffer`` replication log type: write path, ring full, reads, persistence.

Its storage core (placement, group commit, replay, release, resize) is
:class:`~dmrepl.replicator.ringlog.RingLog`; this module is what the replicator
does with it: a write becomes one entry or several (never more than a quarter of
the ring each), is acknowledged once durable in the log and on every site link
holding acknowledgements, and waits while the ring is full (asking lagging async
site links to drop their entries); a read overlays the entries not yet on the
local device (:mod:`.pending`) on what the local device returns.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from dmrepl.blockio import AckWait, WriteOp
from dmrepl.numbers import parse_int
from dmrepl.replicator import ondisk
from dmrepl.replicator._state import AckState
from dmrepl.replicator.errors import LocalIOError, MessageError, ReplicatorClosed, TableError
from dmrepl.replicator.replog import LOST_CLEAR_MESSAGE, MESSAGES_USAGE
from dmrepl.replicator.replog.pending import PendingIndex
from dmrepl.replicator.ringlog import Entry, RingLog
from dmrepl.replicator.store import DeviceOpener
from dmrepl.replicator.table import LOG_SIZE_MIN, ReplogConfig

if TYPE_CHECKING:
    from dmrepl.replicator.device import Leg, ReplicatedDevice
    from dmrepl.replicator.slink.link import Slink
    from dmrepl.replicator.target import Replicator

log = logging.getLogger("dmrepl.replicator")
SECTOR = 512
OFFSET_MAX = (1 << 63) - 1  # byte offsets on the log device are signed 64-bit
MAX_ENTRY = 8 << 20  # larger writes are split into several entries
_NO_SYNCS: frozenset[int] = frozenset()  # a write no site link holds
_LOCAL = frozenset((0,))  # site link 0: the local device
# writes up to this size fit a quarter of the smallest ring (see write): never split
_NEVER_SPLIT = ((LOG_SIZE_MIN * SECTOR - ondisk.RING_OFFSET) // 4
                - ondisk.ENTRY_HEADER_SIZE) // SECTOR * SECTOR

# ftruncate's refusals of a size (nothing changed): too large for the file system,
# beyond its limits, or no room
_CANNOT_GROW = frozenset({errno.EFBIG, errno.EINVAL, errno.ENOSPC, errno.EDQUOT})
USAGE = f"usage: {MESSAGES_USAGE}"


class _Targets(NamedTuple):
    """The site links a device's writes are copied to (:meth:`Ringbuffer._targets_locked`)."""

    nrs: frozenset[int]
    counted: tuple[Slink, ...]  # plain async, or sync and down: never holding
    holding: tuple[Slink, ...]  # sync and up: holding every write
    checked: tuple[Slink, ...]  # a fall-behind limit (or forced sync): per write


_active_lock = threading.Lock()
_active_logs: set[tuple[str, int]] = set()


def _log_key(path: str, start: int) -> tuple[str, int]:
    return (os.path.realpath(path), start)


class Ringbuffer:
    """The replication log of one replicator (its lock is the replicator's)."""

    def __init__(self, rep: Replicator, cfg: ReplogConfig, opener: DeviceOpener, *,
                 cache_bytes: int) -> None:
        self.rep = rep
        self.cfg = cfg
        self._key = _log_key(cfg.dev_path, cfg.dev_start)
        with _active_lock:
            if self._key in _active_logs:
                raise TableError(f"replication log {cfg.dev_path} at "
                                 f"{cfg.dev_start} is already active")
            _active_logs.add(self._key)
        try:
            try:
                store = opener(cfg.dev_path)
            except OSError as e:
                raise TableError(f"cannot open replog device {cfg.dev_path}: "
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
            self.ring = RingLog(store, cfg, cache_bytes=cache_bytes)
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
        # entries not yet on the local devices (reads and resync look them up)
        self.pending = PendingIndex()
        for entry in self.ring.entries:
            self.pending.add(entry)
        self.space_wanted = False  # writers wait for ring space: copiers persist now
        if self.ring.lost_regions or self.ring.lost_whole:
            log.error("%s: replay found lost entries: their regions are marked out of "
                      "sync on every site link as their devices are added", cfg.dev_path)
        report = self.lost_report()
        if report is not None:
            log.error("%s", report)

    def close(self) -> None:
        self.ring.close()
        with _active_lock:
            _active_logs.discard(self._key)

    # -- site links ------------------------------------------------------------------

    def slink_add_locked(self, s: Slink, *, fresh: bool) -> None:
        """A site link joins: ``fresh`` (added by message) at the log's end, else (a
        table's) at its persisted position, at least the head; it owes the entries
        after that (its lag counters)."""
        ring = self.ring
        if fresh:
            pos = ring.next_seq - 1
        else:
            base = ring.head_seq - 1
            recorded = ring.positions.get(s.nr, base)
            if recorded < base:
                # entries it never applied were released: dropped to dirty logs that
                # may not have survived (core); its devices go whole out of sync as
                # they are added (mark_lost), and the header keeps this position
                # until that resync is done (a crash during it starts it again)
                s.lost_to_drop = s.header_floor = recorded
                log.warning("%s: site link %d: its recorded position %d is below the "
                            "log's head %d (entries dropped while it was behind): its "
                            "devices will be resynchronised whole", self.cfg.dev_path,
                            s.nr, recorded, base)
            pos = max(recorded, base)  # copying starts at the head
        s.applied = s.durable = s.persisted = pos
        s.queued = None   # (counted again at the first status)
        # the lag counters cover the replayed entries this site link still needs
        # (else they go negative as the replay applies them)
        for entry in ring.entries:
            if entry.seq > pos and s.nr in entry.slinks:
                s.out_ios += 1
                s.out_bytes += entry.length

    # -- messages, resize, status -----------------------------------------------------

    def message(self, argv: Sequence[str]) -> str:
        """``replog resize <sectors>`` or ``replog clear_lost`` (``argv`` without
        ``replog``); MessageError changing nothing if refused."""
        argv = list(argv)
        if len(argv) == 2 and argv[0] == "resize":
            self.resize(parse_int(argv[1], "replog size (sectors)", lo=LOG_SIZE_MIN,
                                  hi=OFFSET_MAX // SECTOR - self.rep.cfg.replog.dev_start,
                                  error=MessageError))
            return ""
        if argv == ["clear_lost"]:
            if self.lost_report() is None:
                raise MessageError(f"{LOST_CLEAR_MESSAGE}: no lost acknowledged writes "
                                   "are reported")
            cleared = self.clear_lost()
            with self.cond:
                self.rep.bump_locked(f"replog: lost-writes report cleared "
                                     f"({cleared['entries']} entries)")
            return ""
        raise MessageError(USAGE)

    def resize(self, sectors: int) -> None:
        """Grow or shrink the log to ``sectors``; MessageError (nothing changed) if
        the ring cannot (entries in the way) or the log file cannot grow."""
        try:
            self.ring.resize(sectors)
        except TableError as e:
            raise MessageError(str(e)) from e
        except OSError as e:
            if e.errno not in _CANNOT_GROW:
                raise
            # the log file could not grow to the new size: nothing was written
            raise MessageError(f"replog resize {sectors}: cannot grow "
                               f"{self.cfg.dev_path}: {e.strerror or e}") from e
        rep = self.rep
        with self.cond:
            self.cfg = replace(rep.cfg.replog, size=sectors,
                               mode=rep.cfg.replog.mode or "open")
            rep.cfg = replace(rep.cfg, replog=self.cfg)
            rep.bump_locked(f"replog resized to {sectors} sectors")

    def status_locked(self) -> str:
        """The log's word of the INFO status: ``<entries>/<sectors used>/<log
        sectors>``."""
        ring = self.ring
        return f"{len(ring.entries)}/{ring.used_bytes() // SECTOR}/{ring.log_size}"

    def error_status_locked(self) -> str | None:
        """The log's error word of the INFO status (None: none): lost acknowledged
        writes until cleared."""
        lost = self.ring.lost
        if not lost["entries"]:
            return None
        return (f"ERROR:acknowledged_writes_lost={lost['entries']}:"
                f"{lost['first_seq']}-{lost['last_seq']}")

    def status_dict_locked(self) -> dict[str, Any]:
        """The log's part of the machine-readable status."""
        ring = self.ring
        lost = ring.lost
        return {
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
            "acknowledged_writes_lost": (
                {"entries": lost["entries"], "first_seq": lost["first_seq"],
                 "last_seq": lost["last_seq"], "whole_devices": bool(lost["whole"]),
                 "clear_with": LOST_CLEAR_MESSAGE} if lost["entries"] else None),
        }

    # -- lost entries (replay) -------------------------------------------------------

    def mark_lost(self, dev_nr: int, legs: Iterable[Leg]) -> None:
        """Mark out of sync, on every remote leg of a device being added, the
        regions of the entries the replay lost (all of them where a lost header was
        unreadable): before its copiers run, so no site link ships the entries after
        the loss and stays in sync where it lacks the lost one (the resync copies
        the local device's content there)."""
        ring = self.ring
        ranges = [(lo, hi) for d, lo, hi in ring.lost_regions if d == dev_nr]
        with self.cond:
            dropped = {nr for nr, s in self.rep.slinks.items()
                       if s.lost_to_drop is not None}
        legs = list(legs)
        if dropped:
            self._mark_dropped(dev_nr, [leg for leg in legs if leg.slink_nr in dropped])
        if not ranges and not ring.lost_whole:
            return
        for leg in legs:
            if leg.dlog is None:
                continue
            rs = leg.dlog.region_size * SECTOR
            if ring.lost_whole:
                regions = set(range(leg.dlog.region_count))
            else:
                regions = {r for lo, hi in ranges
                           for r in range(lo // rs, (max(hi, lo + 1) - 1) // rs + 1)}
            try:
                leg.ops.mark_out_of_sync(leg, sorted(regions))
            except Exception as err:
                raise TableError(f"device {dev_nr}: cannot mark the regions of lost "
                                 f"replication log entries out of sync in the dirty log "
                                 f"of {leg.cfg.dev_path}: {err}") from err
            log.warning("device %d, site link %d: %d regions marked out of sync after "
                        "lost replication log entries", dev_nr, leg.slink_nr, len(regions))

    def _mark_dropped(self, dev_nr: int, legs: list[Leg]) -> None:
        """Mark whole out of sync the legs of site links that lost released entries
        to a drop (see slink_add_locked): not an error, the local device has the
        data; the resync copies it."""
        for leg in legs:
            if leg.dlog is None:
                continue
            with self.cond:
                # (again, if a resync of the devices added before lifted it)
                s = self.rep.slinks[leg.slink_nr]
                s.header_floor = s.lost_to_drop
            try:
                leg.ops.mark_out_of_sync(leg, range(leg.dlog.region_count))
            except Exception as err:
                raise TableError(f"device {dev_nr}: cannot mark {leg.cfg.dev_path} out of "
                                 f"sync in its dirty log (site link {leg.slink_nr} lost "
                                 f"dropped entries): {err}") from err
            note = (f"device {dev_nr}, site link {leg.slink_nr}: whole device marked "
                    "out of sync (entries dropped while the site link was behind were "
                    "released before a restart)")
            log.warning("%s", note)
            with self.cond:
                self.rep.bump_locked(note)

    def lost_report(self) -> str | None:
        """The lost-writes error (one line), or None: shown until cleared."""
        lost = self.ring.lost
        if not lost["entries"]:
            return None
        where = ("whole devices" if lost["whole"] else "their regions")
        return (f"ERROR: replication log {self.cfg.dev_path}: "
                f"{lost['entries']} acknowledged writes lost (entries {lost['first_seq']}"
                f"..{lost['last_seq']} damaged): the local devices may lack them; "
                f"{where} marked out of sync on every site link; check the local data, "
                f"then clear with the message '{LOST_CLEAR_MESSAGE}'")

    def clear_lost(self) -> dict[str, int]:
        """The operator checked the local data: the report is cleared (returned)."""
        cleared = self.ring.clear_lost()
        log.warning("replication log %s: lost-writes report cleared by an operator "
                    "(%d entries, %d..%d)", self.cfg.dev_path,
                    cleared["entries"], cleared["first_seq"], cleared["last_seq"])
        return cleared

    # -- write path -----------------------------------------------------------------

    def write(self, dev: ReplicatedDevice, offset: int, data: bytes | None,
              length: int, fua: bool = False, count: bool = False,
              journal: bool = False) -> None:
        """Log a write (``data`` None: zeros) and wait for its acknowledgement.

        ``journal``: the kernel writes the local device itself (the device is a
        mirror's journal leg, :class:`~dmrepl.replicator.device.JournalLeg`), so
        the entry is for the remote site links only."""
        last: Entry | None = None
        sync_sets: list[tuple[Entry, frozenset[int]]] = []
        pos = 0
        ring = self.ring
        # an entry never needs more than a quarter of the ring (else it could wait
        # for space forever)
        limit = length if length <= _NEVER_SPLIT else \
            min(MAX_ENTRY, max(SECTOR, ((ring.ring_end - ring.ring_start) // 4
                                        - ondisk.ENTRY_HEADER_SIZE) // SECTOR * SECTOR))
        durable = self.rep.tuning.durable_acks or fua
        held = False  # does a sync (or forced sync) site link hold the acknowledgement?
        while pos < length:
            n = min(limit, length - pos)
            chunk = None if data is None else (data if n == length else data[pos:pos + n])
            e, syncs = self._append(dev, offset + pos, chunk, n, count and pos == 0,
                                    journal)
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
                    self._wait_sync_locked(dev, e, syncs)
        elif durable and ring.durable_seq < last.seq:
            # (a lone writer's entry is durable already: its write was)
            ring.commit(last.seq)

    def write_many(self, dev: ReplicatedDevice, ops: Sequence[WriteOp],
                   journal: bool = False, commit: bool = True) -> list[AckWait | None]:
        """Log a batch of writes (``(offset, data or None for zeros, length,
        fua)``) without waiting for space nor for a site link: reserve their entries
        under one lock, write them with one ``pwritev`` and make them durable with
        one flush (when acknowledgements are durable, or one is ``fua``, or a site
        link holds one).

        Returns one outcome per write taken, a prefix of ``ops``: None
        (acknowledged), or a function that returns once the site links holding it
        acknowledged it (raising if they cannot).  The rest is not logged: the
        caller writes it with :meth:`write`, which waits (a full ring, a
        suspended device, a write larger than the batch takes, a device in error).
        ``journal``: as :meth:`write`'s.  ``commit=False``: the caller makes the
        batch durable with :meth:`flush` (the kernel journal's drainer, whose
        writes the kernel acknowledged long ago), unless a site link holds a
        write or one is ``fua``: so one log commit, and one epoch for the remote
        site links, spans many batches.  Raises ReplogIOError when the log fails
        (no write of the batch is acknowledged)."""
        rep = self.rep
        with self.lock:
            if not dev.running or dev.closed or rep.closed or dev.legs[0].error:
                return []
            n = 0
            for _offset, _data, length, _fua in ops:
                if length > _NEVER_SPLIT:
                    break
                n += 1
            # (a ring full stops it: those left wait in write())
            taken = self._reserve_locked(dev, self._targets_locked(dev, journal),
                                         ops[:n] if n < len(ops) else ops,
                                         time.monotonic())
            rep.stats["nc"] += len(taken)
            if not taken:
                return []
            last = taken[-1][0]
            # site link 0 when it holds these writes: this thread copies them to the
            # local device itself (below), and its copier, which the log write
            # wakes, leaves them to it
            local = rep.slinks.get(0)
            if local is not None and any(0 in syncs for _e, _d, syncs in taken):
                local.claimed = max(local.claimed, last.seq)
            else:
                local = None
        ring = self.ring
        try:   # (from here on the claim is released, whatever happens)
            held = any(syncs for _e, _d, syncs in taken)
            durable = (held or (commit and self.rep.tuning.durable_acks)
                       or any(op[3] for op in ops[:len(taken)]))
            ring.write_entries([(e, data) for e, data, _s in taken], durable=durable)
            if durable and ring.durable_seq < last.seq:
                ring.commit(last.seq)
            if not held:
                return [None] * len(taken)
            if local is not None:
                # the local copy on this thread (when its copier is idle): the
                # acknowledgements need no other thread
                rep.copiers.apply_here(local, last.seq)
        finally:
            if local is not None:
                rep.copiers.release_claim(local, last.seq)
        with self.lock:
            return [None if self._acked_locked(syncs, e.seq)
                    else self._sync_waiter(dev, e, syncs) for e, _d, syncs in taken]

    def _acked_locked(self, syncs: frozenset[int], seq: int) -> bool:
        """Have the site links holding entry ``seq`` acknowledged it?"""
        for nr in syncs:
            s = self.rep.slinks.get(nr)
            if s is not None and s.durable < seq:
                return False
        return True

    def _sync_waiter(self, dev: ReplicatedDevice, e: Entry,
                     syncs: frozenset[int]) -> AckWait:
        def wait() -> None:
            with self.cond:
                self._wait_sync_locked(dev, e, syncs)
        return wait

    def _append(self, dev: ReplicatedDevice, offset: int, data: bytes | None,
                length: int, count: bool = False,
                journal: bool = False) -> tuple[Entry, frozenset[int]]:
        rep = self.rep
        with self.lock:  # (the condition's lock; cheaper to enter than the condition)
            waited: float | None = None
            while True:
                self._check_io_locked(dev)
                now = time.monotonic()
                taken = self._reserve_locked(dev, self._targets_locked(dev, journal),
                                             ((offset, data, length, False),), now,
                                             count=count)
                if taken:
                    got = taken[0][0], taken[0][2]
                    break
                if waited is None:
                    waited = now
                    rep.stats["c"] += 1
                self._ring_full_locked(now - waited)
                self.cond.wait(0.05)
            if waited is None:
                rep.stats["nc"] += 1
            return got

    def _targets_locked(self, dev: ReplicatedDevice, journal: bool = False) -> _Targets:
        """The site links a write of the device is copied to (a journal write:
        not site link 0, whose copy the kernel writes), as :meth:`_reserve_locked`
        takes them: what each needs per write does not change while the lock is
        held, so a batch looks it up once."""
        nrs = dev.legs.keys() & self.rep.slinks.keys()
        if journal:
            nrs -= _LOCAL
        targets = frozenset(nrs)
        counted: list[Slink] = []   # whose acknowledgement mode a write cannot change
        holding: list[Slink] = []   # sync and up: every write waits for them
        checked: list[Slink] = []   # with a fall-behind limit: checked at each write
        for nr in sorted(targets):
            s = self.rep.slinks[nr]
            cfg = s.cfg
            if cfg.sync:
                (holding if s.up else counted).append(s)
            elif cfg.fallbehind.value or s.ack.state is not AckState.ASYNC:
                checked.append(s)
            else:
                counted.append(s)   # plain async: never holds the acknowledgement
        return _Targets(targets, tuple(counted), tuple(holding), tuple(checked))

    def _reserve_locked(self, dev: ReplicatedDevice, targets: _Targets,
                        ops: Sequence[WriteOp], now: float, *, count: bool = True
                        ) -> list[tuple[Entry, bytes | None, frozenset[int]]]:
        """Reserve the entries of writes to ``targets`` in order, until the ring is
        full, and count them on the site links: per write taken, its entry, its
        data and the site links holding its acknowledgement.  ``count``: count
        the writes in the replicator's statistics (a zero-write, a trim, is not)."""
        rep = self.rep
        reserve = self.ring.reserve
        pending_add = self.pending.add
        dev_nr = dev.dev_nr
        nrs = targets.nrs
        everyone = targets.counted + targets.holding
        queued = [s for s in everyone if s.queued is not None]
        checked = targets.checked
        holds = frozenset(s.nr for s in targets.holding) or _NO_SYNCS
        taken: list[tuple[Entry, bytes | None, frozenset[int]]] = []
        nbytes = written = 0
        for offset, data, length, _fua in ops:
            e = reserve(dev_nr, offset, length, nrs, data, zero=data is None, now=now)
            if e is None:
                break
            pending_add(e)
            for s in queued:
                s.count_queued_locked(e, 1)
            syncs = holds
            for s in checked:   # (per write: the link's lag decides)
                s.out_ios += 1
                s.out_bytes += length
                if s.queued is not None:
                    s.count_queued_locked(e, 1)
                rep.copiers.check_fallbehind_locked(s, now)
                if s.holds_ack:
                    syncs = syncs | {s.nr}
                    s.want_durable = max(s.want_durable, e.seq)
                    if not s.hurry.is_set():
                        s.hurry.set()
            taken.append((e, data, syncs))
            nbytes += length
            if data is not None:
                written += 1
        if not taken:
            return taken
        for s in everyone:
            s.out_ios += len(taken)
            s.out_bytes += nbytes
        last = taken[-1][0].seq
        for s in targets.holding:
            s.want_durable = max(s.want_durable, last)
            if not s.hurry.is_set():
                s.hurry.set()
        stats = rep.stats
        stats["ws"] += len(taken)
        if count:
            stats["w"] += written
        return taken

    def _check_io_locked(self, dev: ReplicatedDevice) -> None:
        rep = self.rep
        while not dev.running and not dev.closed and not rep.closed:
            self.cond.wait()
        if dev.closed or rep.closed:
            raise ReplicatorClosed(f"device {dev.dev_nr} is closed")
        local = dev.legs[0]
        if local.error:
            raise LocalIOError(f"device {dev.dev_nr}: local device {local.cfg.dev_path} "
                               f"failed ({local.error}); write not acknowledged")

    def _wait_sync_locked(self, dev: ReplicatedDevice, e: Entry,
                          syncs: frozenset[int]) -> None:
        rep = self.rep

        def pending() -> list[Slink]:
            out = []
            for nr in syncs:
                s = rep.slinks.get(nr)
                if s is not None and s.durable < e.seq and s.up and not s.closing:
                    out.append(s)
            return out

        while True:
            if 0 in syncs:
                s0 = rep.slinks[0]
                if s0.durable < e.seq and (not s0.up or dev.legs[0].error):
                    raise LocalIOError(f"device {dev.dev_nr}: local copy failed "
                                       f"({s0.error}); write not acknowledged")
            if not pending():
                return
            if rep.closed:
                raise ReplicatorClosed(f"device {dev.dev_nr}: closed before the synchronous "
                                       "site links acknowledged the write (it is in the log)")
            self.cond.wait(0.5)

    def _ring_full_locked(self, waited: float) -> None:
        rep = self.rep
        self.space_wanted = True
        for s in rep.slinks.values():
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
        s0 = rep.slinks.get(0)
        if s0 is not None and s0.applied < head.seq:
            return
        for s in rep.slinks.values():
            if s.nr == 0 or s.durable >= head.seq:
                continue
            if s.cfg.sync or s.cfg.stall or s.drop_requested:
                continue
            if not s.up or (s.applied < head.seq and waited >= rep.tuning.full_grace):
                s.drop_requested = True
                self.cond.notify_all()

    def flush(self) -> None:
        """Everything acknowledged before is durable (waits for writes in flight)."""
        ring = self.ring
        with ring.lock:
            seq = ring.next_seq - 1
        if seq > 0:
            ring.commit(seq)

    # -- reads ------------------------------------------------------------------------

    def pending_local_locked(self, dev_nr: int, lo: int, hi: int) -> list[Entry]:
        """Entries overlapping [lo, hi) of a device not yet applied locally, in log
        order."""
        return self.pending.overlapping(dev_nr, lo, hi, self.rep.slinks[0].applied)

    def read(self, dev: ReplicatedDevice, offset: int, length: int) -> bytes:
        """The newest data: the local device with the pending entries over it."""
        for _ in range(10):
            with self.cond:
                self._check_io_read_locked(dev)
                snap: list[tuple[Entry, bytes | None]] = []
                end = offset + length
                for e in self.pending_local_locked(dev.dev_nr, offset, end):
                    if e.data is None and not e.zero and not self.ring.written_locked(e.seq):
                        continue  # concurrent write not on disk yet: undefined data
                    snap.append((e, e.data))
                self.rep.stats["r"] += 1
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

    def _check_io_read_locked(self, dev: ReplicatedDevice) -> None:
        if dev.closed or self.rep.closed:
            raise ReplicatorClosed(f"device {dev.dev_nr} is closed")

    # -- copy progress ---------------------------------------------------------------

    def oldest_ts_locked(self, s: Slink) -> float | None:
        """When the oldest entry the site link still needs was logged (None: none)."""
        seq = s.applied + 1
        while seq < self.ring.next_seq:
            e = self.ring.entry(seq)
            if e is None:
                return None
            if s.nr in e.slinks:
                return e.ts
            seq += 1
        return None

    def pending_for_dev_locked(self, dev_nr: int) -> int:
        """Entries of a device some site link has not applied yet."""
        rep = self.rep
        n = 0
        low = min(s.applied for s in rep.slinks.values())
        for seq in range(low + 1, self.ring.next_seq):
            e = self.ring.entry(seq)
            if e is not None and e.dev == dev_nr:
                for nr in e.slinks:
                    s = rep.slinks.get(nr)
                    if s is not None and s.applied < seq:
                        n += 1
                        break
        return n

    def applied_locked(self, s: Slink, batch: list[Entry], done: int) -> None:
        """Site link ``s`` applied the entries of ``batch`` up to ``done``: forget
        what no site link needs any more (local: from the pending index; all: the
        cached data)."""
        if s.nr == 0:
            for e in batch:
                if e.seq <= done:
                    self.pending.drop(e)
        low = min(sl.applied for sl in self.rep.slinks.values())
        for e in batch:
            if e.seq <= low:
                self.ring.drop_cache(e)

    def persist(self, positions: Callable[[], dict[int, int]]) -> dict[int, int]:
        """Write the site links' positions (the function gives them, called under
        the lock) to the ring header; returns the positions written."""
        def snapshot() -> dict[int, int]:
            # called by the ring under the lock, in header-write order
            self.space_wanted = False
            return positions()

        def floors() -> dict[int, int]:
            return {nr: s.header_floor for nr, s in self.rep.slinks.items()
                    if s.header_floor is not None}

        _, written = self.ring.persist(snapshot, floors)
        return written


if TYPE_CHECKING:
    from dmrepl.replicator.replog import ReplogType

    _conforms: type[ReplogType] = Ringbuffer  # mypy: the type implements the interface
