"""A site link's state: positions, lag, its three state machines, its copy window."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from dmrepl.replicator._state import (
    AckState,
    LinkState,
    ResyncState,
    StateMachine,
    machine,
)
from dmrepl.replicator.errors import MessageError, TableError
from dmrepl.replicator.ringlog import Entry
from dmrepl.replicator.table import (
    SlinkConfig,
    format_rate,
    parse_fallbehind,
    parse_policy,
    parse_rate,
)

if TYPE_CHECKING:
    from dmrepl.replicator.device import Leg
    from dmrepl.replicator.slink import SlinkType

Copy = tuple[Entry, "Leg | None", int]  # an entry, its leg (None: skip), its epoch end
Failure = tuple[Entry, "Leg", OSError]  # a copy that failed


@dataclass(eq=False)
class RateMeter:
    """A rate (units per second) measured from a growing counter: each update
    after at least ``min_interval`` seconds folds the interval's rate into an
    exponentially weighted average with a half-life of ``halflife`` seconds.
    ``rate`` is None until a first interval was measured (no rate: no ETA)."""

    halflife: float = 5.0
    min_interval: float = 0.5
    rate: float | None = None
    _since: float | None = None
    _count: int = 0

    def restart(self, count: int, now: float) -> None:
        """Measure afresh from ``count`` at ``now`` (a new resync)."""
        self.rate, self._since, self._count = None, now, count

    def update(self, count: int, now: float) -> None:
        if self._since is None:
            self.restart(count, now)
            return
        dt = now - self._since
        if dt < self.min_interval:
            return
        sample = (count - self._count) / dt
        if self.rate is None:
            self.rate = sample
        else:
            self.rate += (1 - 0.5 ** (dt / self.halflife)) * (sample - self.rate)
        self._since, self._count = now, count


@dataclass
class Queued:
    """Writes of one device logged but not yet applied on one site link."""

    writes: int = 0
    bytes: int = 0
    # per region of the device's dirty log on the site link: the queued writes to
    # it (a region with any is not in sync there, whatever the dirty log says)
    regions: dict[int, int] = field(default_factory=dict)
    # the bytes of a region (0: the leg has no dirty log, no regions counted)
    region_bytes: int = 0

    def count(self, e: Entry, sign: int) -> None:
        self.writes += sign
        self.bytes += sign * e.length
        rb = self.region_bytes
        if rb and e.length:
            regions = self.regions
            for r in range(e.offset // rb, (e.end - 1) // rb + 1):
                n = regions.get(r, 0) + sign
                if n:
                    regions[r] = n
                else:
                    del regions[r]


@dataclass(eq=False)
class Slink:
    cfg: SlinkConfig
    applied: int
    durable: int
    persisted: int
    ops: SlinkType  # its type's operations
    error: str = ""
    next_retry: float = 0.0
    drop_requested: bool = False
    drops: int = 0
    closing: bool = False
    thread: threading.Thread | None = None
    # what it applied since its last persisted position (idempotent replay)
    window: CopyWindow = field(default_factory=lambda: CopyWindow())
    touched: set[int] = field(default_factory=set)
    out_ios: int = 0
    out_bytes: int = 0
    want_durable: int = 0
    # a job of this site link is running (its copier's, or a writer applying its
    # own writes: Copiers.apply_here): one at a time, as on one thread
    busy: bool = False
    # a writer copies the entries up to this itself (Copiers.apply_here), the
    # copier takes no batch nor flush meanwhile (0: none): else the log write
    # that wakes the copier hands it the writer's batch, and the writer's
    # acknowledgements then wait for the copier's thread
    claimed: int = 0
    # set whenever no writer holds a claim: the copier waits on it, not on the
    # replicator's condition, whose every notification (several per batch) would
    # wake it for nothing
    unclaimed: threading.Event = field(default_factory=threading.Event)
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
    # the resync's bytes per second, fed from resync_bytes by the copier (per region)
    # and by status reads (so a stalled resync's rate decays): never per write
    resync_meter: RateMeter = field(default_factory=lambda: RateMeter())
    # the position the ring header records at most (None: the real one): after a
    # ring-full drop whose out-of-sync marks are in a dirty log that a crash loses
    # (core), the header keeps the pre-drop position until the resync of this site
    # link is done, so that a reopen sees that it lost released entries
    header_floor: int | None = None
    # at open, the ring header's position (this) was below the head: entries it
    # never applied were released by a drop, so each of its devices goes whole out
    # of sync as it is added (and the header keeps this position until resynced)
    lost_to_drop: int | None = None
    # per device, what it has logged that this site link has not applied, kept as
    # entries are logged and applied (status reads it: a walk of the outstanding
    # entries under the replicator's lock stalled every writer for as long as the
    # backlog was long); None: not counted yet (status counts it once)
    queued: dict[int, Queued] | None = None

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

    @property
    def holds_ack(self) -> bool:
        """Do new writes wait for this site link (sync, or forced sync, and up)?"""
        return self.up and (self.cfg.sync or self.forced)

    @property
    def fallbehind_limited(self) -> bool:
        """Does a fall-behind limit apply (an async site link with one)?"""
        return not self.cfg.sync and self.cfg.fallbehind.enabled

    def close_locked(self) -> None:
        """Have its copier exit: wake it from any of its waits."""
        self.closing = True
        self.hurry.set()
        self.unclaimed.set()

    def count_queued_locked(self, e: Entry, sign: int) -> None:
        """Entry ``e`` joined (+1) or left (-1) this site link's queue."""
        queued = self.queued
        if queued is None:
            return
        q = queued.get(e.dev)
        if q is None:   # (a device counted since: its region size is not known here)
            self.queued = None
            return
        q.count(e, sign)


