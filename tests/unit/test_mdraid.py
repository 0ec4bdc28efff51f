"""dm-raid's and md's super blocks: the construct declarations agree with the C ones."""

from __future__ import annotations

from cdefs import mdraid as c
from dmrepl.dm import mdraid as md


def test_the_declarations_agree_with_the_c_structs() -> None:
    for struct, decl in (("struct dm_raid_superblock", md.DM_RAID_SUPERBLOCK),
                         ("bitmap_super_t", md.BITMAP_SUPER)):
        offset = 0
        for sub in decl.subcons:
            assert c.ffi.offsetof(struct, sub.name) == offset, (struct, sub.name)
            offset += sub.sizeof()
        # (the kernel's dm_raid_superblock is __packed; its fields are naturally
        # aligned, so only cffi's size is rounded up to the alignment)
        align = c.ffi.alignof(struct)
        assert c.ffi.sizeof(struct) == -(-decl.sizeof() // align) * align
    assert c.ffi.sizeof("bitmap_super_t") == 256    # md-bitmap.h: the bits follow at 256
    lib = c.ffi.dlopen(None)
    assert (lib.DM_RAID_MAGIC, lib.BITMAP_MAGIC) == (md.DM_RAID_MAGIC, md.BITMAP_MAGIC)


def test_metadata_that_is_not_dm_raids_reads_as_none() -> None:
    assert md.read_metadata(bytes(md.BITS_OFFSET + 8), 1 << 20) is None
    assert md.read_metadata(b"DmRd", 1 << 20) is None
