"""The kernel journal: /dev/mapper/NAME as a dm ``log-writes`` target.

For a device whose remote site links are all asynchronous, no write needs to
wait for the daemon: ``log-writes LOCAL SEGMENT`` writes the local device at the
kernel's speed and logs every completed write, in completion order and bounded
by flushes, on a *segment* (a loop device over a file of the daemon's).  The
daemon drains the journal: every ``journal_interval`` seconds that the device
was written, it swaps the table to the next segment (load, suspend, resume: the
old target logs what it still held and its super block as it goes), reads the
finished segment and appends its writes, in order, to the replication log for
the remote site links (the device's *journal* backend, as the mirror's journal
leg does), then empties the segment.  Reads never leave the kernel.

What the daemon's death or the host's crash costs:

* the daemon dies (kill -9): the kernel journals on into the current segment;
  the next daemon finds the device, swaps the segment out and drains every
  segment it had not (their order is in ``NAME.journal``).  log-writes logs a
  write only at the next flush or as its target goes, keeping it in kernel
  memory until then; with no swaps, the guardian (told of the device at
  :meth:`KernelJournal.open`) flushes it every ``journal_interval`` instead.
  Nothing is lost unless the segment filled meanwhile: a log that fills up
  stops short of the end mark its target logs last as it goes; a segment
  drained without it makes the remote site links resynchronise what was
  written since it began.
* the host crashes (the device is gone, ``NAME.active`` says it was live): the
  kernel kept the log in memory until it wrote it, so writes may be missing from
  it; the remote site links resynchronise the whole device.  ``NAME.resync``
  remembers that until they have (a restart meanwhile marks it again).

A site link with a fall-behind limit: the kernel completes every write before
the daemon sees it, so "past the limit, writes wait for the site" is kept by
*holding* the device: while a remote site link of the device would be past its
limit counting the journal's writes not yet in the replication log (the segments
swapped out and not yet drained, and the writes the device completed since the
last swap, from its /sys stat), the daemon suspends /dev/mapper/NAME (its writes
wait in the kernel) and resumes it once it is back under the limit.  The drainer
looks at every batch it appends and every ``journal_interval``: the site may fall
behind by the limit plus what the device writes between two looks.  A device
held only for what the segment in use holds is swapped anyway (resumed for the
moment of the swap: the writes queued meanwhile go through).  The daemon's
guardian process (:mod:`dmrepl.daemon.guardian`) resumes a held device if the
daemon dies.

Segments, state files and their loop devices live in the daemon's state
directory (``journal/``)."""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dmrepl.blockio import WriteOp
from dmrepl.daemon import _kernel
from dmrepl.daemon.erarecord import EraRecord
from dmrepl.daemon.exports import write_op
from dmrepl.daemon.guardian import Guardian
from dmrepl.dm import era as era_fmt
from dmrepl.dm import logwrites as lw
from dmrepl.errors import DmreplError
from dmrepl.nbd.backend import Backend

log = logging.getLogger(__name__)

SEGMENTS = 3
#: A segment past this fraction full is swapped out even while the daemon is
#: still draining the one before (before the kernel runs out of room).
SWAP_FILL = 0.5
#: Writes appended to the replication log per batch at most (count, bytes).
BATCH_OPS = 64
BATCH_BYTES = 4 << 20
#: Seconds between looks at a held device's site links (its writers wait).
HELD_POLL = 0.05
#: Seconds before a hold that failed (no guardian, a suspend refused) is tried again.
HOLD_RETRY = 5.0


class JournalTarget(Protocol):
    """What a kernel journal drains into and asks about: the engine device of its
    device (:class:`~dmrepl.daemon._engine.EngineDevice` is one), or a group's
    members (:class:`~dmrepl.daemon.kgroup.GroupTarget`); offsets are the
    journal's device's."""

    def journal(self, *, cached: bool = False) -> Backend: ...
    def lost_writes(self, offset: int = 0, length: int | None = None) -> None: ...
    def remote_in_sync(self) -> bool: ...
    def behind_limit(self, ios: int = 0, nbytes: int = 0,
                     since: float | None = None) -> bool: ...
    def fallbehind_limited(self) -> bool: ...


class JournalError(DmreplError):
    """The kernel journal of a device cannot go on; the message says why."""


@dataclass
class _Stats:
    swaps: int = 0
    entries: int = 0
    bytes: int = 0
    resyncs: int = 0
    resync_bytes: int = 0
    holds: int = 0


@dataclass
class KernelJournal:
    """The kernel journal of one single-line device (see the module's doc)."""

    name: str
    sectors: int
    local: str
    #: what the journal drains into (its device's engine device; a group's members)
    dev: JournalTarget
    directory: str
    segment_bytes: int
    interval: float
    #: the device is suspended by its admin: no swap may resume it
    paused: Callable[[], bool] = lambda: False
    on_event: Callable[..., object] = lambda *a, **k: None
    lock: threading.Lock = field(default_factory=threading.Lock)
    stats: _Stats = field(default_factory=_Stats)
    current: int = 0
    pending: deque[int] = field(default_factory=deque)
    error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _loops: list[str] = field(default_factory=list)
    #: the era device under the journal (None: a device made before it had one)
    record: EraRecord | None = None
    #: for each segment not yet drained: the era current when it began
    eras: dict[int, int] = field(default_factory=dict)
    #: the device under log-writes (the era device, or the local device)
    _under: str = ""
    #: the device's write count just before the last swap (-1: none yet)
    _writes_at_swap: int = -1
    #: the bytes its writes had covered then
    _bytes_at_swap: int = -1
    #: NAME is no longer a log-writes target (:meth:`drain_replaced`)
    _replaced: bool = False
    #: resumes a held device if the daemon dies (None: writes are never held)
    guardian: Guardian | None = None
    #: the daemon suspended NAME: a remote site link is past its fall-behind limit
    _held: bool = False
    #: per segment swapped out and not yet drained: [writes, bytes] not yet appended
    _left: dict[int, list[int]] = field(default_factory=dict)
    #: per segment: when it became the one the kernel journals to (time.monotonic())
    _began: dict[int, float] = field(default_factory=dict)
    #: no hold is tried before this (time.monotonic()): the last one failed
    _hold_retry_at: float = 0.0

    # -- files ----------------------------------------------------------------------

    def _path(self, suffix: str) -> str:
        return os.path.join(self.directory, f"{self.name}.{suffix}")

    def _segment(self, i: int) -> str:
        return self._path(f"{i}.seg")

    def _save_order(self) -> None:
        """``NAME.journal``: the segments to drain, oldest first, then the current."""
        tmp = self._path("journal.tmp")
        with open(tmp, "w") as f:
            busy = [*self.pending, self.current]
            json.dump({"pending": list(self.pending), "current": self.current,
                       "eras": {str(i): self.eras[i] for i in busy if i in self.eras}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path("journal"))

    def _load_order(self) -> tuple[list[int], int | None]:
        try:
            with open(self._path("journal")) as f:
                saved = json.load(f)
            pending = [int(i) for i in saved["pending"]]
            current = int(saved["current"])
            # (absent: saved before the era record)
            self.eras = {int(i): int(e) for i, e in saved.get("eras", {}).items()}
        except FileNotFoundError:
            return [], None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise JournalError(f"{self.name}: journal state {self._path('journal')} "
                               f"unreadable ({e}): remove the device and create it again"
                               ) from e
        if not all(0 <= i < SEGMENTS for i in [*pending, current]):
            raise JournalError(f"{self.name}: journal state names segments out of range")
        return pending, current

    def _empty(self, i: int) -> None:
        """Forget segment ``i``'s content (its super first), durably: a segment
        drained again after newer ones would put old writes over new ones."""
        path = self._segment(i)
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)      # frees its space (tmpfs: memory)
            os.ftruncate(fd, self.segment_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _flag(self, suffix: str, on: bool) -> None:
        path = self._path(suffix)
        if on:
            with open(path, "w") as f:
                f.flush()
                os.fsync(f.fileno())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- start and stop -------------------------------------------------------------

    def open(self, uuid: str | None, *, replace: bool = False, start: bool = True) -> str:
        """Create /dev/mapper/NAME, or take over the one a dead daemon left (and
        drain what it journalled meanwhile); start draining (``start`` False: the
        caller does, :meth:`start`, once what came before is in the replication
        log).  Returns its path.

        ``replace``: NAME is live as another structure (a mirror whose writes all
        reached the replication log): its table is replaced in place."""
        os.makedirs(self.directory, exist_ok=True)
        existed = os.path.exists(self._segment(0)) and not replace
        self._loops = [_kernel.attach_file_loop(self._segment(i), self.segment_bytes)[0]
                       for i in range(SEGMENTS)]
        live = None if replace else _kernel.logwrites_logdev(self.name)
        if live is not None and _kernel.finish_half_swap(self.name):
            # (before the live table is read: resumed, the table the dead daemon
            # loaded is the one the kernel journals to)
            log.warning("%s: resumed: a daemon died in the middle of a segment swap",
                        self.name)
            live = _kernel.logwrites_logdev(self.name)
        record = EraRecord(self.name, self.sectors, self.local, self.directory)
        self._resync_saved()   # (a resync a restart interrupted)
        if live is not None:
            # a daemon died: the kernel journalled on
            pending, current = self._load_order()
            now = self._loop_index(live)
            if current is not None and current != now and now not in pending:
                # it died between the kernel's swap and saving it: the segment saved
                # as current was swapped out and waits like the others
                pending.append(current)
                self.eras.setdefault(now, self.eras.get(current, 0))
            elif current != now:
                raise JournalError(f"{self.name}: the kernel journals to {live}, not the "
                                   "segment the journal state names: remove the device "
                                   "and create it again")
            self.pending.extend(pending)
            self.current = now
            for i in pending:   # (its writes count against a fall-behind limit)
                self._left[i] = self._segment_size(i, None)
            era_devno = record.live_devno()
            if era_devno is not None and era_devno == _kernel.logwrites_origin(self.name):
                self.record = record
                self._under = record.open()
            else:   # made before the era record: none
                self._under = self.local
            log.info("%s: taking over the kernel journal (segment %d, %d to drain)",
                     self.name, now, len(pending))
            path = f"/dev/mapper/{self.name}"
        else:
            lost: list[tuple[int, int]] | None = []
            if existed and os.path.exists(self._path("active")):
                # the device went without its daemon draining it: a crash
                log.warning("%s: the kernel journal was live and is gone (a crash)",
                            self.name)
                lost = self._lost_in_crash(record)
            for i in range(SEGMENTS):
                self._empty(i)
            self.current = 0
            self.pending.clear()
            self._under = self.local
            self.eras = {}
            if record.usable:
                self.record = record   # (before: close undoes a half-made one)
                self._under = record.open()
                self.eras[0] = record.current_era()
            self._save_order()
            if replace:
                path = _kernel.place_logwrites(self.name, self.sectors, self._under,
                                               self._loops[0])
            else:
                path = _kernel.create_logwrites(self.name, self.sectors, self._under,
                                                self._loops[0], uuid)
            if lost != []:
                self._resync(lost, "what the crash kept from the journal, since its oldest "
                             "segment not drained began")
        self._flag("active", True)
        self._tell_guardian()
        if start:
            self.start()
        return path

    def _tell_guardian(self) -> None:
        """Have the guardian flush NAME while the daemon is down: log-writes
        keeps every write it has not logged in kernel memory until the next
        flush, and the swaps that bound that while the daemon runs stop with
        it (a writer that never flushes would fill it for the whole outage)."""
        if self.guardian is None:
            return
        try:
            devno = _kernel.mapper_devno(self.name)
            if devno is None:   # (made or taken over just now: removed meanwhile)
                raise OSError(f"/dev/mapper/{self.name} is gone")
            self.guardian.journal(self.name, devno)
        except OSError as e:   # (nothing lost: an outage costs kernel memory, or a resync)
            log.warning("%s: no guardian flushes its kernel journal while the daemon "
                        "is down: %s", self.name, e)

    def _untell_guardian(self) -> None:
        """The journal is drained for good (replaced, closed): not the guardian's
        to flush any more."""
        if self.guardian is not None:
            self.guardian.unjournal(self.name)

    def _lost_in_crash(self, record: EraRecord) -> list[tuple[int, int]] | None:
        """What a crash may have kept from the journal: the blocks written since
        the era its oldest segment not drained began in (None: the whole device,
        there is no era record to say)."""
        try:
            pending, current = self._load_order()
        except JournalError as e:
            log.warning("%s", e)
            return None
        busy = [*pending, *([] if current is None else [current])]
        if not busy or not all(i in self.eras for i in busy) \
                or not os.path.exists(record.metadata):
            return None
        try:
            return record.written_since(min(self.eras[i] for i in busy))
        except (era_fmt.EraFormatError, OSError) as e:
            log.warning("%s: the era record is unreadable (%s)", self.name, e)
            return None

    def start(self) -> None:
        """(Re)start draining."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"kjournal-{self.name}",
                                            daemon=True)
            self._thread.start()

    def drain_now(self) -> None:
        """Swap the segment and drain everything journalled so far (the device
        has no opener: nothing comes after); draining stays stopped."""
        self.stop()
        self._drain_pending()   # (a free segment for the swap)
        self.swap()
        self._drain_pending()

    def _loop_index(self, devno: str) -> int:
        for i, loop in enumerate(self._loops):
            if _kernel.devno(loop) == devno:
                return i
        raise JournalError(f"{self.name}: the kernel journals to {devno}, which is none "
                           "of its segments: remove the device and create it again")

    def drain_replaced(self) -> None:
        """After NAME's log-writes table was replaced by another (its target,
        destroyed, logged all it held): drain every segment, in order; draining
        stays stopped and :meth:`close` drains nothing more."""
        self.stop()
        self._untell_guardian()
        self.pending.append(self.current)
        self._drain_pending()
        self._replaced = True

    def drain_replaced_or_resync(self) -> None:
        """:meth:`drain_replaced`; if it fails, what the journal held reaches the
        remote site links by resync instead (all of its device)."""
        try:
            self.drain_replaced()
        except Exception as e:
            log.error("%s: draining its replaced kernel journal failed (%s): the remote "
                      "site links resynchronise its device", self.name, e)
            self.dev.lost_writes()

    def discard(self) -> None:
        """Forget a journal its device no longer logs to (its table was replaced)
        and whose writes reach the remote site links by a resync instead: its
        segments, its state files, its era device and metadata go."""
        self._replaced = True
        self.record = EraRecord(self.name, self.sectors, self.local, self.directory)
        self.close(keep=False)

    def stop(self) -> None:
        """Stop draining (the kernel journals on; a held device is resumed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._set_held(False)

    # -- holding writes while a site link is past its fall-behind limit -------------

    def _hold_if_behind(self) -> None:
        """Hold the device's writes while a remote site link is past its
        fall-behind limit; let them go once none is (see the module's doc)."""
        if self.guardian is None or self._stop.is_set():
            return
        if not self._held and not self.dev.fallbehind_limited():
            return   # (its backlog, a device-mapper ioctl a look, does not count)
        behind = self.dev.behind_limit(*self._backlog(current=True))
        if behind != self._held:
            self._set_held(behind)

    def _backlog(self, *, current: bool) -> tuple[int, int, float | None]:
        """The journal's writes not yet in the replication log: how many, their
        bytes, when the oldest was written (time.monotonic(), about): those of the
        segments swapped out and not drained, and (``current``) those the device
        completed since the last swap."""
        ios = sum(max(0, n) for n, _b in self._left.values())
        nbytes = sum(max(0, b) for _n, b in self._left.values())
        began = [self._began[i] for i in self._left if i in self._began]
        if current and self._writes_at_swap >= 0:
            writes, written = _kernel.mapper_write_stat(self.name)
            if writes > self._writes_at_swap:
                ios += writes - self._writes_at_swap
                nbytes += max(0, written - self._bytes_at_swap)
                began += [self._began[self.current]] if self.current in self._began else []
        return ios, nbytes, min(began, default=None)

    def _held_for_current(self) -> bool:
        """Held only for what the segment in use holds (a swap lets it drain)?"""
        return (self._held and self.dev.behind_limit(*self._backlog(current=True))
                and not self.dev.behind_limit(*self._backlog(current=False)))

    def _set_held(self, hold: bool) -> None:
        with self.lock:
            if hold == self._held or self.guardian is None:
                return
            if hold:
                if self.paused():   # (suspended by its admin already)
                    return
                if time.monotonic() < self._hold_retry_at:
                    return   # (it failed a moment ago: not tried, nor logged, each look)
                try:
                    self.guardian.hold(self.name)   # first: a daemon dying right after
                    _kernel.suspend_mapper(self.name, skip_lockfs=True)  # must not
                except OSError as e:                # leave it suspended
                    with contextlib.suppress(OSError):
                        self.guardian.free(self.name)
                    self._hold_retry_at = time.monotonic() + HOLD_RETRY
                    log.error("%s: cannot hold its writes for a site link past its "
                              "fall-behind limit (tried again in %gs): %s", self.name,
                              HOLD_RETRY, e)
                    self.on_event("error", "kernel-journal-hold-failed", error=str(e))
                    return
                self._held = True
                self.stats.holds += 1
            else:
                if not self.paused():
                    _kernel.resume_mapper(self.name)
                self._held = False
                self.guardian.free(self.name)
        if hold:
            log.warning("%s: a remote site link is past its fall-behind limit: the "
                        "device's writes wait", self.name)
            self.on_event("warning", "kernel-journal-held",
                          reason="a remote site link is past its fall-behind limit")
        else:
            log.info("%s: its writes go on (no remote site link past its fall-behind "
                     "limit)", self.name)
            self.on_event("change", "kernel-journal-released")

    def admin_suspend_locked(self) -> None:
        """The admin suspends the device (and the filesystem on it), with
        :attr:`lock` held: a hold ends in the admin's suspend, which the guardian
        does not undo."""
        _kernel.suspend_mapper(self.name)
        if self._held and self.guardian is not None:
            self.guardian.free(self.name)

    def admin_resume_locked(self) -> None:
        """The admin resumes the device, with :attr:`lock` held: held (a site
        link past its limit), it stays suspended until the link is under it."""
        if self._held and self.guardian is not None:
            self.guardian.hold(self.name)
        else:
            _kernel.resume_mapper(self.name)

    def close(self, *, keep: bool) -> None:
        """After /dev/mapper/NAME is removed (its target logged what it held):
        drain every segment, then detach them (``keep``: the files stay, a clean
        state for the next start; else they are deleted)."""
        self.stop()
        self._untell_guardian()
        if not self._replaced and not _kernel.mapper_exists(self.name):
            try:
                self.pending.append(self.current)
                self._drain_pending()
                self._flag("active", False)
            except Exception as e:   # the files stay "active": the next start resyncs
                log.error("%s: draining the kernel journal at close failed: %s", self.name, e)
        for i in range(SEGMENTS):
            _kernel.detach_file_loop(self._segment(i), delete=not keep)
        if self.record is not None:
            if _kernel.mapper_open_count(self.record.dm_name):   # (NAME over it)
                log.error("%s: its era device %s is still open: it stays", self.name,
                          self.record.dm_name)
            else:
                self.record.close(keep=keep)
        if not keep:
            for suffix in ("journal", "active", "resync"):
                self._flag(suffix, False)

    # -- draining -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._drain_pending()
            while not self._stop.wait(HELD_POLL if self._held else self.interval):
                if self._written() and (not self._held or self._held_for_current()):
                    self.swap()
                    self._hold_if_behind()   # (what the swap took out counts)
                    self._drain_pending()
                self._hold_if_behind()
                self._check_resynced()
        except Exception as e:   # this device's journal stops; the daemon serves on
            self.error = str(e)
            log.error("%s: the kernel journal stopped: %s", self.name, e)
            self.on_event("error", "kernel-journal-stopped", error=str(e))

    def _written(self) -> bool:
        """Was the device written (or flushed) since the last swap?  (A swap left
        out, the device paused or no segment free, is tried again.)"""
        writes = _kernel.mapper_writes(self.name)
        # (unknown: as written, a swap more; never "nothing to drain" by mistake)
        return writes < 0 or writes != self._writes_at_swap

    def swap(self) -> None:
        """Journal to a free segment from now on; the one before joins those to
        drain (its target logged all it held when the swap replaced it)."""
        with self.lock:
            if self.paused():
                return
            busy = {self.current, *self.pending}
            free = [i for i in range(SEGMENTS) if i not in busy]
            if not free:
                return
            nxt = free[0]
            # (read before: a write completing meanwhile is in the old segment, and
            # counts as new: one swap more, never one write missed)
            writes, nbytes = _kernel.mapper_write_stat(self.name)
            guardian = self._guard_swap()
            try:
                status = _kernel.swap_logwrites(self.name, self.sectors, self._under,
                                                self._loops[nxt])
            finally:
                if guardian is not None:
                    guardian.free(self.name)
            if self._held:   # (the swap resumed it: the writes queued went through)
                _kernel.suspend_mapper(self.name, skip_lockfs=True)
            self._writes_at_swap, self._bytes_at_swap = writes, nbytes
            old = self.current
            self.pending.append(old)
            self.current = nxt
            self._began[nxt] = time.monotonic()
            self._left[old] = self._segment_size(old, status)
            # the new segment's era: the one current at the swap (what it logs was
            # written in that era or a later one)
            self.eras[nxt] = self._checkpoint(since=self.eras.get(old, 0))
            self._save_order()
            self.stats.swaps += 1
        # (a segment that filled up, before the swap or as its target went, lacks
        # its end mark: its drain resynchronises it, once; the status read while
        # suspended would tell only the first)

    def _guard_swap(self) -> Guardian | None:
        """Tell the guardian before a swap suspends the device (unless a hold
        already did): a daemon killed in the middle of it must not leave the
        writers waiting for the next start.  Its resume completes the swap (the
        next start finds the kernel on the new segment).  Returns the guardian
        told, None if none was (no guardian, a hold told it already, or it cannot
        be told: the swap goes on unguarded)."""
        guardian = self.guardian
        if guardian is None or self._held or time.monotonic() < self._hold_retry_at:
            return None
        try:
            guardian.hold(self.name)
        except OSError as e:   # (tried again with the holds', not at every swap)
            self._hold_retry_at = time.monotonic() + HOLD_RETRY
            log.warning("%s: a segment swap without the guardian: %s", self.name, e)
            return None
        return guardian

    def _segment_size(self, i: int, status: Any) -> list[int]:
        """[writes, bytes] a segment just swapped out holds (its super's entry
        count; its bytes as the kernel allocated them)."""
        try:
            with open(self._segment(i), "rb") as f:
                sup = lw.parse_super(f.read(lw.LOG_WRITE_SUPER.sizeof()))
        except (OSError, lw.LogFormatError):   # (its drain says what is wrong)
            sup = None
        entries = sup.nr_entries if sup is not None else 0
        used = status.highest_sector * 512 if status is not None else 0
        return [entries, max(used, entries * 512)]

    def _checkpoint(self, since: int) -> int:
        """A new era; returns the one current before it (``since`` if the era
        device does not answer: an older era, so more to resync, never less)."""
        if self.record is None:
            return since
        try:
            return self.record.checkpoint()
        except _kernel.KernelDeviceError as e:
            log.warning("%s: era checkpoint: %s", self.name, e)
            return since

    def _drain_pending(self) -> None:
        while self.pending:
            i = self.pending[0]
            self._drain(i)
            self.pending.popleft()
            self._left.pop(i, None)
            self._empty(i)
            with self.lock:
                self._save_order()

    def _drain(self, i: int) -> None:
        """Append segment ``i``'s writes, in order, to the replication log (a flush
        in the journal: a flush of the log)."""
        path = self._segment(i)
        fd = os.open(path, os.O_RDONLY)
        # The kernel acknowledged these writes long ago: the log is committed
        # where the journal has a flush and before the segment is let go, not at
        # every batch.  Each commit is an epoch, what a remote site link waits
        # on (every copy of one answered before the next one's first is sent):
        # the copiers commit what is written as they look for work, so epochs
        # grow with the copiers' lag, where a commit per batch cost a site round
        # trip per BATCH_OPS writes.
        backend = self.dev.journal(cached=True)
        write_many = getattr(backend, "write_many", None)
        ops: list[WriteOp] = []
        nbytes = 0

        def push() -> None:
            nonlocal ops, nbytes
            taken = write_many(ops) if ops and write_many is not None else []
            if len(taken) < len(ops):
                # (the rest waits for room below, which the copiers make only
                # from committed entries: committed now, not when a copier
                # next looks for work)
                backend.flush()
            left = self._left.get(i)
            if left is not None:
                left[0] -= len(ops)
                left[1] -= nbytes
            if ops:   # (before waiting: past the limit, the waits are long)
                self._hold_if_behind()
            if not self._stop.is_set():
                # (a site link past its limit holds the acknowledgements: the drain
                # keeps its pace; draining for a remove or a conversion does not
                # wait, the kernel acknowledged these writes long ago)
                for wait in taken:
                    if wait is not None:
                        wait()
            # what the log did not take (full, suspended): written one by one, waiting
            for op in ops[len(taken):]:
                write_op(backend, op)
            self.stats.entries += len(ops)
            self.stats.bytes += nbytes
            ops, nbytes = [], 0

        view: mmap.mmap | None = None

        def read(offset: int, length: int) -> bytes:
            return view[offset:offset + length] if view is not None else b""

        try:
            size = os.fstat(fd).st_size
            # mapped, not two preads an entry (their system calls were a fifth of
            # the drain's CPU); every slice is a copy, so nothing handed on refers
            # to the map, which the segment's emptying would turn into SIGBUS
            if size:
                view = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            sup = lw.parse_super(read(0, lw.LOG_WRITE_SUPER.sizeof()))
            device_bytes = self.sectors * 512
            ended = False   # the log ends with the end mark its target logs as it goes
            for n, entry in enumerate(lw.entries(read, size)):
                assert sup is not None     # (entries() yields none without it)
                if n % 256 == 255:
                    self._swap_if_filling()
                ended = bool(entry.flags & lw.FLAG_MARK)
                if ended:
                    continue
                offset = entry.sector * sup.sectorsize
                length = entry.nr_sectors * sup.sectorsize
                if offset + length > device_bytes:
                    raise lw.LogFormatError(f"an entry at {offset}+{length} is past the "
                                            f"device's end ({device_bytes})")
                if entry.flags & lw.FLAG_DISCARD:
                    ops.append((offset, None, length, False))
                elif entry.has_data:
                    ops.append((offset, read(entry.data_offset, length), length,
                                bool(entry.flags & lw.FLAG_FUA)))
                    nbytes += length
                if entry.flags & (lw.FLAG_FLUSH | lw.FLAG_FUA):
                    # An epoch ends here: what the log holds before a flush or a FUA
                    # write was durable on the device before anything after it was
                    # written (the only order the block layer promises; log-writes
                    # gives NAME a write cache, so writers that need an order say so),
                    # and the remote site links may apply one log commit's entries
                    # in any order (ringlog's epochs).
                    push()
                    backend.flush()
                elif len(ops) >= BATCH_OPS or nbytes >= BATCH_BYTES:
                    push()
            push()
            backend.flush()   # (before the segment is emptied)
            if not ended:
                # log-writes logs the writes it holds (those since the last flush)
                # and then its end mark as it is destroyed; a log that filled up
                # meanwhile stops short, its super block left as it was: whatever
                # it holds, writes are missing from it
                self._resync_since(i, f"segment {path} lacks its end mark (it filled up)")
        except lw.LogFormatError as e:
            self._resync_since(i, f"segment {path} unreadable: {e}")
        finally:
            if view is not None:
                view.close()
            os.close(fd)

    def _swap_if_filling(self) -> None:
        """Swap out the segment in use once what it holds may pass ``SWAP_FILL``:
        counted from the device's writes since the swap (log-writes logs a write
        at the next flush or as the target goes, not as it completes: its status
        does not count what it holds), each an entry block and its data."""
        writes, nbytes = _kernel.mapper_write_stat(self.name)
        if writes < 0 or self._writes_at_swap < 0:
            return
        held = (max(0, nbytes - self._bytes_at_swap)
                + max(0, writes - self._writes_at_swap) * lw.MAX_SECTORSIZE)
        if held > SWAP_FILL * self.segment_bytes:
            self.swap()

    # -- lost writes ----------------------------------------------------------------

    def _resync_since(self, segment: int, why: str) -> None:
        """Segment ``segment`` lost writes: resynchronise the blocks written since
        it began (the whole device without an era record)."""
        lost: list[tuple[int, int]] | None = None
        if self.record is not None and segment in self.eras:
            try:
                lost = self.record.written_since(self.eras[segment])
            except (era_fmt.EraFormatError, OSError) as e:
                log.warning("%s: the era record is unreadable (%s)", self.name, e)
        self._resync(lost, why)

    def _resync(self, lost: list[tuple[int, int]] | None, why: str) -> None:
        """Mark ``lost`` ((offset, length) in bytes; None: the whole device) out
        of sync on the remote site links, after saving it in ``NAME.resync`` (with
        what was saved there before) until they are in sync again."""
        if lost == []:
            log.info("%s: %s: its era record says nothing was written since", self.name, why)
            return
        under_way, saved = self._saved_resync()
        if under_way:
            self._save_resync(None if lost is None or saved is None else [*saved, *lost])
        else:
            self._save_resync(lost)
        if lost is None:
            self.dev.lost_writes()
        else:
            for offset, length in lost:
                self.dev.lost_writes(offset, length)
        nbytes = self.sectors * 512 if lost is None else sum(n for _, n in lost)
        self.stats.resyncs += 1
        self.stats.resync_bytes += nbytes
        what = "the whole device" if lost is None else f"{nbytes} bytes in {len(lost)} ranges"
        log.warning("%s: %s: the remote site links resynchronise %s", self.name, why, what)
        self.on_event("warning", "kernel-journal-resync", reason=why, bytes=nbytes)

    def _saved_resync(self) -> tuple[bool, list[tuple[int, int]] | None]:
        """Whether ``NAME.resync`` says a resync is under way, and of what: the
        ranges, or None for the whole device."""
        try:
            with open(self._path("resync")) as f:
                text = f.read()
        except FileNotFoundError:
            return False, None
        try:
            ranges = json.loads(text)["ranges"]
            return True, [(int(o), int(n)) for o, n in ranges]
        except (ValueError, KeyError, TypeError):
            return True, None   # (empty: written before ranges were; or damaged)

    def _save_resync(self, lost: list[tuple[int, int]] | None) -> None:
        tmp = self._path("resync.tmp")
        with open(tmp, "w") as f:
            json.dump({"ranges": lost} if lost is not None else {"all": True}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path("resync"))

    def _resync_saved(self) -> None:
        """Mark again what ``NAME.resync`` says a restart interrupted."""
        under_way, saved = self._saved_resync()
        if not under_way:
            return
        if saved is None:
            self.dev.lost_writes()
        else:
            for offset, length in saved:
                self.dev.lost_writes(offset, length)
        log.info("%s: the remote site links go on resynchronising what the kernel "
                 "journal lost", self.name)

    def _check_resynced(self) -> None:
        if os.path.exists(self._path("resync")) and self.dev.remote_in_sync():
            self._flag("resync", False)

    def describe(self) -> dict[str, Any]:
        """The journal's state; ``drained``: every write the device took so far
        is in the replication log (nothing written since the last swap, nothing
        left to drain)."""
        with self.lock:
            drained = not self.pending and not self.error and not self._written()
            return {"segments": SEGMENTS, "segment_bytes": self.segment_bytes,
                    "current": self.current, "to_drain": len(self.pending),
                    "drained": drained, "swaps": self.stats.swaps,
                    "writes_held": self._held, "holds": self.stats.holds,
                    "resyncs": self.stats.resyncs,
                    "resync_bytes": self.stats.resync_bytes, "error": self.error,
                    "era_record": self.record is not None}