#: The block of a copy window's block sets: 4 KiB, what a file system or a
#: database writes most; and how many such blocks a write may cover to be kept
#: as blocks (beyond, as an interval: a big write would cost a set entry each).
WINDOW_BLOCK = 4096
WINDOW_BLOCKS_MAX = 16


class CopyWindow:
    """Ranges written, by device, with an overlap test: the copies a site link
    applied since its last persisted position (and a batch's own ranges).

    Writes of whole 4 KiB blocks, at most ``WINDOW_BLOCKS_MAX`` of them, are kept
    as a set of block numbers (a test and an insertion cost a set operation each:
    a sorted list's insertion moved the list, thousands of entries after a burst of
    random writes); any other write as an interval of a sorted list.  Exact: a block
    is in the set only when a write covered it whole."""

    __slots__ = ("_blocks", "_ranges", "n")

    def __init__(self) -> None:
        self._blocks: dict[int, set[int]] = {}
        self._ranges: dict[int, list[tuple[int, int]]] = {}
        self.n = 0   # writes added since the last clear

    def overlaps(self, dev: int, start: int, end: int) -> bool:
        """Does [start, end) of ``dev`` overlap a range added?"""
        blocks = self._blocks.get(dev)
        if blocks:
            first, last = start // WINDOW_BLOCK, (end - 1) // WINDOW_BLOCK
            if first == last:   # (most writes: one block)
                if first in blocks:
                    return True
            elif last - first < len(blocks):
                for b in range(first, last + 1):
                    if b in blocks:
                        return True
            else:     # (a write wider than the set: look at the set's blocks)
                for b in blocks:
                    if first <= b <= last:
                        return True
        ranges = self._ranges.get(dev)
        return bool(ranges) and overlaps(ranges, start, end)

    def add(self, dev: int, start: int, end: int) -> None:
        self.n += 1
        if (start % WINDOW_BLOCK == 0 and end % WINDOW_BLOCK == 0
                and end - start <= WINDOW_BLOCKS_MAX * WINDOW_BLOCK):
            blocks = self._blocks.get(dev)
            if blocks is None:
                blocks = self._blocks[dev] = set()
            if end - start == WINDOW_BLOCK:
                blocks.add(start // WINDOW_BLOCK)
            else:
                blocks.update(range(start // WINDOW_BLOCK, end // WINDOW_BLOCK))
            return
        bisect.insort(self._ranges.setdefault(dev, []), (start, end))

    def clear(self) -> None:
        self._blocks.clear()
        self._ranges.clear()
        self.n = 0


def overlaps(iv: list[tuple[int, int]] | None, start: int, end: int) -> bool:
    """Does [start, end) overlap an interval of ``iv`` (sorted, non-overlapping)?"""
    if not iv:
        return False
    i = bisect.bisect_left(iv, (start, start))
    if i < len(iv) and iv[i][0] < end:
        return True
    return i > 0 and iv[i - 1][1] > start


def status_word(s: Slink) -> str:
    """A site link's word of the replicator's INFO status:
    ``<slink>:<up|down>[:resync][:rate=<N>k|m|g]``."""
    return (f"{s.nr}:{'up' if s.up else 'down'}"
            + (":resync" if s.resyncing else "")
            + (f":rate={format_rate(s.cfg.resync_rate)}" if s.cfg.resync_rate else ""))


SLINK_MESSAGE_USAGE = ("usage: slink message <nr> <setting>... with settings policy "
                       "<policy>, fallbehind <type> <value> (or <type>=<value>), "
                       "resync_rate <N>[k|m|g]")


def slink_settings(cfg: SlinkConfig, words: Sequence[str]) -> SlinkConfig:
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
