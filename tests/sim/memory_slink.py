"""A test-only site-link type: ``memory`` keeps its site's devices in memory and
records every epoch it is given to apply.

It shows the seam: a site-link type is this one module plus one
``dmrepl.replicator.slink.register("memory", MemorySlink)`` call; the table
grammar, the copiers (order, epochs, positions, retries, resync schedule) and
status come with the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from dmrepl.replicator.slink.blockdev import Blockdev

SECTOR = 512


class MemorySlink:
    """The operations of the ``memory`` type (one object per replicator)."""

    def __init__(self, rep: Any) -> None:
        self.rep = rep
        self._blockdev = Blockdev(rep)
        self.lock = threading.Lock()
        self.images: dict[tuple[int, int], bytearray] = {}  # (slink, dev) -> data
        # (slink, sequence numbers given in one call, their epoch ends), in call order
        self.applied: list[tuple[int, list[int], set[int]]] = []
        self.delay: Callable[[], float] = lambda: 0.0  # a pause per epoch (tests)

    # its devices are opened, closed and configured as blockdev's (a memory site
    # keeps the data of the copies in memory, the devices' dirty logs where they say)

    def open_leg(self, dev_nr: int, cfg: Any) -> Any:
        leg = self._blockdev.open_leg(dev_nr, cfg)
        leg.ops = self
        return leg

    def open_leg_log(self, leg: Any, sectors: int) -> None:
        self._blockdev.open_leg_log(leg, sectors)

    def close_leg(self, leg: Any) -> None:
        self._blockdev.close_leg(leg)

    def message(self, s: Any, words: Any) -> Any:
        return self._blockdev.message(s, words)

    def status(self, s: Any) -> str:
        return self._blockdev.status(s) + ":memory"

    def _image(self, slink_nr: int, dev_nr: int) -> bytearray:
        key = (slink_nr, dev_nr)
        if key not in self.images:
            self.images[key] = bytearray(self.rep.devices[dev_nr].size_bytes)
        return self.images[key]

    def writes_durably(self, leg: Any) -> bool:
        return False     # (the copier's flush path: flush below)

    def apply_epoch(self, s: Any, group: list[Any], durable: bool = False
                    ) -> tuple[set[int], Any]:
        time.sleep(self.delay())
        done: set[int] = set()
        with self.lock:
            for e, leg, _ep in group:
                if leg is None:
                    continue
                data = bytes(e.length) if e.zero else self.rep.ring.entry_data(e)
                self._image(s.nr, e.dev)[e.offset:e.end] = data
                done.add(e.seq)
            self.applied.append((s.nr, [e.seq for e, leg, _ep in group if leg is not None],
                                 {ep for _e, _leg, ep in group}))
        return done, None

    def flush(self, leg: Any) -> None:
        pass  # memory is as durable as it gets here

    def probe(self, leg: Any) -> None:
        pass

    def mark_out_of_sync(self, leg: Any, regions: Iterable[int]) -> None:
        self._blockdev.mark_out_of_sync(leg, regions)  # the record is the dirty log's

    def resync_region(self, s: Any, dev: Any, leg: Any, region: int) -> bool:
        rs = leg.dlog.region_size * SECTOR
        lo, hi = region * rs, min((region + 1) * rs, dev.size_bytes)
        data = dev.legs[0].store.pread(lo, hi - lo)
        with self.lock:
            self._image(s.nr, dev.dev_nr)[lo:hi] = data
        with leg.lock:
            leg.dlog.set_region_sync(region, True)
            leg.dlog.clear_region(region)
            leg.dlog.flush()
            leg.cursor = region + 1
            leg.resynced += 1
        return True
