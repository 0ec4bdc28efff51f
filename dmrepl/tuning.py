"""The replicator engine's tuning knobs: names, types, bounds and meaning.

``dmrepl daemon --tuning KEY=VALUE`` passes them to
:class:`~dmrepl.replicator.Replicator` (keyword arguments of the same names; a
unit test keeps the two lists equal); :func:`parse_tuning` turns the strings into
typed values or raises :class:`~dmrepl.errors.UserError` naming the bad one (an
unknown key, a fraction for a count, a value out of range), before any engine
exists.  Outside the replicator package so that the CLI can list the keys
without importing the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dmrepl.errors import UserError
from dmrepl.numbers import parse_decimal, parse_int


@dataclass(frozen=True)
class Tunable:
    kind: type  # int, float or bool
    minimum: float
    maximum: float | None
    meaning: str


TUNABLES: dict[str, Tunable] = {
    "durable_acks": Tunable(bool, 0, 1, "1: a write is acknowledged once durable in the "
                            "log (default); 0: once written to it, like a disk with a "
                            "volatile write cache (flush and FUA make writes durable)"),
    "retry_interval": Tunable(float, 0.001, None, "seconds between retries of a failed "
                              "site link"),
    "persist_interval": Tunable(float, 0.001, None, "seconds between writes of the "
                                "copy positions to the ring header"),
    "full_grace": Tunable(float, 0, None, "seconds a full ring waits for a lagging "
                          "async site link before dropping its entries"),
    "cache_bytes": Tunable(int, 0, None, "bytes of logged data kept in memory for the "
                           "copiers and reads"),
    "batch_bytes": Tunable(int, 512, None, "bytes a copier takes per batch at most"),
    "batch_entries": Tunable(int, 1, None, "entries a copier takes per batch at most"),
    "window_entries": Tunable(int, 1, None, "copies between two persisted positions at "
                              "most"),
    "resync_chunk": Tunable(int, 512, None, "bytes per resync read/write"),
    "copier_nice": Tunable(int, 0, 19, "nice increment of the copier threads"),
    "copy_inflight": Tunable(int, 1, 1024, "copies of one epoch in flight per site link "
                             "(remote sites)"),
    "coalesce_delay": Tunable(float, 0, 1, "seconds an async copier that caught up "
                              "pauses before its next batch (0: never)"),
    "coalesce_entries": Tunable(int, 0, None, "a batch of at least this many entries is "
                                "followed by no pause"),
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


def describe() -> str:
    """One line per knob (for ``--help``)."""
    return "\n".join(f"  {k}: {t.meaning}" for k, t in TUNABLES.items())
