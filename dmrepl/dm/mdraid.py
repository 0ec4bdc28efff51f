"""dm ``raid`` (md through device-mapper): the two super blocks on a metadata device.

A dm ``raid`` leg's metadata device holds (little-endian)::

    byte 0      struct dm_raid_superblock   (dm-raid's: the array's state, this
                                             leg's recovery position)
    byte 4096   bitmap_super_t              (md's write-intent bitmap: 256 bytes)
    byte 4352   the bitmap: one bit per ``chunksize`` bytes of the array, bit i
                of the little-endian bit string set while chunk i may differ
                between the legs

Declared once here (construct) and as C in :mod:`cdefs.mdraid`;
``tests/unit/test_mdraid.py`` checks that they agree.  Sans-I/O:
:func:`read_metadata` takes a metadata device's first bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Int32ul, Int64ul, Struct

#: ``DM_RAID_MAGIC`` ("DmRd") and md's ``BITMAP_MAGIC`` ("bitm").
DM_RAID_MAGIC = 0x64526D44
BITMAP_MAGIC = 0x6D746962
#: Where md's bitmap starts on a dm-raid metadata device (dm-raid's super block
#: takes the first 4 KiB).
BITMAP_OFFSET = 4096
#: A recovery or resync offset when nothing is being recovered (``MaxSector``).
NO_OFFSET = (1 << 64) - 1

#: ``struct dm_raid_superblock``, its pristine part.
DM_RAID_SUPERBLOCK = Struct(
    "magic" / Int32ul,
    "compat_features" / Int32ul,
    "num_devices" / Int32ul,
    "array_position" / Int32ul,
    "events" / Int64ul,
    "failed_devices" / Int64ul,
    "disk_recovery_offset" / Int64ul,   # sectors; NO_OFFSET: this leg is in sync
    "array_resync_offset" / Int64ul,    # sectors; NO_OFFSET: the array is in sync
    "level" / Int32ul,
    "layout" / Int32ul,
    "stripe_sectors" / Int32ul,
)

#: ``bitmap_super_t``.
BITMAP_SUPER = Struct(
    "magic" / Int32ul,
    "version" / Int32ul,
    "uuid" / Bytes(16),
    "events" / Int64ul,
    "events_cleared" / Int64ul,
    "sync_size" / Int64ul,              # sectors of the array
    "state" / Int32ul,
    "chunksize" / Int32ul,              # bytes per bit
    "daemon_sleep" / Int32ul,
    "write_behind" / Int32ul,
    "sectors_reserved" / Int32ul,
    "nodes" / Int32ul,
    "cluster_name" / Bytes(64),
    "pad" / Bytes(120),
)
#: The bitmap's bits start right after its super block.
BITS_OFFSET = BITMAP_OFFSET + BITMAP_SUPER.sizeof()


@dataclass(frozen=True)
class LegMetadata:
    """What one leg's metadata says may differ between the legs."""

    #: sector from which this leg is being recovered, or the array resynced
    #: (None: neither is under way)
    recovering_from: int | None
    #: bytes of the array per bitmap bit
    chunk: int
    #: the chunks whose bit is set
    dirty: frozenset[int]


def read_metadata(data: bytes, array_bytes: int) -> LegMetadata | None:
    """One leg's metadata from its device's first bytes (at least BITS_OFFSET plus
    the bitmap); None if it is not dm-raid's with a bitmap (never written, or
    damaged), or cut short."""
    if len(data) < BITS_OFFSET:
        return None
    sb = DM_RAID_SUPERBLOCK.parse(data)
    bitmap = BITMAP_SUPER.parse(data[BITMAP_OFFSET:])
    if sb.magic != DM_RAID_MAGIC or bitmap.magic != BITMAP_MAGIC or bitmap.chunksize <= 0:
        return None
    chunks = -(-array_bytes // bitmap.chunksize)
    bits = data[BITS_OFFSET:BITS_OFFSET + -(-chunks // 8)]
    if len(bits) < -(-chunks // 8):
        return None
    value = int.from_bytes(bits, "little")
    offsets = [o for o in (sb.disk_recovery_offset, sb.array_resync_offset) if o != NO_OFFSET]
    return LegMetadata(min(offsets) if offsets else None, bitmap.chunksize,
                       frozenset(i for i in range(chunks) if value >> i & 1))
