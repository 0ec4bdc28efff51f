"""The engine the daemon drives, as the daemon sees it: three protocols.

An *engine* is a replicator class (:data:`Engine`) whose ``from_table`` builds a
replicator (:class:`EngineReplicator`, from one ``replicator`` table line) to which the daemon adds
devices (:class:`EngineDevice`, one per ``replicator-dev`` table line; what an NBD
export serves).  The real engine is :class:`dmrepl.replicator.Replicator`; the
simulation engine (:mod:`dmrepl_testing.simengine`, ``--engine sim``) is a test-only
stand-in that does not replicate; it lives in the test harness, not in the installed
package.  mypy checks both against these protocols where
:func:`load_engine` returns them as an :data:`Engine` (and with them the
replicators their ``from_table`` builds and the devices those add).

:func:`load_engine` picks one by its ``--engine`` name.  This module imports no
engine at import time, so that an engine that cannot be imported is reported as
:class:`EngineUnavailable`, one line, rather than as the daemon failing to import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from dmrepl.blockio import Opener
from dmrepl.errors import DmreplError
from dmrepl.nbd.backend import Backend

#: ``dmrepl daemon --engine``: the real engine (``auto`` and ``replicator`` are
#: the same: the real engine or :class:`EngineUnavailable`) or the sim stand-in.
ENGINE_CHOICES = ("auto", "replicator", "sim")


class EngineUnavailable(DmreplError):
    """The replicator engine cannot be imported: the daemon did not start; repair
    the installation (or, to test without replicating, choose ``--engine sim``)."""


@runtime_checkable
class EngineDevice(Backend, Protocol):
    """One engine device: an NBD export's backend plus its target's surface."""

    @property
    def dev_nr(self) -> int: ...

    def local_device(self) -> str:
        """The path of the local device (site link 0's)."""
        ...

    def journal(self, *, cached: bool = False) -> Backend:
        """The device as a kernel mirror's journal leg: the kernel writes the
        local device itself; this logs writes for the remote site links only
        (``cached``: durable at the next flush, as a disk with a write cache)."""
        ...

    def lost_writes(self, offset: int = 0, length: int | None = None) -> None:
        """Writes to the range (default: all) may be on the local device only:
        the remote site links resynchronise it."""
        ...

    def remote_in_sync(self) -> bool:
        """Every remote site link has the whole device in sync."""
        ...

    def behind_limit(self, ios: int = 0, nbytes: int = 0, since: float | None = None) -> bool:
        """Is a remote site link of the device past its fall-behind limit,
        counting ``ios`` writes of ``nbytes`` not yet in the replication log, the
        oldest written at ``since`` (time.monotonic())?"""
        ...

    def fallbehind_limited(self) -> bool:
        """Has a remote site link of the device a fall-behind limit (so that what
        is not yet in the replication log counts)?"""
        ...

    def message(self, argv: Sequence[str]) -> str: ...
    def status(self, kind: str = "info") -> str: ...
    def status_dict(self) -> dict[str, Any]: ...
    def table(self) -> str:
        """The live ``replicator-dev`` parameters (messages change them)."""
        ...


@runtime_checkable
class EngineReplicator(Protocol):
    """One replicator: its devices, messages, status, live table and events."""

    @classmethod
    def from_table(cls, line: str, *, opener: Opener | None = None,
                   on_event: Callable[..., Any] | None = None,
                   **tuning: Any) -> EngineReplicator:
        """Build from a ``replicator`` table line (the daemon opens its devices
        with ``opener``); ``on_event(kind, event, object, **fields)`` receives its
        state changes (:meth:`dmrepl.eventlog.EventLog.emit`; called under the
        engine's lock: it must not block); ``tuning``: the engine's knobs
        (:mod:`dmrepl.tuning`)."""
        ...

    def current_state(self) -> list[tuple[str, dict[str, Any]]]:
        """Each site link and device as ``(object, fields)``: ``events --now``."""
        ...

    @property
    def event_nr(self) -> int: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...

    def check_device(self, line: str) -> None:
        """Refuse (UserError) a ``replicator-dev`` line it could not take, opening
        nothing."""
        ...

    def add_device(self, line: str) -> EngineDevice: ...

    def remove_device(self, dev_nr: int, *, force: bool = False) -> None:
        """Remove a device; :class:`dmrepl.errors.Busy` (nothing changed) while it
        has writes not yet copied to every site link.  ``force``: the remote site
        links give up the writes they do not have yet (their regions are marked
        out of sync), so only the local device's own copies are waited for."""
        ...

    def message(self, argv: Sequence[str]) -> str: ...
    def status(self, kind: str = "info") -> str: ...
    def status_dict(self) -> dict[str, Any]: ...
    def table(self) -> str:
        """The live ``replicator`` parameters (messages change them)."""
        ...

    def wait_event(self, after: int, timeout: float | None) -> int:
        """Block until ``event_nr > after`` or ``timeout``; return ``event_nr``."""
        ...


#: An engine: the replicator class (its ``from_table`` builds one; its ``__name__``
#: names it).
Engine = type[EngineReplicator]


def load_engine(kind: str = "auto") -> Engine:
    """The engine named by ``--engine``; :class:`EngineUnavailable` if the real
    engine cannot be imported (never the sim in its place: it does not replicate)."""
    if kind == "sim":
        try:
            from dmrepl_testing.simengine import SimReplicator
        except ImportError as e:
            raise EngineUnavailable(
                "the simulation engine is part of the test harness (dmrepl_testing), not "
                "installed; run from the source tree with its root on PYTHONPATH") from e
        return SimReplicator
    if kind not in ENGINE_CHOICES:
        raise EngineUnavailable(f"unknown engine {kind!r} (one of {', '.join(ENGINE_CHOICES)})")
    try:
        from dmrepl.replicator import Replicator
    except ImportError as e:
        where = f" (in module {e.name!r})" if e.name and e.name not in str(e) else ""
        raise EngineUnavailable(
            f"the replicator engine cannot be imported: {e}{where}; repair the dmrepl "
            "installation (--engine sim is a test-only stand-in that does not "
            "replicate)") from e
    return Replicator
