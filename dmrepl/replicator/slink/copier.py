"""The copiers: one thread per site link applies the durable log entries in order.

Common to every site-link type (what a type does with its devices is its
:class:`~dmrepl.replicator.slink.SlinkType`): the choice of the next job
(:class:`~dmrepl.replicator._state.Job`), batches cut at overlaps with the copy
window (idempotent replay), epochs, flushes and persisted positions, fall-behind
and the ack mode, drops to the dirty logs when the ring is full, retries of a
site link that is down, and the resync schedule with its rate limit.  See
:mod:`dmrepl.replicator.target` for the rules.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from dmrepl.replicator._state import AckEvent, Job, LinkEvent, ResyncEvent
from dmrepl.replicator.errors import ReplogIOError
from dmrepl.replicator.slink.link import Copy, Slink

if TYPE_CHECKING:
    from dmrepl.replicator.device import Leg, ReplicatedDevice
    from dmrepl.replicator.ringlog import Entry
    from dmrepl.replicator.target import Replicator

SECTOR = 512


class Copiers:
    """The copier threads of one replicator and everything they share."""

    def __init__(self, rep: Replicator) -> None:
        self.rep = rep
        self.cond = rep.cond

    def ensure_thread_locked(self, s: Slink) -> None:
        if s.thread is None or not s.thread.is_alive():
            s.closing = False
            s.thread = threading.Thread(target=self._copier, args=(s,), daemon=True,
                                        name=f"repl-slink{s.nr}")
            s.thread.start()

    # -- fall-behind ---------------------------------------------------------------------

    def past_fallbehind_locked(self, s: Slink, now: float, ios: int = 0, nbytes: int = 0,
                               since: float | None = None) -> bool:
        """Is the async site link past its fall-behind threshold, with ``ios``
        writes of ``nbytes`` more not yet in the log, the oldest of them written
        at ``since`` (time.monotonic())?"""
        if not s.fallbehind_limited:
            return False
        fb = s.cfg.fallbehind
        if fb.kind == "ios":
            return s.out_ios + ios > fb.value
        if fb.kind == "size":
            return s.out_bytes + nbytes > fb.value * SECTOR
        ts = self.rep.replog.oldest_ts_locked(s)
        oldest = min((t for t in (ts, since) if t is not None), default=None)
        return oldest is not None and (now - oldest) * 1000 > fb.value

    def check_fallbehind_locked(self, s: Slink, now: float) -> None:
        """Enter or leave forced sync as the site link's lag crosses its threshold."""
        over = self.past_fallbehind_locked(s, now)
        if over != s.forced:
            s.ack.fire(AckEvent.OVER_THRESHOLD if over else AckEvent.UNDER_THRESHOLD)
            self.rep.bump_locked(f"{'enforcing' if over else 'releasing'} fallbehind "
                                 f"sync on slink={s.nr}")
            self.rep.emit_locked("change", "forced-sync-on" if over else "forced-sync-off",
                                 "slink", slink=s.nr, ack=s.ack.state.value)

    # -- the loop ------------------------------------------------------------------------

    def _copier(self, s: Slink) -> None:
        try:
            self._copier_loop(s)
        finally:
            pool, s.pool = s.pool, None
            if pool is not None:
                pool.shutdown(wait=True)

    def set_nice(self) -> None:
        """Lower the calling copier thread's priority by ``copier_nice``."""
        nice = self.rep.tuning.copier_nice
        if nice:
            # Background copies yield the CPU to the application's writers (Linux:
            # per-thread nice value); synchronous acknowledgements are unaffected
            # when the CPU is idle.
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))

    def _copier_loop(self, s: Slink) -> None:
        self.set_nice()
        tuning = self.rep.tuning
        while True:
            with self.cond:
                if s.busy:   # a writer applies its own writes (apply_here)
                    self.cond.wait(0.5)
                    continue
                job = self.next_job_locked(s)
                if job is None:
                    continue
                kind, arg = job
                if kind is Job.EXIT:
                    return
                s.busy = True
            pause = False
            try:
                if kind is Job.BATCH:
                    self._do_batch(s, arg)
                elif kind is Job.PERSIST:
                    self._do_persist(s)
                elif kind is Job.FLUSH:
                    self._do_flush(s)
                elif kind is Job.COMMIT:
                    self.rep.ring.commit(arg)
                elif kind is Job.DROP:
                    self._do_drop(s)
                elif kind is Job.RETRY:
                    self._do_retry(s)
                elif kind is Job.RESYNC:
                    self._do_resync(s, *arg)
            except ReplogIOError as err:
                with self.cond:
                    self.rep.bump_locked(f"slink {s.nr}: replication log failed: {err}")
                    self.rep.emit_locked("error", "replog-failed", "slink", slink=s.nr,
                                         error=str(err))
                    s.closing = True
                return
            finally:
                with self.cond:
                    s.busy = False
                    if kind is Job.BATCH and len(arg) < tuning.coalesce_entries \
                            and tuning.coalesce_delay > 0:
                        pause = self._may_coalesce_locked(s)
                        if pause:
                            s.hurry.clear()
            if pause:
                # not on the cond: each logged write does not wake it
                s.hurry.wait(tuning.coalesce_delay)

    def apply_here(self, s: Slink, upto: int) -> None:
        """Apply the site link's entries up to ``upto`` on the calling thread, if
        its copier is idle: a writer whose own writes are next in the log copies
        them itself (the export's writes and site link 0: no hand-off to the
        copier and back for the acknowledgement, two thread switches per batch,
        each of which can wait the interpreter's switch interval), and persists
        the position first where one overlaps a copy since the last persisted
        one.  Whatever it does not apply (the copier busy, the copy window full,
        the ring wanting space, the site link down...) the copier applies as
        usual."""
        rep = self.rep
        tuning = rep.tuning
        mine = False   # s.busy is this writer's (from its first job to its return)
        try:
            while True:
                with self.cond:
                    if ((s.busy and not mine) or s.durable >= upto or not rep.running
                            or not s.up or s.closing or s.drop_requested
                            or rep.replog.space_wanted
                            or s.window.n >= tuning.window_entries):
                        return
                    batch: list[Copy] = []
                    blocked = None
                    if s.applied < upto:
                        batch, blocked = self.collect_locked(s)
                        if not batch and blocked != "overlap":
                            return
                    s.busy = mine = True
                if batch:
                    self._do_batch(s, batch, notify=False)
                elif blocked == "overlap":
                    # its next write overlaps one copied since the last persisted
                    # position: persist first (the copier would, and the writer
                    # would wait for it)
                    self._do_persist(s)
                else:   # applied, to be flushed (the acknowledgements wait for it)
                    self._flush_touched(s, notify=False)
        finally:
            if mine:   # (one wake-up for all of it: each wakes every waiting thread)
                with self.cond:
                    s.busy = False
                    self.cond.notify_all()

    def release_claim(self, s: Slink, upto: int) -> None:
        """A writer that claimed the entries up to ``upto`` (:attr:`Slink.claimed`)
        is done with them: the copier takes what is left (unless a later writer
        claimed more since)."""
        with self.cond:
            if s.claimed and s.claimed <= upto:
                s.claimed = 0
                s.unclaimed.set()

    def _may_coalesce_locked(self, s: Slink) -> bool:
        # the copier caught up with the log (a batch cut short by an overlap or its
        # size limit goes on at once) and nobody is waiting for this site link's
        # copies
        rep = self.rep
        return (s.applied >= rep.ring.durable_seq
                and rep.running and s.up and not s.closing and not s.drop_requested
                and not s.holds_ack and s.want_durable <= s.durable
                and not rep.replog.space_wanted)

    def next_job_locked(self, s: Slink) -> tuple[Job, Any] | None:
        """The site link's next job; None after waiting (on the condition)."""
        rep = self.rep
        tuning = rep.tuning
        now = time.monotonic()
        if s.closing:
            return (Job.EXIT, None)
        if s.drop_requested:
            return (Job.DROP, None)
        if not s.up:
            if now >= s.next_retry:
                return (Job.RETRY, None)
            self.cond.wait(max(0.0, s.next_retry - now))
            return None
        if not rep.running:
            if s.applied > s.persisted and now - s.last_persist >= tuning.persist_interval:
                return (Job.PERSIST, None)
            self.cond.wait(tuning.persist_interval)
            return None
        # (or the header records a floor that the resync has lifted since)
        dirty = s.applied > s.persisted or s.touched or (
            s.header_floor is None and rep.ring.positions.get(s.nr, s.persisted) < s.persisted)
        if dirty and (rep.replog.space_wanted or s.window.n >= tuning.window_entries
                      or now - s.last_persist >= tuning.persist_interval):
            return (Job.PERSIST, None)
        if s.claimed > s.durable:   # a writer copies its own writes (apply_here)
            s.unclaimed.clear()
            self.cond.release()
            try:
                s.unclaimed.wait(1.0)   # (release_claim, or closing, sets it)
            finally:
                self.cond.acquire()
            return None
        if s.want_durable > s.durable and s.applied > s.durable:
            return (Job.FLUSH, None)
        ring = rep.ring
        commit = ring.commit_ready_locked()
        if commit is not None:
            return (Job.COMMIT, commit)
        batch, blocked = self.collect_locked(s)
        if batch:
            return (Job.BATCH, batch)
        if blocked == "overlap":
            return (Job.PERSIST, None)
        if s.nr and blocked is None and s.applied >= ring.durable_seq:
            work = self._resync_work_locked(s)
            if work is not None:
                wait = s.resync_next - rep.clock() if s.cfg.resync_rate else 0.0
                if wait <= 0:
                    s.resync_throttled = False
                    return (Job.RESYNC, work)
                # rate limited: new writes still go first (they wake us up)
                if not s.resync_throttled:
                    s.resync_throttled = True
                    rep.bump_locked()
                self.cond.wait(min(wait, 0.1))
                return None
        timeout = tuning.persist_interval if dirty else 1.0
        self.cond.wait(timeout)
        return None

    # -- batches -------------------------------------------------------------------------

    def collect_locked(self, s: Slink) -> tuple[list[Copy], str | None]:
        """Entries the site link would apply next (with their leg, None = skip, and
        the last sequence number of their epoch); and why it stopped: None, or
        "nodev" (an entry's device is not there yet), "stopped" (its device is
        suspended), "overlap" (it overlaps a copy since the last persisted
        position, or one taken before it).

        The entries taken join the copy window now, before they are applied: the
        batch is applied next (one job of a site link at a time), and an entry
        left unapplied by a failure only costs a persist when it is taken again."""
        rep = self.rep
        tuning = rep.tuning
        ring = rep.ring
        out: list[Copy] = []
        seq = s.applied + 1
        last = min(ring.durable_seq, s.applied + tuning.batch_entries)
        entries = ring.entries
        if seq > last or not entries:
            return out, None
        first = entries[0].seq
        if seq < first:
            return out, None
        last = min(last, first + len(entries) - 1)
        nr = s.nr
        window = s.window
        batch_bytes = tuning.batch_bytes
        nbytes = 0
        epoch = 0           # the epoch end of the entries since the last lookup
        dev_nr: int | None = None   # the device of the last entry copied, and its leg
        dev = leg0 = None
        while seq <= last:
            e = entries[seq - first]
            leg = None
            if nr in e.slinks:
                if e.dev != dev_nr:
                    dev = rep.devices.get(e.dev)
                    leg0 = dev.legs.get(nr) if dev is not None else None
                    dev_nr = e.dev
                if dev is None:
                    # wait for the device to be added (after a reopen the copiers may
                    # start before the devices are back: skipping would lose the
                    # replayed entries at that site); a removed device has no
                    # entries left (remove_device waits for them)
                    return out, "nodev"
                leg = leg0
                if leg is None:
                    if nr == 0:
                        return out, "nodev"  # wait for the local device to be added
                elif not dev.running:
                    return out, "stopped"
                else:
                    start, end = e.offset, e.offset + e.length
                    if window.overlaps(e.dev, start, end):
                        return out, "overlap"
                    window.add(e.dev, start, end)
                    nbytes += e.length
            if seq > epoch:   # (the epochs' bounds are sorted: one lookup per epoch)
                epoch = ring.epoch_end(seq)
            out.append((e, leg, epoch))
            seq += 1
            if nbytes >= batch_bytes:
                break
        return out, None

    def _do_batch(self, s: Slink, batch: list[Copy], notify: bool = True) -> None:
        """Apply a batch epoch by epoch: the copies of one epoch are in flight
        together (the site-link type's ``apply_epoch``), the next epoch starts when
        all of them completed.  Entries of a batch never overlap each other nor
        anything applied since the last persisted position (collect_locked), so
        their order within an epoch does not matter, and a crash replay stays
        idempotent.  ``notify``: wake the threads waiting on the replicator's
        condition (a writer applying its own batches wakes them once, at its end)."""
        with self.cond:
            # a writer waits for these copies, everything copied before is durable,
            # and every leg takes FUA writes: FUA copies, no flush round trip after
            durable = (s.holds_ack and s.durable >= s.applied and not s.touched
                       and all(s.ops.writes_durably(leg) for _e, leg, _ep in batch
                               if leg is not None))
        done = s.applied
        failed: tuple[Leg, OSError] | None = None
        written = []
        i = 0
        while i < len(batch) and failed is None:
            j = i
            while j < len(batch) and batch[j][2] == batch[i][2]:
                j += 1
            group = batch[i:j]
            ok, failure = s.ops.apply_epoch(s, group, durable)
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
        nr = s.nr
        with self.cond:
            nbytes = 0
            for e in written:
                nbytes += e.length
            if not durable and written:
                s.touched.update({e.dev for e in written})
            s.copies += len(written)
            s.copied_bytes += nbytes
            out_ios = out_bytes = 0
            queued = s.queued is not None
            for e, _leg, _ep in batch:
                if e.seq > done:
                    break
                if nr in e.slinks:
                    out_ios += 1
                    out_bytes += e.length
                    if queued:
                        s.count_queued_locked(e, -1)
            s.out_ios -= out_ios
            s.out_bytes -= out_bytes
            s.applied = max(s.applied, done)
            if durable:
                s.durable = max(s.durable, done)
            s.batches += 1
            self.rep.replog.applied_locked(s, [e for e, _leg, _ep in batch], done)
            self.check_fallbehind_locked(s, now)
            if failed is not None:
                self.leg_failed_locked(s, failed[0], "W", failed[1])
            if notify or failed is not None:
                self.cond.notify_all()

    def leg_failed_locked(self, s: Slink, leg: Leg, kind: str, err: BaseException) -> None:
        """A device of the site link failed (``kind``: "R" or "W"): the link goes
        down until a probe of its failed devices succeeds."""
        assert self.rep.lock.locked()
        if kind not in leg.error:
            leg.error = "RW" if leg.error else kind
        was_up = s.up
        s.link.fire(LinkEvent.IO_ERROR)
        s.failures += 1
        s.error = f"{leg.cfg.dev_path}: {err}"
        s.next_retry = time.monotonic() + self.rep.tuning.retry_interval
        self.rep.bump_locked(f"slink {s.nr} down: {leg.cfg.dev_path}: {err}")
        if was_up:
            self.rep.emit_locked("change", "link-down", "slink", slink=s.nr, link="down",
                                 error=s.error)
        self.rep.emit_locked("error", "io-error", "slink", slink=s.nr,
                             path=leg.cfg.dev_path, io=kind, error=str(err))

    # -- flush and persist ---------------------------------------------------------------

    def _flush_touched(self, s: Slink, notify: bool = True) -> bool:
        rep = self.rep
        with self.cond:
            devs = [rep.devices[d] for d in s.touched if d in rep.devices]
            target = s.applied
            touched = set(s.touched)
        for d in devs:
            leg = d.legs.get(s.nr)
            if leg is None:
                continue
            try:
                s.ops.flush(leg)
            except OSError as err:
                with self.cond:
                    self.leg_failed_locked(s, leg, "W", err)
                return False
        with self.cond:
            s.touched -= touched
            s.durable = max(s.durable, target)
            if notify:
                self.cond.notify_all()
        return True

    def _do_flush(self, s: Slink) -> None:
        self._flush_touched(s)

    def _do_persist(self, s: Slink) -> None:
        if not self._flush_touched(s):
            return
        with self.cond:
            target = s.durable
        self.persist_all(flush=False)
        with self.cond:
            if s.persisted >= target and s.applied == target:
                s.window.clear()
            s.last_persist = time.monotonic()

    def persist_all(self, flush: bool = True) -> None:
        """Write every site link's durable position to the log (``flush``: flush
        the site links that are up first).  No lock held."""
        rep = self.rep
        if flush:
            for s in list(rep.slinks.values()):
                if s.up:
                    self._flush_touched(s)
        positions = rep.replog.persist(
            lambda: {nr: s.durable for nr, s in rep.slinks.items()})
        with self.cond:
            for nr, pos in positions.items():
                sl = rep.slinks.get(nr)
                if sl is not None:
                    sl.persisted = max(sl.persisted, pos)
            self.cond.notify_all()

    # -- ring full: drop to the dirty logs -----------------------------------------------

    def _do_drop(self, s: Slink) -> None:
        rep = self.rep
        with self.cond:
            upto = rep.ring.durable_seq
            marks: dict[int, tuple[Leg, set[int]]] = {}
            dropped = 0
            dbytes = 0
            leaving: list[Entry] = []
            # from the durable position: entries applied but not flushed may be lost
            # at the site (it is down, or its flush fails), so they are marked too
            for seq in range(min(s.applied, s.durable) + 1, upto + 1):
                e = rep.ring.entry(seq)
                if e is None or s.nr not in e.slinks:
                    continue
                if seq > s.applied:  # still counted as outstanding
                    dropped += 1
                    dbytes += e.length
                    leaving.append(e)
                dev = rep.devices.get(e.dev)
                leg = dev.legs.get(s.nr) if dev is not None else None
                if leg is None or leg.dlog is None:
                    continue
                rs = leg.dlog.region_size * SECTOR
                regions = marks.setdefault(e.dev, (leg, set()))[1]
                regions.update(range(e.offset // rs, (e.end - 1) // rs + 1))
        try:
            for leg, regions in marks.values():
                s.ops.mark_out_of_sync(leg, sorted(regions))
        except Exception as err:
            with self.cond:
                s.drop_requested = False
                rep.bump_locked(f"slink {s.nr}: dirty log flush failed, entries kept: "
                                f"{err}")
            return
        with self.cond:
            if s.header_floor is None and any(not leg.dlog.persistent
                                              for leg, _r in marks.values()):
                # the marks die with this host: until the resync has copied their
                # regions the ring header keeps the position from before the jump,
                # and a reopen resynchronises the whole devices instead
                s.header_floor = s.persisted
            s.applied = max(s.applied, upto)
            s.durable = max(s.durable, upto)
            s.out_ios -= dropped
            s.out_bytes -= dbytes
            for e in leaving:
                s.count_queued_locked(e, -1)
            s.drop_requested = False
            s.drops += 1
            s.ack.fire(AckEvent.DROPPED)
            out_of_sync = sum(len(r) for _, r in marks.values())
            rep.bump_locked(f"slink {s.nr}: {dropped} entries dropped to dirty logs "
                            f"({out_of_sync} regions out of sync)")
            rep.emit_locked("change", "entries-dropped", "slink", slink=s.nr,
                            entries=dropped, regions=out_of_sync, ack=s.ack.state.value)
            up = s.up
        # Persist the new position (releasing the ring head) even if this site's
        # devices can't be flushed (it is down): what it may lack is in its dirty
        # logs.  Nobody else may persist soon (the others can be idle, their
        # positions persisted, the writers waiting for space).
        flushed = self._flush_touched(s) if up else False
        self.persist_all(flush=False)
        with self.cond:
            if flushed and s.persisted >= s.durable and s.applied == s.durable:
                s.window.clear()
            s.last_persist = time.monotonic()

    # -- a site link that is down --------------------------------------------------------

    def _do_retry(self, s: Slink) -> None:
        rep = self.rep
        with self.cond:
            legs = [d.legs[s.nr] for d in rep.devices.values()
                    if s.nr in d.legs and d.legs[s.nr].error]
        ok = True
        for leg in legs:
            try:
                s.ops.probe(leg)
            except OSError:
                ok = False
                continue
            with self.cond:
                leg.error = ""
        with self.cond:
            if ok:
                s.link.fire(LinkEvent.RETRY_OK)
                s.error = ""
                rep.bump_locked(f"slink {s.nr} up again")
                rep.emit_locked("change", "link-up", "slink", slink=s.nr, link="up")
            else:
                s.next_retry = time.monotonic() + rep.tuning.retry_interval

    # -- resync --------------------------------------------------------------------------

    def _resync_work_locked(self, s: Slink) -> tuple[ReplicatedDevice, Leg, int] | None:
        rep = self.rep
        # every device of the site link is in sync (none suspended; at least one:
        # before its devices are added, a site link's floor stays)
        in_sync: bool | None = None
        for dev in rep.devices.values():
            leg = dev.legs.get(s.nr)
            if leg is None or leg.dlog is None:
                continue
            in_sync = in_sync is not False
            if not dev.running:
                in_sync = False
                continue
            with leg.lock:
                log = leg.dlog
                if log.get_sync_count() >= log.region_count:
                    continue
                in_sync = False
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
            if rep.replog.pending_local_locked(dev.dev_nr, lo, hi):
                continue  # the local copy is not there yet: later
            return (dev, leg, r)
        if s.resyncing:
            s.resync.fire(ResyncEvent.ALL_IN_SYNC)
            rep.bump_locked(f"slink {s.nr}: resynchronisation complete")
            rep.emit_locked("change", "resync-end", "slink", slink=s.nr, resync="idle",
                            bytes=s.resync_bytes)
        if in_sync is True and s.header_floor is not None and not s.drop_requested:
            # what was dropped is at the site now: the header may record the real
            # position (the next persist does)
            s.header_floor = None
        return None

    def _report_progress_locked(self, s: Slink, dev: ReplicatedDevice, leg: Leg) -> None:
        """A resync-progress event each time a device's in-sync share passes a
        tenth (not per region: a large device has millions)."""
        with leg.lock:
            total = leg.dlog.region_count
            in_sync = leg.dlog.get_sync_count()
        percent = 100 * in_sync // total if total else 100
        if percent // 10 > leg.resync_decile:
            leg.resync_decile = percent // 10
            self.rep.emit_locked("change", "resync-progress", "slink", slink=s.nr,
                                 device=dev.dev_nr, percent=percent,
                                 regions_in_sync=in_sync, regions=total)

    def _do_resync(self, s: Slink, dev: ReplicatedDevice, leg: Leg, region: int) -> None:
        rep = self.rep
        with self.cond:
            if not s.resyncing:
                s.resync.fire(ResyncEvent.REGION_STARTED)
                s.resync_meter.restart(s.resync_bytes, rep.clock())
                rep.bump_locked(f"slink {s.nr}: resynchronisation started")
                rep.emit_locked("change", "resync-start", "slink", slink=s.nr,
                                resync="resyncing")
                for d in rep.devices.values():
                    if s.nr in d.legs:
                        d.legs[s.nr].resync_decile = -1
        if not s.ops.resync_region(s, dev, leg, region):
            return
        rs = leg.dlog.region_size * SECTOR
        lo, hi = region * rs, min((region + 1) * rs, dev.size_bytes)
        with self.cond:
            s.resync_bytes += hi - lo
            s.resync_meter.update(s.resync_bytes, rep.clock())
            self._report_progress_locked(s, dev, leg)
            rate = s.cfg.resync_rate
            if rate:
                # one region at a time: the average rate is the limit, a burst is
                # at most one region (resync_next never lies in the past)
                s.resync_next = max(rep.clock(), s.resync_next) + (hi - lo) / rate
            self.cond.notify_all()
