"""C declarations of the ``era`` target's metadata (drivers/md/dm-era-target.c) and
of the persistent-data blocks it is made of (drivers/md/persistent-data/).

``struct superblock_disk`` and ``struct writeset_disk`` are private to
dm-era-target.c, ``struct node_header`` to btree-internal.h and ``struct
array_block`` to dm-array.c: copied here as the kernel declares them, all
``__packed`` (``__le*`` as the little-endian integers they are on x86 and on
disk).  ``tests/unit/test_era.py`` checks them against the construct
declarations of :mod:`dmrepl.dm.era`.
"""

from __future__ import annotations

import cffi

CDEF = """
struct writeset_disk {
    uint32_t nr_bits;
    uint64_t root;
};

struct superblock_disk {
    uint32_t csum;
    uint32_t flags;
    uint64_t blocknr;
    uint8_t  uuid[16];
    uint64_t magic;
    uint32_t version;
    uint8_t  metadata_space_map_root[128];
    uint32_t data_block_size;
    uint32_t metadata_block_size;
    uint32_t nr_blocks;
    uint32_t current_era;
    struct writeset_disk current_writeset;
    uint64_t writeset_tree_root;
    uint64_t era_array_root;
    uint64_t metadata_snap;
};

struct node_header {
    uint32_t csum;
    uint32_t flags;
    uint64_t blocknr;
    uint32_t nr_entries;
    uint32_t max_entries;
    uint32_t value_size;
    uint32_t padding;
};

struct array_block {
    uint32_t csum;
    uint32_t max_entries;
    uint32_t nr_entries;
    uint32_t value_size;
    uint64_t blocknr;
};

#define SUPERBLOCK_MAGIC 2126579579
#define SUPERBLOCK_CSUM_XOR 146538381
#define BTREE_CSUM_XOR 121107
#define CSUM_XOR 595846735
#define INTERNAL_NODE 1
#define LEAF_NODE 2
#define DM_ERA_METADATA_BLOCK_SIZE 4096
"""

ffi = cffi.FFI()
ffi.cdef(CDEF, packed=True)   # (every one of them is __packed in the kernel)
