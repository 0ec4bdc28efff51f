"""C declarations of dm-raid's superblock and md's write-intent bitmap super block,
as they are on a dm ``raid`` target's metadata device.

``struct dm_raid_superblock`` is private to drivers/md/dm-raid.c: its pristine
part is copied here (the v1.9.0 extensions that follow ``stripe_sectors`` are
not read).  ``bitmap_super_t`` is drivers/md/md-bitmap.h's (``__le*`` as the
little-endian integers they are on x86 and on disk).  ``tests/unit/test_mdraid.py``
checks them against the construct declarations of :mod:`dmrepl.dm.mdraid`.
"""

from __future__ import annotations

from cdefs import abi_ffi

CDEF = """
struct dm_raid_superblock {
    uint32_t magic;
    uint32_t compat_features;
    uint32_t num_devices;
    uint32_t array_position;
    uint64_t events;
    uint64_t failed_devices;
    uint64_t disk_recovery_offset;
    uint64_t array_resync_offset;
    uint32_t level;
    uint32_t layout;
    uint32_t stripe_sectors;
};

typedef struct bitmap_super_s {
    uint32_t magic;
    uint32_t version;
    uint8_t  uuid[16];
    uint64_t events;
    uint64_t events_cleared;
    uint64_t sync_size;
    uint32_t state;
    uint32_t chunksize;
    uint32_t daemon_sleep;
    uint32_t write_behind;
    uint32_t sectors_reserved;
    uint32_t nodes;
    uint8_t  cluster_name[64];
    uint8_t  pad[120];
} bitmap_super_t;

#define DM_RAID_MAGIC 0x64526D44
#define BITMAP_MAGIC 0x6d746962
"""

ffi = abi_ffi(CDEF)
