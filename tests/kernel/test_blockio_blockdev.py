"""The one block-I/O surface on a real block device (a loop device): its size
through BLKGETSIZE64, its logical block size through BLKSSZGET, its name, durable
writes and discard (BLKDISCARD) -- what a regular file cannot show."""

from __future__ import annotations

import os

from dmrepl.blockio import FileBlockIO, open_store


def test_a_loop_device_through_the_block_io_surface(loop_device) -> None:  # type: ignore[no-untyped-def]
    dev = loop_device(16)
    with open(f"/sys/class/block/{os.path.basename(dev)}/size") as f:
        sectors = int(f.read())
    with open(f"/sys/class/block/{os.path.basename(dev)}/queue/logical_block_size") as f:
        block = int(f.read())
    bd = open_store(dev)
    try:
        assert isinstance(bd, FileBlockIO) and bd.is_blockdev
        assert bd.size == sectors * 512 == 16 << 20
        assert bd.logical_block_size == block
        st = os.stat(dev)
        assert bd.name == f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        bd.pwritev_durable(4096, [b"a" * 512, b"b" * 512])
        assert bd.pread(4096, 1024) == b"a" * 512 + b"b" * 512
        bd.trim(0, 1 << 20)  # discard on a loop device reads back as zeros
        assert bd.pread(4096, 1024) == bytes(1024)
        bd.pwrite(bd.size - 512, b"z" * 512)  # the last sector, not one past it
        assert bd.pread(bd.size - 512, 512) == b"z" * 512
    finally:
        bd.close()


def test_direct_reads_see_what_the_kernel_wrote_behind_the_page_cache(dm_name, loop_device,
                                                                      dmsetup) -> None:  # type: ignore[no-untyped-def]
    """A kernel mirror writes its local leg with bios, behind the page cache of the
    leg's /dev node: a buffered reader of that node keeps a stale page, a store
    opened beside the kernel (``open_store_beside_the_kernel``) does not."""
    from dmrepl.blockio import open_store_beside_the_kernel
    loop = loop_device(16)
    name = dm_name("direct-reads")
    dmsetup("create", name, "--table", f"0 {16 << 11} linear {loop} 0")
    dev = f"/dev/mapper/{name}"
    buffered, beside = open_store(dev), open_store_beside_the_kernel(dev)
    try:
        assert buffered.pread(0, 4096) == bytes(4096)     # now in the page cache
        fd = os.open(loop, os.O_WRONLY | os.O_DIRECT)     # the kernel's write, below
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)
            buf[:] = b"k" * 4096
            os.pwrite(fd, buf, 0)
        finally:
            os.close(fd)
        assert buffered.pread(0, 4096) == bytes(4096), \
            "the page cache was not stale: this test shows nothing"
        assert beside.pread(0, 4096) == b"k" * 4096
    finally:
        buffered.close()
        beside.close()
