"""Compatibility names: the engine is cut into :mod:`.target` (the replicator),
:mod:`.device`, :mod:`.replog`, :mod:`.slink`, :mod:`.messages` and
:mod:`.status`; see :mod:`.target` for the theory of operation."""

from dmrepl.replicator import ondisk
from dmrepl.replicator.device import Leg, ReplicatedDevice
from dmrepl.replicator.replog.ringbuffer import MAX_ENTRY
from dmrepl.replicator.slink.link import Slink
from dmrepl.replicator.target import Replicator

__all__ = ["MAX_ENTRY", "Leg", "ReplicatedDevice", "Replicator", "Slink", "ondisk"]
