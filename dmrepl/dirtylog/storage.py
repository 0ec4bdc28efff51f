"""Where a disk log's bytes live: a small injectable storage interface.

:class:`FileStorage` is the real one (block device or plain file); tests and
simulations use :class:`MemoryStorage`, which models a volatile write cache so that a
"crash" loses whatever was written but not flushed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from dmrepl.blockio import FileBlockIO, MemoryBlockIO
from dmrepl.blockio._range import Buffer
from dmrepl.blockio.file import NotADevice
from dmrepl.dirtylog._base import parse_devnum
from dmrepl.errors import UserError


class Storage(Protocol):
    """Byte-addressed log storage.  Offsets and lengths passed by DiskLog are
    multiples of ``logical_block_size``.  The dirty log's names for
    :class:`dmrepl.blockio.BlockIO` (``read`` is ``pread``, ``write`` is
    ``pwrite``); it becomes BlockIO once DiskLog calls those."""

    name: str  # shown in status ("7:2" for block devices, as the kernel does)
    size: int  # bytes
    logical_block_size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: Buffer) -> None: ...

    def flush(self) -> None:
        """Everything written so far is on stable storage when this returns."""

    def close(self) -> None: ...


# Compatibility names (callers still use them); remove once callers move to blockio.


class FileStorage(FileBlockIO):
    """A log device: :class:`FileBlockIO`, ``O_DIRECT`` on a block device (we read
    what the kernel's disk log wrote with dm-io, and it reads what we wrote)."""

    def __init__(self, path: str | os.PathLike[str], *, direct: bool | None = None) -> None:
        if direct is None:
            direct = stat.S_ISBLK(os.stat(path).st_mode)
        try:
            super().__init__(path, direct=direct)
        except NotADevice:
            raise UserError(f"log device {os.fspath(path)}: not a block device or "
                            "regular file") from None


class MemoryStorage(MemoryBlockIO):
    """:class:`MemoryBlockIO` as a log device: a volatile cache (``write`` lands in
    ``volatile``, ``flush`` copies it to ``durable``; ``crash()`` keeps only the
    durable bytes), unaligned I/O refused, and every write recorded in ``writes``."""

    def __init__(self, size: int, *, logical_block_size: int = 512, name: str = "mem",
                 data: bytes | None = None) -> None:
        super().__init__(size, data=data, name=name, logical_block_size=logical_block_size,
                         direct=True, volatile_cache=True)
        self.writes: list[tuple[int, int]] = []  # (offset, length) of each write

    @property
    def volatile(self) -> bytearray:
        return self.data

    def store(self, offset: int, data: Buffer, *, durable: bool) -> None:
        super().store(offset, data, durable=durable)
        self.writes.append((offset, len(data)))

    def crash(self) -> MemoryStorage:
        return MemoryStorage(self.size, logical_block_size=self.logical_block_size,
                             name=self.name, data=bytes(self.durable))


def resolve_device(spec: str, *, dev: str = "/dev", sys: str = "/sys") -> str:
    """A log device argument (path or ``major:minor``) -> a path to open.

    ``major:minor`` is looked up through ``/sys/dev/block/M:m/uevent`` (DEVNAME),
    then by scanning ``/dev`` for a block device with that number.
    """
    devnum = parse_devnum(spec)
    if devnum is None:
        if not os.path.exists(spec):
            raise UserError(f"log device {spec!r} does not exist")
        return spec
    rdev = os.makedev(*devnum)
    uevent = Path(sys, "dev", "block", spec, "uevent")
    try:
        for line in uevent.read_text().splitlines():
            if line.startswith("DEVNAME="):
                candidate = os.path.join(dev, line.split("=", 1)[1])
                if _is_blockdev(candidate, rdev):
                    return candidate
    except OSError:
        pass
    for root, _dirs, files in os.walk(dev):
        for fname in sorted(files):
            candidate = os.path.join(root, fname)
            if _is_blockdev(candidate, rdev):
                return candidate
    raise UserError(f"log device {spec}: no block device with that number in {dev}")


def _is_blockdev(path: str, rdev: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev
