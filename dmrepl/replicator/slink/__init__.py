"""Site-link types: the interface the copiers drive, and the registry by name.

A site link (``<type> <#params> <slink_nr> [<policy> ...]`` in the replicator
table) carries the copies of the logged writes to one site.  What is common to
every site link -- the order of the copies (epochs), the positions, fall-behind,
drops, retries, the resync schedule -- is in :mod:`.copier`; what a type does with
the devices of its site is one object implementing :class:`SlinkType` (as the
seed's ``struct dm_repl_slink_type`` ops).  ``blockdev`` (:mod:`.blockdev`) writes
to block devices (local files or NBD exports).

Adding a type: one module with a class implementing :class:`SlinkType` (its
constructor takes the replicator) and one :func:`register` call; the table
grammar (:func:`dmrepl.replicator.table.parse_slinks`) then accepts its name.
This module imports nothing of the engine, so that the table parser can use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dmrepl.replicator._registry import Registry

if TYPE_CHECKING:
    from dmrepl.replicator.device import Leg, ReplicatedDevice
    from dmrepl.replicator.slink.link import Copy, Failure, Slink
    from dmrepl.replicator.table import LegConfig, SlinkConfig


class SlinkType(Protocol):
    """What a site-link type does with the devices of its site (no lock held when
    called, unless said)."""

    # -- devices (dev add / dev del) ------------------------------------------------

    def open_leg(self, dev_nr: int, cfg: LegConfig) -> Leg:
        """Device add, first step: open a device of this site for device
        ``dev_nr`` (nothing written); TableError if it cannot be."""

    def open_leg_log(self, leg: Leg, sectors: int) -> None:
        """Device add, second step (remote legs, once every device of the add is
        open and checked): open its dirty log for ``sectors``, not resumed yet (the
        caller resumes every log of the add last); TableError if refused."""

    def close_leg(self, leg: Leg) -> None:
        """Device removal: close its dirty log and device (errors are not reported:
        the leg is gone)."""

    # -- message and status -------------------------------------------------------------

    def message(self, s: Slink, words: Sequence[str]) -> SlinkConfig:
        """The configuration ``slink message <nr> <words>`` gives the site link
        (validated whole; the caller applies it); MessageError if refused."""

    def status(self, s: Slink) -> str:
        """The site link's word of the replicator's INFO status (lock held)."""

    # -- copies -------------------------------------------------------------------------

    def apply_epoch(self, s: Slink, group: list[Copy], durable: bool = False
                    ) -> tuple[set[int], Failure | None]:
        """Write the copies of one epoch (entries with leg None are skipped); return
        the sequence numbers written and the first failure (None: all written).
        ``durable`` (only where :meth:`writes_durably` says so): each copy is
        durable once written, and needs no flush."""

    def writes_durably(self, leg: Leg) -> bool:
        """Can a copy to ``leg`` be made durable as it is written (FUA), for less
        than a write and a flush cost?"""

    def flush(self, leg: Leg) -> None:
        """Make what was written to ``leg`` durable; raises OSError."""

    def probe(self, leg: Leg) -> None:
        """Test a failed device (a small read); raises OSError while it fails."""

    def mark_out_of_sync(self, leg: Leg, regions: Iterable[int]) -> None:
        """Record regions the site lacks (its dirty log, flushed); raises on failure."""

    def resync_region(self, s: Slink, dev: ReplicatedDevice, leg: Leg, region: int) -> bool:
        """Copy one out-of-sync region from the local device and mark it in sync;
        False if a device failed (reported through the copier)."""


SlinkFactory = Callable[[Any], SlinkType]  # called with the Replicator

_REGISTRY: Registry[SlinkFactory] = Registry("site-link type", {
    # built in, imported on first use (the module imports the engine)
    "blockdev": "dmrepl.replicator.slink.blockdev:Blockdev",
})
register = _REGISTRY.register  # make a name a site-link type of the table grammar
unregister = _REGISTRY.unregister
registered = _REGISTRY.registered
factory = _REGISTRY.factory
