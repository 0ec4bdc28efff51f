"""``<linux/fs.h>``: the block device ioctls a block store needs.

Only request numbers (no structs): ``BLKGETSIZE64`` writes a ``u64`` (the size in
bytes), ``BLKSSZGET`` an ``int`` (the logical block size), and ``BLKDISCARD``
reads a ``u64[2]`` (start and length in bytes).  The header builds the numbers
with ``_IO``/``_IOR``; ``tests/unit/test_cdefs_blkdev.py`` compiles them against
the real header and compares.
"""

from __future__ import annotations

import struct

from cdefs import IOC_NONE, IOC_READ, ioc

INCLUDES = "#include <sys/ioctl.h>\n#include <linux/fs.h>"

#: The names ``tests/unit/test_cdefs_blkdev.py`` asks the C compiler for.
IOCTL_NAMES = ("BLKSSZGET", "BLKGETSIZE64", "BLKDISCARD")

_BLOCK_IOCTL_TYPE = 0x12

#: ``_IO(0x12, 104)``: logical block size, an ``int``.
BLKSSZGET = ioc(IOC_NONE, _BLOCK_IOCTL_TYPE, 104, 0)
#: ``_IOR(0x12, 114, size_t)``: size in bytes, a ``u64``.
BLKGETSIZE64 = ioc(IOC_READ, _BLOCK_IOCTL_TYPE, 114, struct.calcsize("N"))
#: ``_IO(0x12, 119)``: discard ``{start, length}`` (two ``u64``, bytes).
BLKDISCARD = ioc(IOC_NONE, _BLOCK_IOCTL_TYPE, 119, 0)

#: The ioctl argument buffers, packed in native byte order.
U64 = struct.Struct("=Q")
INT = struct.Struct("=i")
RANGE = struct.Struct("=QQ")
