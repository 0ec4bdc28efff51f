"""Replicated devices (``replicator-dev`` targets) and their legs.

A device has one leg per site link it is replicated to (site link 0: the local
device); its I/O goes through the replicator's replication log (``rep.replog``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmrepl.errors import UserError
from dmrepl.replicator._state import DeviceEvent, DeviceState, machine
from dmrepl.replicator.errors import LocalIOError, ReplicatorClosed, TableError
from dmrepl.replicator.store import BlockStore
from dmrepl.replicator.table import DeviceConfig, LegConfig

if TYPE_CHECKING:
    from dmrepl.blockio import AckWait, WriteOp
    from dmrepl.replicator.slink import SlinkType
    from dmrepl.replicator.target import Replicator

SECTOR = 512


@dataclass(eq=False)
class Leg:
    """A device on one site link (local: slink 0)."""

    slink_nr: int
    cfg: LegConfig
    store: BlockStore
    ops: SlinkType  # its site link's type: it opened the leg and closes it
    dlog: Any = None  # dmrepl.dirtylog.DirtyLog for remote legs
    error: str = ""  # "", "R", "W" or "RW"
    lock: threading.Lock = field(default_factory=threading.Lock)
    cursor: int = 0  # resync scan position
    resynced: int = 0  # regions copied by resync
    resync_decile: int = -1  # in-sync tenths last reported as resync-progress

    def out_of_sync(self) -> int:
        if self.dlog is None:
            return 0
        with self.lock:
            return int(self.dlog.region_count - self.dlog.get_sync_count())


def open_legs(rep: Replicator, dev_nr: int, cfgs: Sequence[LegConfig], length: int | None,
              existing: Sequence[Leg]) -> dict[int, Leg]:
    """Validate legs against the replicator and open them (all or none)."""
    paths: dict[str, tuple[int, int]] = {}
    with rep.lock:
        region = region_size_locked(rep)
        for d in rep.devices.values():
            for leg in d.legs.values():
                paths[os.path.realpath(leg.cfg.dev_path)] = (d.dev_nr, leg.slink_nr)
    for leg in existing:
        paths[os.path.realpath(leg.cfg.dev_path)] = (dev_nr, leg.slink_nr)
    for c in cfgs:
        if c.slink_nr not in rep.slinks:
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
    ops = {c.slink_nr: rep.slinks[c.slink_nr].ops for c in cfgs}
    legs: dict[int, Leg] = {}
    try:
        # every device is opened (by its site link's type) and checked, then every
        # dirty log opened, before any dirty log is resumed (writes): a refused leg
        # leaves nothing behind
        for c in cfgs:
            legs[c.slink_nr] = ops[c.slink_nr].open_leg(dev_nr, c)
        check_leg_sizes(dev_nr, legs, length, existing)
        for leg in legs.values():
            if leg.slink_nr:
                sectors = length if length is not None else legs[0].store.size // SECTOR
                leg.ops.open_leg_log(leg, sectors)
        for leg in legs.values():
            if leg.dlog is not None:
                leg.dlog.resume()
    except BaseException:
        for leg in legs.values():
            close_leg(leg)
        raise
    return legs


def check_leg_sizes(dev_nr: int, legs: dict[int, Leg], length: int | None,
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


def region_size_locked(rep: Replicator) -> int | None:
    """The region size of the replicator's dirty logs (None: none has one yet)."""
    for d in rep.devices.values():
        for leg in d.legs.values():
            rs = leg.cfg.region_size()
            if rs is not None:
                return rs
    return None


