"""Replication-log types: the interface the replicator and its devices use, and
the registry by name (as the seed's ``struct dm_repl_log_type`` ops).

``ringbuffer`` (:mod:`.ringbuffer`, its storage core
:mod:`dmrepl.replicator.ringlog`) is the one type there is; the table grammar
names it (``replicator ringbuffer <#p> ...``).  The pending-write index
(:mod:`.pending`) is the log's own small structure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dmrepl.blockio import AckWait, WriteOp
from dmrepl.replicator._registry import Registry

if TYPE_CHECKING:
    from dmrepl.replicator.device import Leg, ReplicatedDevice
    from dmrepl.replicator.replog.pending import PendingIndex
    from dmrepl.replicator.ringlog import Entry, RingLog
    from dmrepl.replicator.slink.link import Slink


class ReplogType(Protocol):
    """One open replication log (ctr: the factory; dtr: :meth:`close`)."""

    ring: RingLog
    pending: PendingIndex
    space_wanted: bool

    def close(self) -> None: ...

    def slink_add_locked(self, s: Slink, *, fresh: bool) -> None:
        """A site link joins: set its positions (``fresh``: at the log's end) and lag.
        (One that leaves needs nothing of the log: the persist after its copier
        stopped writes the positions without it and releases what only it held.)"""

    def message(self, argv: Sequence[str]) -> str:
        """The log type's messages (``replog <argv>``); MessageError changing nothing."""

    def resize(self, sectors: int) -> None:
        """Resize the log; MessageError changing nothing if it cannot."""

    def status_locked(self) -> str:
        """The log's word of the INFO status."""

    def error_status_locked(self) -> str | None:
        """The log's error word of the INFO status (last on the line), or None."""

    def status_dict_locked(self) -> dict[str, Any]:
        """The log's part of the machine-readable status."""

    def mark_lost(self, dev_nr: int, legs: Iterable[Leg]) -> None:
        """Mark the regions of entries the replay lost out of sync on the remote legs
        of a device being added (TableError if a dirty log refuses)."""

    def lost_report(self) -> str | None:
        """The lost-writes error line until cleared (None: nothing lost)."""

    def clear_lost(self) -> dict[str, int]:
        """Clear the lost-writes report (the operator checked); returns it."""

    def write(self, dev: ReplicatedDevice, offset: int, data: bytes | None, length: int,
              fua: bool = False, count: bool = False, journal: bool = False) -> None:
        """io (write): log it, return once acknowledged; ``data`` None: zeros;
        ``journal``: for the remote site links only (the kernel writes the local
        device)."""

    def write_many(self, dev: ReplicatedDevice, ops: Sequence[WriteOp],
                   journal: bool = False, commit: bool = True) -> list[AckWait | None]:
        """io (writes of a batch): log a prefix of them without waiting; its
        outcomes (None: acknowledged; else a wait for the acknowledgement).
        ``commit=False``: durable at the next :meth:`flush` (unless held)."""

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


# the message that clears a replay's lost-writes report (an operator checked the data)
LOST_CLEAR_MESSAGE = "replog clear_lost"
# the messages of the log types (the ringbuffer's: the only type)
MESSAGES_USAGE = ("replog resize <sectors> | replog statistics on|off|reset"
                  f" | {LOST_CLEAR_MESSAGE}")

ReplogFactory = Callable[..., Any]  # (replicator, ReplogConfig, opener, cache_bytes=)

_REGISTRY: Registry[ReplogFactory] = Registry("replication-log type", {
    "ringbuffer": "dmrepl.replicator.replog.ringbuffer:Ringbuffer",
})
registered = _REGISTRY.registered
factory = _REGISTRY.factory
