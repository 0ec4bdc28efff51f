"""The replicator engine's tuning knobs: names, types, bounds and meaning.

``dmrepl daemon --tuning KEY=VALUE`` passes them to
:class:`~dmrepl.replicator.Replicator` (keyword arguments that override fields of
the frozen :class:`Tuning`, declared here once); :func:`parse_tuning` turns the strings into
typed values or raises :class:`~dmrepl.errors.UserError` naming the bad one (an
unknown key, a fraction for a count, a value out of range), before any engine
exists.  Outside the replicator package so that the CLI can list the keys
without importing the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from dmrepl.errors import UserError
from dmrepl.numbers import parse_decimal, parse_int


@dataclass(frozen=True)
class Tunable:
    kind: type  # int, float or bool
    minimum: float
    maximum: float | None
    meaning: str
    default: Any = None


def _knob(default: Any, minimum: float, maximum: float | None, meaning: str) -> Any:
    return field(default=default,
                 metadata={"minimum": minimum, "maximum": maximum, "meaning": meaning})


@dataclass(frozen=True)
class Tuning:
    """The engine's knobs with their defaults, bounds and meaning (the one
    declaration: :data:`TUNABLES` and the engine's keyword arguments follow it)."""

    kernel_journal: bool = _knob(True, 0, 1, "1 (default): the daemon presents a one-line "
                                 "device whose remote site links are all async (no "
                                 "fall-behind limit), alone on its replicator, as a dm "
                                 "log-writes target that the kernel journals and the daemon "
                                 "drains, over a dm era target that records where it wrote "
                                 "(README: the kernel journal); 0: as a mirror whose journal "
                                 "leg the daemon serves")
    remote_leg: bool = _knob(True, 0, 1, "1 (default): the daemon presents a one-line "
                             "device whose replicator's only remote site link is sync (no "
                             "fall-behind limit) and whose remote is an NBD export as a dm "
                             "raid1 of the local device and the remote export, attached by "
                             "the kernel (README: the remote leg); 0: as a mirror whose "
                             "journal leg the daemon serves")
    remote_timeout: int = _knob(10, 1, None, "seconds the kernel waits for the remote leg of "
                                "a raid1 to answer a request before md fails the leg and "
                                "goes on with the local device (README: the remote leg)")
    journal_segment_mib: int = _knob(256, 4, None, "MiB of each of a kernel journal's "
                                     "three segments (files in the state directory)")
    journal_interval: float = _knob(0.5, 0.01, None, "seconds between swaps of a written "
                                    "kernel journal's segment")
    durable_acks: bool = _knob(True, 0, 1, "1: a write is acknowledged once durable in the "
                               "log (default); 0: once written to it, like a disk with a "
                               "volatile write cache (flush and FUA make writes durable)")
    retry_interval: float = _knob(15.0, 0.001, None, "seconds between retries of a failed "
                                  "site link")
    persist_interval: float = _knob(0.5, 0.001, None, "seconds between writes of the "
                                    "copy positions to the ring header")
    full_grace: float = _knob(1.0, 0, None, "seconds a full ring waits for a lagging "
                              "async site link before dropping its entries")
    cache_bytes: int = _knob(128 << 20, 0, None, "bytes of logged data kept in memory for "
                             "the copiers and reads")
    batch_bytes: int = _knob(16 << 20, 512, None, "bytes a copier takes per batch at most")
    batch_entries: int = _knob(512, 1, None, "entries a copier takes per batch at most")
    window_entries: int = _knob(8192, 1, None, "copies between two persisted positions at "
                                "most")
    resync_chunk: int = _knob(1 << 20, 512, None, "bytes per resync read/write")
    copier_nice: int = _knob(0, 0, 19, "nice increment of the copier threads")
    copy_inflight: int = _knob(32, 1, 1024, "copies of one epoch in flight per site link "
                               "(remote sites)")
    # An async copier that just copied a small batch pauses this long before it
    # looks again, so that the next batch carries more entries: waking both
    # copiers for every logged write cost more CPU (and GIL hand-offs to the
    # writer) than the copies themselves (4 KiB durable writes: 1244 IOPS with
    # the copiers running, 2461 without).  Never while a write waits for the site
    # link (sync, forced sync), nor when the ring needs space; close ends it.
    coalesce_delay: float = _knob(0.002, 0, 1, "seconds an async copier that caught up "
                                  "pauses before its next batch (0: never)")
    coalesce_entries: int = _knob(32, 0, None, "a batch of at least this many entries is "
                                  "followed by no pause")


TUNABLES: dict[str, Tunable] = {
    f.name: Tunable(type(f.default), f.metadata["minimum"], f.metadata["maximum"],
                    f.metadata["meaning"], f.default)
    for f in fields(Tuning)
}


def _convert(key: str, raw: str, t: Tunable) -> Any:
    what = f"tuning {key}"
    if t.kind is float:
        return parse_decimal(raw, what, lo=t.minimum, hi=t.maximum)
    number = parse_int(raw, what, lo=int(t.minimum),
                       hi=None if t.maximum is None else int(t.maximum))
    return bool(number) if t.kind is bool else number


def parse_tuning(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to engine keyword arguments; UserError on a bad one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"tuning wants KEY=VALUE, not {item!r}")
        t = TUNABLES.get(key)
        if t is None:
            raise UserError(f"unknown tuning key {key!r}; known: {', '.join(sorted(TUNABLES))}")
        out[key] = _convert(key, raw.strip(), t)
    return out


def _shown(value: Any) -> str:
    return str(int(value)) if isinstance(value, bool) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def describe() -> str:
    """The knobs for ``dmrepl daemon --help``: name, default, bounds, meaning."""
    lines = []
    for k, t in TUNABLES.items():
        top = "" if t.maximum is None else _shown(t.kind(t.maximum))
        lines.append(f"  {k}={_shown(t.default)} ({_shown(t.kind(t.minimum))}..{top}): "
                     f"{t.meaning}")
    return "\n".join(lines)