def close_leg(leg: Leg) -> None:
    """Close a leg's device and dirty log (its type's device removal)."""
    leg.ops.close_leg(leg)


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
              fua: bool = False, *, journal: bool = False) -> None:
        """Write; returns when acknowledged (see the class docstring).
        ``journal``: logged for the remote site links only (:class:`JournalLeg`).

        Raises :class:`LocalIOError` (not acknowledged) or ReplogIOError."""
        payload = data if isinstance(data, bytes) else bytes(data)
        self._check(offset, len(payload))
        if payload:
            self.rep.replog.write(self, offset, payload, len(payload), fua, count=True,
                                  journal=journal)

    def write_many(self, ops: Sequence[WriteOp], *, journal: bool = False,
                   commit: bool = True) -> list[AckWait | None]:
        """Writes (``(offset, data or None for zeros, length, fua)``) logged as one
        batch without waiting: the outcomes of the ones taken, a prefix of ``ops``
        (None: acknowledged; else a function returning once acknowledged); the
        caller does the rest with :meth:`write`/:meth:`trim`, which wait (see
        :meth:`Ringbuffer.write_many
        <dmrepl.replicator.replog.ringbuffer.Ringbuffer.write_many>`).  A write
        this device refuses (unaligned, beyond its end; empty, or data not of its
        length: no log entry) ends the prefix.  ``commit=False``: durable only
        at the next :meth:`flush` (see the ring's ``write_many``)."""
        n = 0
        for offset, data, length, _fua in ops:
            if length <= 0 or (data is not None and len(data) != length):
                break
            try:
                self._check(offset, length)
            except UserError:     # the caller's write() of it raises it to the client
                break
            n += 1
        if not n:
            return []
        return self.rep.replog.write_many(self, ops[:n] if n < len(ops) else ops,
                                          journal=journal, commit=commit)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.rep.replog.read(self, offset, length)

    def flush(self) -> None:
        """Everything acknowledged before is durable (waits for writes in flight)."""
        self.rep.replog.flush()

    def trim(self, offset: int, length: int, *, journal: bool = False) -> None:
        """Discard = a replicated zero-write: reads return zeros, at every site
        (``journal``: at the remote sites only, see :class:`JournalLeg`)."""
        self._check(offset, length)
        if length:
            self.rep.replog.write(self, offset, None, length, journal=journal)

    def suspend(self) -> None:
        with self.rep.cond:
            self._fire_locked(DeviceEvent.SUSPEND)
            self.rep.bump_locked(f"device {self.dev_nr} suspended")

    def resume(self) -> None:
        with self.rep.cond:
            self._fire_locked(DeviceEvent.RESUME)
            self.rep.bump_locked(f"device {self.dev_nr} resumed")

    def _fire_locked(self, event: DeviceEvent) -> None:
        if self.closed:
            raise ReplicatorClosed(f"device {self.dev_nr} is removed")
        self.sm.fire(event)

    def local_device(self) -> str:
        return self.legs[0].cfg.dev_path

    def lost_writes(self, offset: int = 0, length: int | None = None) -> None:
        """Writes to [offset, offset+length) (default: the whole device) reached
        the local device but maybe not the log (a kernel journal lost them): their
        regions are marked out of sync on every remote site link, whose resync
        copies them from the local device.  Raises OSError if a dirty log cannot
        record them."""
        end = self.size_bytes if length is None else offset + length
        if end <= offset:
            return
        for nr, leg in self.legs.items():
            if nr == 0 or leg.dlog is None:
                continue
            rs = leg.dlog.region_size * SECTOR
            leg.ops.mark_out_of_sync(leg, range(offset // rs, (end - 1) // rs + 1))
        with self.rep.cond:
            self.rep.bump_locked(f"device {self.dev_nr}: writes at {offset}+{end - offset} "
                                 "marked out of sync on the remote site links")
            self.rep.cond.notify_all()

    def remote_in_sync(self) -> bool:
        """Every remote site link has every region of the device in sync."""
        return all(leg.out_of_sync() == 0 for nr, leg in self.legs.items() if nr)

    def behind_limit(self, ios: int = 0, nbytes: int = 0, since: float | None = None) -> bool:
        """Is a remote site link of the device (up) past its fall-behind limit,
        counting ``ios`` writes of ``nbytes`` not yet in the replication log (a
        kernel journal's), the oldest written at ``since`` (time.monotonic())?"""
        now = time.monotonic()
        with self.rep.lock:
            return any(self.rep.slinks[nr].up and self.rep.copiers.past_fallbehind_locked(
                self.rep.slinks[nr], now, ios, nbytes, since) for nr in self.legs if nr)

    def fallbehind_limited(self) -> bool:
        """Has a remote site link of the device a fall-behind limit?"""
        with self.rep.lock:
            return any(self.rep.slinks[nr].fallbehind_limited for nr in self.legs if nr)

    def journal(self, *, cached: bool = False) -> JournalLeg:
        """The device as the *journal leg* of a kernel mirror whose other leg is
        the local device: see :class:`JournalLeg`."""
        return JournalLeg(self, cached=cached)

    def message(self, argv: Sequence[str]) -> str:
        """replicator-dev messages: device add|del, start|resume, stop|suspend|postsuspend."""
        from dmrepl.replicator.messages import device_message
        return device_message(self, argv)

    def table(self) -> str:
        """TABLE status: the replicator-dev parameters."""
        with self.rep.lock:
            return self.cfg.params()

    def status(self, kind: str = "info") -> str:
        """``info``: ``<replicator> <dev_nr>`` then per site link ``<R|W|RW|A>,-`` (local)
        or ``<R|W|RW|A>,<in_sync>[+]/<regions>``; ``table``: as :meth:`table`."""
        from dmrepl.replicator.status import device_status
        return device_status(self, kind)

    def status_dict(self) -> dict[str, Any]:
        """Machine-readable state (see :func:`.status.device_status_dict`)."""
        from dmrepl.replicator.status import device_status_dict
        return device_status_dict(self)


class JournalLeg:
    """A replicated device seen as the second leg of a kernel ``mirror`` whose
    first leg is the local device (site link 0).

    The kernel writes the local device itself, in parallel; a write here is only
    logged for the remote site links (entries without site link 0) and returns
    when their policies acknowledge it.  Reads (the mirror reads this leg only if
    the local one fails, never for recovery) come from the local device, which
    the kernel keeps newest.

    ``cached``: a leg with a write cache: what :meth:`write_many` logs is
    durable at the next :meth:`flush` (the kernel journal's drainer, which
    flushes at the journal's flushes and before it lets a segment go).  A
    mirror's leg is not: the mirror marks a region clean once both legs
    answered."""

    def __init__(self, dev: ReplicatedDevice, *, cached: bool = False) -> None:
        self.dev = dev
        self.size_bytes = dev.size_bytes
        self.cached = cached

    def write(self, offset: int, data: bytes | bytearray | memoryview,
              fua: bool = False) -> None:
        self.dev.write(offset, data, fua, journal=True)

    def write_many(self, ops: Sequence[WriteOp]) -> list[AckWait | None]:
        """A batch of writes, logged for the remote site links (see
        :meth:`ReplicatedDevice.write_many`)."""
        return self.dev.write_many(ops, journal=True, commit=not self.cached)

    def read(self, offset: int, length: int) -> bytes:
        dev = self.dev
        dev._check(offset, length)
        try:
            return dev.legs[0].store.pread(offset, length)
        except OSError as err:
            raise LocalIOError(f"device {dev.dev_nr}: read failed: {err}") from err

    def flush(self) -> None:
        self.dev.flush()

    def trim(self, offset: int, length: int) -> None:
        self.dev.trim(offset, length, journal=True)
