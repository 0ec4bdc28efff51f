"""The replicator target: table in, lifecycle, events; routes I/O, messages and
status to its parts.

The parts (as the seed's dm-replicator: a replication-log type and site-link
types behind their ops, devices hanging off site links):

* :mod:`.replog` -- the replication log type (``ringbuffer``: write path, ring
  full, reads, persistence; :mod:`.replog.pending` the pending-write index);
* :mod:`.slink` -- site-link types (``blockdev``) and the copiers that drive them
  (:mod:`.slink.copier`: jobs, epochs, positions, fall-behind, drops, retries,
  resync);
* :mod:`.device` -- replicated devices and their legs;
* :mod:`.messages` and :mod:`.status` -- the message grammar and status of both
  targets; :class:`dmrepl.tuning.Tuning` -- the knobs.

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

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from dmrepl.errors import UserError
from dmrepl.eventlog import EventLog
from dmrepl.replicator import replog as replog_types
from dmrepl.replicator import slink as slink_types
from dmrepl.replicator._state import DeviceEvent
from dmrepl.replicator.device import Leg, ReplicatedDevice, close_leg, open_legs
from dmrepl.replicator.errors import (
    DeviceBusy,
    ReplicatorClosed,
    ReplogIOError,
    TableError,
)
from dmrepl.replicator.messages import replicator_message
from dmrepl.replicator.slink.copier import Copiers
from dmrepl.replicator.slink.link import Slink
from dmrepl.replicator.status import replicator_status, replicator_status_dict
from dmrepl.replicator.store import BlockStore, DeviceOpener, open_file_store
from dmrepl.replicator.table import (
    ReplicatorConfig,
    SlinkConfig,
    parse_device,
    parse_replicator,
)
from dmrepl.tuning import Tuning

SECTOR = 512
#: How long a forced removal waits for the local device's copies and the remote
#: site links' drops.
FORCE_LOCAL_DRAIN_TIMEOUT = 30.0


class Replicator:
    """A replication log with its site links and devices; see the module docstring.

    Thread-safe.  Copies run only between :meth:`start` and :meth:`stop`.  The
    knobs are ``tuning`` (a :class:`~dmrepl.tuning.Tuning`), with keyword
    arguments of the same names overriding its fields."""

    def __init__(self, cfg: ReplicatorConfig, *, opener: DeviceOpener | None = None,
                 tuning: Tuning | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[..., Any] | None = None, **knobs: Any) -> None:
        self.cfg = cfg
        # where state changes go (emit_locked): the daemon's event log, or our own
        self.events = EventLog()
        self.on_event: Callable[..., Any] = on_event or self.events.emit
        self.tuning = replace(tuning or Tuning(), **knobs)
        self.clock = clock  # the resync rate limiter's time (tests: a fake one)
        self.opener: DeviceOpener = opener or open_file_store
        self.replog: replog_types.ReplogType = replog_types.factory("ringbuffer")(
            self, cfg.replog, self.opener, cache_bytes=self.tuning.cache_bytes)
        self.ring = self.replog.ring
        self.lock: threading.Lock = self.ring.lock
        self.cond = self.ring.cond
        self.copiers = Copiers(self)
        self._slink_ops: dict[str, slink_types.SlinkType] = {}
        self.slinks: dict[int, Slink] = {}
        for s in cfg.slinks:
            self.add_slink_locked(s, fresh=False)
        self.devices: dict[int, ReplicatedDevice] = {}
        self.running = False
        self.closed = False
        self.event_nr = 0
        self.statistics = False
        self.stats = {"r": 0, "w": 0, "rs": 0, "ws": 0, "nc": 0, "c": 0}
        self._graveyard: list[BlockStore] = []
        self.messages: list[str] = []  # recent notable events, newest last
        report = self.replog.lost_report()  # (logged by the log as it opened)
        if report is not None:
            self.messages.append(report)
            self.on_event("error", "lost-writes", "replog", report=report,
                          entries=self.ring.lost["entries"])

    # -- construction -----------------------------------------------------------

    @classmethod
    def from_table(cls, line: str, *, opener: DeviceOpener | None = None,
                   on_event: Callable[..., Any] | None = None,
                   **tuning: Any) -> Replicator:
        """Build from a ``replicator`` table line (or its parameters only);
        ``on_event(kind, event, object, **fields)`` receives its state changes
        (:meth:`dmrepl.eventlog.EventLog.emit`; default: :attr:`events`)."""
        return cls(parse_replicator(line), opener=opener, on_event=on_event, **tuning)

    def add_slink_locked(self, s: SlinkConfig, *, fresh: bool) -> Slink:
        """A new site link, its position given by the log (``fresh``: added by
        message, at the log's end; else the table's, where it was persisted)."""
        ops = self._slink_ops.get(s.kind)
        if ops is None:
            ops = self._slink_ops[s.kind] = slink_types.factory(s.kind)(self)
        sl = Slink(cfg=s, applied=0, durable=0, persisted=0, ops=ops)
        self.replog.slink_add_locked(sl, fresh=fresh)
        self.slinks[s.slink_nr] = sl
        return sl

    def bump_locked(self, note: str | None = None) -> None:
        """A new event (``note``: kept among the recent ones); wakes every waiter."""
        assert self.lock.locked()
        self.event_nr += 1
        if note:
            self.messages.append(note)
            del self.messages[:-50]
        self.cond.notify_all()

    def emit_locked(self, kind: str, event: str, obj: str, **fields: Any) -> None:
        """A state change for the event stream (never blocks: see
        :mod:`dmrepl.eventlog`)."""
        self.on_event(kind, event, obj, **fields)

    def current_state(self) -> list[tuple[str, dict[str, Any]]]:
        """Every site link and device as (object, fields), for ``events --now``."""
        with self.lock:
            out: list[tuple[str, dict[str, Any]]] = [
                ("slink", {"slink": nr, "link": s.link.state.value,
                           "ack": s.ack.state.value, "resync": s.resync.state.value,
                           **({"error": s.error} if s.error else {})})
                for nr, s in sorted(self.slinks.items())]
            out += [("device", {"device": nr, "state": d.sm.state.value})
                    for nr, d in sorted(self.devices.items())]
            return out

    def wait_event(self, after: int, timeout: float | None) -> int:
        """Block until ``event_nr > after`` (or timeout); return ``event_nr``."""
        with self.cond:
            self.cond.wait_for(lambda: self.event_nr > after or self.closed, timeout)
            return self.event_nr

    def retire_store_locked(self, store: BlockStore) -> None:
        """A store no device uses any more; closed with the replicator (copies in
        flight may still hold it)."""
        self._graveyard.append(store)

    # -- devices ------------------------------------------------------------------

    def add_device(self, line: str) -> ReplicatedDevice:
        """Add a device from a ``replicator-dev`` line (or its parameters)."""
        self.check_open()
        cfg = parse_device(line)
        with self.lock:
            if cfg.dev_nr in self.devices:
                raise TableError(f"device number {cfg.dev_nr} is already in use")
        local = cfg.leg(0)
        if local is None:
            raise TableError(f"device {cfg.dev_nr}: the local device (site link 0) is "
                             "missing")
        legs = open_legs(self, cfg.dev_nr, cfg.legs, cfg.length, [])
        try:
            size = legs[0].store.size if cfg.length is None else cfg.length * SECTOR
            if cfg.length is None:
                cfg = replace(cfg, length=size // SECTOR)
            self.replog.mark_lost(cfg.dev_nr, legs.values())
            dev = ReplicatedDevice(self, cfg, legs, size)
            with self.cond:
                if cfg.dev_nr in self.devices:
                    raise TableError(f"device number {cfg.dev_nr} is already in use")
                self.devices[cfg.dev_nr] = dev
                self._recount_queued_locked()
                self.bump_locked(f"device {cfg.dev_nr} added")
                self.emit_locked("create", "device-add", "device", device=cfg.dev_nr,
                                 size=size)
            return dev
        except BaseException:
            for leg in legs.values():
                close_leg(leg)
            raise

    def remove_device(self, dev_nr: int, timeout: float = 0.0, *,
                      force: bool = False) -> None:
        """Remove a device; waits up to ``timeout`` seconds for its writes to reach
        every site link, then refuses (:class:`DeviceBusy`) while some are not
        copied.  An unknown device number is a UserError.

        ``force``: the writes not yet at a remote site link are given up there,
        as when the ring is full: that site link drops its outstanding entries
        into the dirty logs (the regions of every device they touch are marked out
        of sync; this device's remote copy is left inconsistent and needs a full
        resync if it is added again).  The local device's own writes are still
        waited for (up to :data:`FORCE_LOCAL_DRAIN_TIMEOUT`)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            dev = self.devices.get(dev_nr)
            if dev is None:
                raise UserError(f"no device number {dev_nr}")
            while True:
                pending = self.replog.pending_for_dev_locked(dev_nr)
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    break
                self.cond.wait(min(left, 0.05))
            if pending and force:
                pending = self._drop_remote_pending_locked(dev_nr)
            if pending:
                raise DeviceBusy(f"device {dev_nr} has {pending} writes not yet copied to "
                                 "all its site links; retry when they drained")
            del self.devices[dev_nr]
            self._recount_queued_locked()
            dev.sm.fire(DeviceEvent.REMOVE)
            self.bump_locked(f"device {dev_nr} removed")
            self.emit_locked("destroy", "device-remove", "device", device=dev_nr)
        for leg in dev.legs.values():
            close_leg(leg)

    def _recount_queued_locked(self) -> None:
        """The devices changed: each site link's queue is counted again (at the
        next status: a device's regions are its own legs')."""
        for s in self.slinks.values():
            s.queued = None

    def _drop_remote_pending_locked(self, dev_nr: int) -> int:
        """Have every remote site link that still owes ``dev_nr`` writes drop its
        outstanding entries (the ring-full drop: regions marked out of sync in the
        dirty logs), and wait for the drops and the local copies; returns the
        writes still pending (0: the device may go)."""
        deadline = time.monotonic() + FORCE_LOCAL_DRAIN_TIMEOUT
        while True:
            # asked again while entries remain: a drop covers the durable entries
            # only, and one whose dirty-log flush failed keeps them (its event says so)
            for s in self._remote_slinks_owing_locked(dev_nr):
                s.drop_requested = True
            self.cond.notify_all()
            pending = self.replog.pending_for_dev_locked(dev_nr)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return pending
            self.cond.wait(min(left, 0.05))

    def _remote_slinks_owing_locked(self, dev_nr: int) -> list[Slink]:
        ring = self.ring
        low = min(s.applied for s in self.slinks.values())
        owing: dict[int, Slink] = {}
        for seq in range(low + 1, ring.next_seq):
            e = ring.entry(seq)
            if e is None or e.dev != dev_nr:
                continue
            for nr in e.slinks:
                s = self.slinks.get(nr)
                if nr and s is not None and s.applied < seq:
                    owing[nr] = s
        return list(owing.values())

    # -- lifecycle ------------------------------------------------------------------

    def check_open(self) -> None:
        """Raises :class:`ReplicatorClosed` once closed."""
        if self.closed:
            raise ReplicatorClosed("replicator is closed")

    def start(self) -> None:
        """Start (resume) copying to every site link."""
        self.check_open()
        with self.cond:
            self.running = True
            for s in self.slinks.values():
                self.copiers.ensure_thread_locked(s)
            self.bump_locked("started")

    def stop(self) -> None:
        """Stop copying (entries stay in the ring); positions are persisted."""
        with self.cond:
            if not self.running:
                return
            self.running = False
            self.bump_locked("stopped")
        self.copiers.persist_all()

    def close(self) -> None:
        """Stop everything, persist progress, close devices and the log."""
        with self.cond:
            if self.closed:
                return
            self.running = False
            self.closed = True
            threads = []
            for s in self.slinks.values():
                s.close_locked()
                if s.thread is not None:
                    threads.append(s.thread)
            for d in self.devices.values():
                d.sm.fire(DeviceEvent.REMOVE)
            self.bump_locked("closed")
        for t in threads:
            t.join()
        try:
            if self.ring.failed is None:
                self.copiers.persist_all()
        except (OSError, ReplogIOError):
            pass
        for d in self.devices.values():
            for leg in d.legs.values():
                close_leg(leg)
        for st in self._graveyard:
            try:
                st.close()
            except OSError:
                pass
        self.replog.close()

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages and status -------------------------------------------------------------

    def message(self, argv: Sequence[str]) -> str:
        """A replicator target message; raises MessageError changing nothing."""
        return replicator_message(self, argv)

    def lost_report(self) -> str | None:
        """The lost-writes error (one line), or None: shown until cleared."""
        return self.replog.lost_report()

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
        return replicator_status(self, kind)

    def status_dict(self) -> dict[str, Any]:
        """Machine-readable state (see :func:`.status.replicator_status_dict`)."""
        return replicator_status_dict(self)

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


__all__ = ["Leg", "ReplicatedDevice", "Replicator", "Slink"]
