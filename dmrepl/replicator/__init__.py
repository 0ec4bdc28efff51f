"""The userspace dm-replicator engine: one ordered replication log for a group of
devices, copied to a local site (site link 0) and remote sites.

Typical use::

    rep = Replicator.from_table(
        "0 1 replicator ringbuffer 4 /var/lib/log 0 auto 65536 "
        "blockdev 2 0 async blockdev 4 1 async ios 1000")
    dev = rep.add_device("0 2048 replicator-dev rep0 0 "
                         "0 1 /dev/vg/data nolog 0 1 1 /dev/remote core 1 2048")
    rep.start()
    dev.write(0, b"x" * 4096)        # durable in the log, copied in log order
    print(rep.status("info"), rep.status_dict())
    rep.close()

See :mod:`dmrepl.replicator.target` (theory of operation and the parts), :mod:`.table` (grammar),
:mod:`.ondisk` (log format) and :mod:`.ringlog` (log semantics).
"""

from dmrepl.replicator.device import ReplicatedDevice
from dmrepl.replicator.errors import (
    DeviceBusy,
    LocalIOError,
    MessageError,
    ReplicatorClosed,
    ReplicatorError,
    ReplogCorrupt,
    ReplogIOError,
    TableError,
)
from dmrepl.replicator.store import BlockStore, DeviceOpener, FileStore, open_file_store
from dmrepl.replicator.table import (
    DeviceConfig,
    ReplicatorConfig,
    SlinkConfig,
    parse_device,
    parse_replicator,
)
from dmrepl.replicator.target import Replicator

__all__ = [
    "BlockStore",
    "DeviceBusy",
    "DeviceConfig",
    "DeviceOpener",
    "FileStore",
    "LocalIOError",
    "MessageError",
    "ReplicatedDevice",
    "Replicator",
    "ReplicatorClosed",
    "ReplicatorConfig",
    "ReplicatorError",
    "ReplogCorrupt",
    "ReplogIOError",
    "SlinkConfig",
    "TableError",
    "open_file_store",
    "parse_device",
    "parse_replicator",
]
