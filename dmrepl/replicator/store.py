"""Block stores: what the replicator reads and writes (log, local and remote devices).

The surface and its implementations live in :mod:`dmrepl.blockio`; the names
below are compatibility names, to be removed once callers import from there.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmrepl.blockio import BlockIO, FileBlockIO, Opener, open_file
from dmrepl.blockio._range import Buffer, joined

# Compatibility names (callers still use them); remove once callers move to blockio.
BlockStore = BlockIO
FileStore = FileBlockIO
DeviceOpener = Opener
open_file_store: Opener = open_file


def pwritev(store: BlockStore, offset: int, bufs: Sequence[Buffer]) -> None:
    """Compatibility: ``store.pwritev`` (every BlockIO has it), for stores made
    outside blockio that only have ``pwrite``."""
    fn = getattr(store, "pwritev", None)
    if fn is not None:
        fn(offset, bufs)
    else:
        store.pwrite(offset, joined(bufs))
