"""C declarations of the ``log-writes`` target's log (drivers/md/dm-log-writes.c).

The structs are private to the kernel's source file (no header exports them), so
they are copied here as the source declares them (``__le64``/``__le32`` as the
little-endian integers they are on x86 and in the log) and checked against the
construct declarations of :mod:`dmrepl.dm.logwrites` by
``tests/unit/test_logwrites.py``: every field at the same offset, the C size the
construct size rounded up to the struct's alignment (the kernel writes
``sizeof`` bytes, its padding zeroed).
"""

from __future__ import annotations

from cdefs import abi_ffi

CDEF = """
struct log_write_super {
    uint64_t magic;
    uint64_t version;
    uint64_t nr_entries;
    uint32_t sectorsize;
};

struct log_write_entry {
    uint64_t sector;
    uint64_t nr_sectors;
    uint64_t flags;
    uint64_t data_len;
};

#define WRITE_LOG_MAGIC 0x6a736677736872
#define WRITE_LOG_VERSION 1
#define LOG_FLUSH_FLAG 1
#define LOG_FUA_FLAG 2
#define LOG_DISCARD_FLAG 4
#define LOG_MARK_FLAG 8
#define LOG_METADATA_FLAG 16
"""

ffi = abi_ffi(CDEF)
