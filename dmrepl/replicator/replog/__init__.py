"""Replication-log types: the interface the replicator and its devices use, and
the registry by name (as the seed's ``struct dm_repl_log_type`` ops).

``ringbuffer`` (:mod:`.ringbuffer`, its storage core
:mod:`dmrepl.replicator.ringlog`) is the one type there is; the table grammar
names it (``replicator ringbuffer <#p> ...``).  The pending-write index
(:mod:`.pending`) is the log's own small structure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dmrepl.replicator.device import ReplicatedDevice
    from dmrepl.replicator.replog.pending import PendingIndex
    from dmrepl.replicator.ringlog import Entry, RingLog
    from dmrepl.replicator.slink.link import Slink


class ReplogType(Protocol):
    """One open replication log (ctr: the factory; dtr: :meth:`close`)."""

    ring: RingLog
    pending: PendingIndex
    space_wanted: bool

    def close(self) -> None: ...

    def write(self, dev: ReplicatedDevice, offset: int, data: bytes | None, length: int,
              fua: bool = False, count: bool = False) -> None:
        """io (write): log it, return once acknowledged; ``data`` None: zeros."""

    def read(self, dev: ReplicatedDevice, offset: int, length: int) -> bytes:
        """io (read): the newest data of the device."""

    def flush(self) -> None:
        """Every write acknowledged before is durable."""

    def persist(self, positions: Callable[[], dict[int, int]]) -> dict[int, int]:
        """Record the site links' positions (slink add/del, copy progress)."""

    def pending_local_locked(self, dev_nr: int, lo: int, hi: int) -> list[Entry]: ...

    def pending_for_dev_locked(self, dev_nr: int) -> int: ...

    def oldest_ts_locked(self, s: Slink) -> float | None: ...

    def applied_locked(self, s: Slink, batch: list[Entry], done: int) -> None: ...


ReplogFactory = Callable[..., Any]  # (replicator, ReplogConfig, opener, cache_bytes=)

_TYPES: dict[str, ReplogFactory | str] = {
    "ringbuffer": "dmrepl.replicator.replog.ringbuffer:Ringbuffer",
}


def registered() -> list[str]:
    return list(_TYPES)


def factory(name: str) -> ReplogFactory:
    """The factory of a registered type (KeyError: none of that name)."""
    found = _TYPES[name]
    if isinstance(found, str):
        module, _, attr = found.partition(":")
        found = _TYPES[name] = getattr(importlib.import_module(module), attr)
    return found
