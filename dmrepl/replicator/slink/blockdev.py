"""The ``blockdev`` site-link type: copies written to block devices (local files,
block devices, NBD exports), out-of-sync regions in their dirty logs."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, cast

from dmrepl.errors import UserError
from dmrepl.replicator.device import Leg
from dmrepl.replicator.errors import TableError
from dmrepl.replicator.replog.ringbuffer import MAX_ENTRY
from dmrepl.replicator.ringlog import Entry
from dmrepl.replicator.slink.link import Copy, Failure, Slink, slink_settings, status_word
from dmrepl.replicator.store import BlockStore
from dmrepl.replicator.table import LegConfig, SlinkConfig

if TYPE_CHECKING:
    from dmrepl.replicator.device import ReplicatedDevice
    from dmrepl.replicator.target import Replicator

SECTOR = 512

#: A store's ``start_writes`` (an NBD site's): sends writes at once (with FUA or
#: not), returns the wait of each.
StartWrites = Callable[[Sequence[tuple[int, bytes]], bool], list[Callable[[], None]]]


class Blockdev:
    """The operations of the ``blockdev`` type (one object per replicator)."""

    def __init__(self, rep: Replicator) -> None:
        self.rep = rep

    # -- devices ------------------------------------------------------------------------

    def open_leg(self, dev_nr: int, cfg: LegConfig) -> Leg:
        """Open the block device (the replicator's opener: a path or an NBD URL)."""
        try:
            store = self.rep.opener(cfg.dev_path)
        except OSError as e:
            raise TableError(f"cannot open device {cfg.dev_path} (site link "
                             f"{cfg.slink_nr}): {e.strerror or e}") from e
        return Leg(cfg.slink_nr, cfg, store, self)

    def open_leg_log(self, leg: Leg, sectors: int) -> None:
        from dmrepl.dirtylog import open_dirty_log
        try:
            leg.dlog = open_dirty_log(leg.cfg.dlog_type, leg.cfg.dlog_args, sectors)
        except UserError as e:
            raise TableError(f"dirty log of {leg.cfg.dev_path} (site link "
                             f"{leg.slink_nr}): {e}") from e

    def close_leg(self, leg: Leg) -> None:
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

    # -- message and status -------------------------------------------------------------

    def message(self, s: Slink, words: Sequence[str]) -> SlinkConfig:
        """``policy``, ``fallbehind`` and ``resync_rate`` settings (see
        :func:`.link.slink_settings`)."""
        return slink_settings(s.cfg, words)

    def status(self, s: Slink) -> str:
        return status_word(s)

    # -- copies -------------------------------------------------------------------------

    def writes_durably(self, leg: Leg) -> bool:
        """An NBD site whose server takes FUA writes: a copy a writer waits for
        (sync) goes with FUA, instead of one more round trip to flush after it."""
        return bool(getattr(leg.store, "fua", False))

    def apply_epoch(self, s: Slink, group: list[Copy], durable: bool = False
                    ) -> tuple[set[int], Failure | None]:
        """Write the copies of one epoch; returns the sequence numbers written and
        the first failure (None: all written); ``durable``: as FUA writes.

        Copies to stores that take several writes at once (``concurrent_writes``:
        the NBD client of a remote site) are in flight together, up to
        ``copy_inflight`` at once (sent from this thread by a store that can,
        else through the site link's I/O threads), and all of them are waited for
        (the epoch barrier); no more are sent after a failure.  The others (files, local
        block devices through the page cache) are written inline, one after the
        other, stopping at a failure: there a thread per write costs more CPU and
        GIL hand-offs than it overlaps (measured: it slowed 4 KiB and 1 MiB copies
        to local files)."""
        done: set[int] = set()
        failure: Failure | None = None
        conc: list[tuple[Entry, Leg]] = []
        inline: list[tuple[Entry, Leg]] = []
        copy_inflight = self.rep.tuning.copy_inflight
        last_leg = None
        concurrent = False
        for e, leg, _ep in group:
            if leg is None:
                continue
            if leg is not last_leg:   # (an epoch's copies are mostly to one leg)
                last_leg = leg
                concurrent = (copy_inflight > 1
                              and getattr(leg.store, "concurrent_writes", False))
            if concurrent:
                conc.append((e, leg))
            else:
                inline.append((e, leg))
        if len(conc) == 1:
            inline, conc = conc + inline, []
        if conc:
            failure = self._apply_concurrently(s, conc, done, durable)
        for e, leg in inline if failure is None else ():
            try:
                self._copy_one(e, leg, durable)
            except OSError as err:
                failure = (e, leg, err)
                break
            done.add(e.seq)
        return done, failure

    def _apply_concurrently(self, s: Slink, todo: list[tuple[Entry, Leg]],
                            done: set[int], durable: bool) -> Failure | None:
        senders = [getattr(leg.store, "start_writes", None) for _e, leg in todo]
        if all(senders):   # (no I/O thread, no pool)
            return self._send_in_windows(s, todo, cast(list[StartWrites], senders), done,
                                         durable)
        copy_inflight = self.rep.tuning.copy_inflight
        pool = s.pool
        if pool is None:
            pool = s.pool = ThreadPoolExecutor(max_workers=copy_inflight,
                                               thread_name_prefix=f"repl-slink{s.nr}-io",
                                               initializer=self.rep.copiers.set_nice)
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
            if len(inflight) >= copy_inflight:
                reap()
                if failure is not None:
                    break
            inflight.append((e, leg, pool.submit(self._copy_one, e, leg, durable)))
            most = max(most, len(inflight))
        while inflight:
            reap()
        with self.rep.cond:
            s.inflight_max = max(s.inflight_max, most)
        return failure

    def _send_in_windows(self, s: Slink, todo: list[tuple[Entry, Leg]],
                         senders: list[StartWrites], done: set[int],
                         durable: bool) -> Failure | None:
        """The epoch's copies to stores that send several writes with one call (an
        NBD site): a sliding window of ``copy_inflight`` copies in flight.  They
        go in halves of the window, each half's writes to one store with one
        system call; the next half leaves as soon as the oldest replies make room
        for it, so the site always has copies to work on while their replies
        travel back (stop-and-wait per window cost a round trip per window: a
        remote 10 ms away took at most 100 windows a second).  None is sent after
        a failure."""
        window = self.rep.tuning.copy_inflight
        half = max(1, window // 2)
        failure: Failure | None = None
        inflight: deque[tuple[Entry, Leg, Callable[[], None]]] = deque()
        most = 0

        def reap() -> None:
            nonlocal failure
            e, leg, wait = inflight.popleft()
            try:
                wait()
            except OSError as err:
                if failure is None or e.seq < failure[0].seq:
                    failure = (e, leg, err)
                return
            done.add(e.seq)

        for i in range(0, len(todo), half):
            part = todo[i:i + half]
            while inflight and len(inflight) + len(part) > window:
                reap()
            if failure is not None:
                break
            by_store: dict[int, tuple[StartWrites, list[tuple[Entry, Leg]]]] = {}
            for (e, leg), send in zip(part, senders[i:i + half], strict=True):
                by_store.setdefault(id(leg.store), (send, []))[1].append((e, leg))
            for send, copies in by_store.values():
                try:
                    waits = send([(e.offset, self._copy_data(e)) for e, _leg in copies],
                                 durable)
                except OSError as err:
                    failure = (copies[0][0], copies[0][1], err)
                    break
                inflight.extend((e, leg, w) for (e, leg), w in zip(copies, waits, strict=True))
            most = max(most, len(inflight))
            if failure is not None:
                break
        while inflight:
            reap()
        with self.rep.cond:
            s.inflight_max = max(s.inflight_max, most)
        return failure

    def _copy_one(self, e: Entry, leg: Leg, durable: bool = False) -> None:
        data = e.data
        if data is not None and not durable:   # (most copies: the data cached)
            leg.store.pwrite(e.offset, data)
        elif durable:
            leg.store.pwritev_durable(e.offset, [self._copy_data(e)])
        elif e.zero:
            _write_zeros(leg.store, e.offset, e.length)
        else:
            leg.store.pwrite(e.offset, self.rep.ring.entry_data(e))

    def _copy_data(self, e: Entry) -> bytes:
        """What a copy of the entry writes (a zero-write: its zeros)."""
        return bytes(e.length) if e.zero else self.rep.ring.entry_data(e)

    def flush(self, leg: Leg) -> None:
        leg.store.flush()

    def probe(self, leg: Leg) -> None:
        leg.store.pread(0, SECTOR)

    def mark_out_of_sync(self, leg: Leg, regions: Iterable[int]) -> None:
        with leg.lock:
            for r in regions:
                leg.dlog.mark_region(r)
                leg.dlog.set_region_sync(r, False)
            leg.dlog.flush()

    def resync_region(self, s: Slink, dev: ReplicatedDevice, leg: Leg, region: int) -> bool:
        """Copy one region from the local device, flush, mark it in sync."""
        rep = self.rep
        rs = leg.dlog.region_size * SECTOR
        lo, hi = region * rs, min((region + 1) * rs, dev.size_bytes)
        local = dev.legs[0]
        pos = lo
        while pos < hi:
            n = min(rep.tuning.resync_chunk, hi - pos)
            try:
                data = local.store.pread(pos, n)
            except OSError as err:
                with rep.cond:
                    rep.copiers.leg_failed_locked(rep.slinks[0], local, "R", err)
                return False
            try:
                leg.store.pwrite(pos, data)
            except OSError as err:
                with rep.cond:
                    rep.copiers.leg_failed_locked(s, leg, "W", err)
                return False
            pos += n
        try:
            leg.store.flush()
        except OSError as err:
            with rep.cond:
                rep.copiers.leg_failed_locked(s, leg, "W", err)
            return False
        with leg.lock:
            leg.dlog.set_region_sync(region, True)
            leg.dlog.clear_region(region)
            leg.dlog.flush()
            leg.cursor = region + 1
            leg.resynced += 1
        return True


def _write_zeros(store: BlockStore, offset: int, length: int) -> None:
    # one write per entry (entries are at most MAX_ENTRY): a zero-write reaches the
    # device whole, like any other entry
    zero = bytes(min(length, MAX_ENTRY))
    pos = 0
    while pos < length:
        n = min(len(zero), length - pos)
        store.pwrite(offset + pos, zero[:n] if n < len(zero) else zero)
        pos += n


if TYPE_CHECKING:
    from dmrepl.replicator.slink import SlinkType

    _conforms: type[SlinkType] = Blockdev  # mypy: the type implements the interface
