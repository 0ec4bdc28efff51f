"""What every block store checks the same way: buffers and ranges."""

from __future__ import annotations

import errno
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview


def check_read(name: str, size: int, offset: int, length: int) -> None:
    """A read reaching past the end is a short read: ``OSError(EIO)``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.EIO, f"{name}: read {offset}+{length} beyond the end ({size})")


def check_write(name: str, size: int, offset: int, length: int) -> None:
    """A write reaching past the end: ``OSError(ENOSPC)``, as a block device says."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.ENOSPC, f"{name}: write {offset}+{length} beyond the end ({size})")


def check_aligned(name: str, block: int, offset: int, length: int) -> None:
    """Direct I/O: offset and length in whole logical blocks (``EINVAL``, as O_DIRECT)."""
    if offset % block or length % block:
        raise OSError(errno.EINVAL, f"{name}: unaligned I/O {offset}+{length} (block {block})")


def joined(bufs: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in bufs)
