"""Where a disk log's bytes live: a small injectable storage interface.

:class:`FileStorage` is the real one (block device or plain file); tests and
simulations use :class:`MemoryStorage`, which models a volatile write cache so that a
"crash" loses whatever was written but not flushed.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from pathlib import Path
from typing import Protocol

from dmrepl.dirtylog._base import parse_devnum
from dmrepl.errors import UserError

BLKSSZGET = 0x1268  # logical block size, int
BLKGETSIZE64 = 0x80081272  # size in bytes, u64


class Storage(Protocol):
    """Byte-addressed log storage.  Offsets and lengths passed by DiskLog are
    multiples of ``logical_block_size``."""

    name: str  # shown in status ("7:2" for block devices, as the kernel does)
    size: int  # bytes
    logical_block_size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None:
        """Everything written so far is on stable storage when this returns."""

    def close(self) -> None: ...


class FileStorage:
    """A block device (O_DIRECT, aligned buffers, fdatasync) or a regular file.

    O_DIRECT keeps the page cache out of the way in both directions: we read what
    the kernel's disk log wrote with dm-io, and it reads what we wrote.  fdatasync
    on a block device also flushes the device's volatile cache.
    """

    def __init__(self, path: str | os.PathLike[str], *, direct: bool | None = None) -> None:
        self.path = os.fspath(path)
        st = os.stat(self.path)
        is_blk = stat.S_ISBLK(st.st_mode)
        if not is_blk and not stat.S_ISREG(st.st_mode):
            raise UserError(f"log device {self.path}: not a block device or regular file")
        self.direct = is_blk if direct is None else direct
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        self.fd = os.open(self.path, flags)
        try:
            if is_blk:
                self.name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
                self.size = struct.unpack("=Q", buf)[0]
                buf = fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4)
                self.logical_block_size = struct.unpack("=i", buf)[0]
            else:
                self.name = self.path
                self.size = st.st_size
                self.logical_block_size = 512
        except BaseException:
            os.close(self.fd)
            raise
        self._scratch = mmap.mmap(-1, mmap.PAGESIZE)  # page aligned, for O_DIRECT

    def _buffer(self, length: int) -> mmap.mmap:
        if len(self._scratch) < length:
            self._scratch.close()
            self._scratch = mmap.mmap(-1, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
        return self._scratch

    def read(self, offset: int, length: int) -> bytes:
        buf = self._buffer(length)
        view = memoryview(buf)[:length]
        try:
            done = 0
            while done < length:
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"short read at {offset + done} of {self.path}")
                done += n
            return bytes(view)
        finally:
            view.release()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        if self.direct:
            buf = self._buffer(length)
            view = memoryview(buf)[:length]
            view[:] = data
        else:
            view = memoryview(data)
        try:
            done = 0
            while done < length:
                done += os.pwritev(self.fd, [view[done:]], offset + done)
        finally:
            view.release()

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._scratch.close()


class MemoryStorage:
    """In-memory storage with a volatile cache: ``write`` lands in ``volatile``,
    ``flush`` copies it to ``durable``.  ``crash()`` returns a new storage holding
    only the durable bytes (what a power failure leaves)."""

    def __init__(self, size: int, *, logical_block_size: int = 512, name: str = "mem",
                 data: bytes | None = None) -> None:
        self.name = name
        self.size = size
        self.logical_block_size = logical_block_size
        self.durable = bytearray(size)
        if data is not None:
            self.durable[:len(data)] = data[:size]
        self.volatile = bytearray(self.durable)
        self.writes: list[tuple[int, int]] = []  # (offset, length) of each write
        self.flushes = 0
        self.closed = False

    def _check(self, offset: int, length: int) -> None:
        lbs = self.logical_block_size
        if offset % lbs or length % lbs:
            raise OSError(errno.EINVAL, f"unaligned I/O {offset}+{length} (block {lbs})")
        if offset + length > self.size:
            raise OSError(errno.EIO, f"I/O beyond the end: {offset}+{length} > {self.size}")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.volatile[offset:offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        self.volatile[offset:offset + len(data)] = data
        self.writes.append((offset, len(data)))

    def flush(self) -> None:
        self.durable[:] = self.volatile
        self.flushes += 1

    def crash(self) -> MemoryStorage:
        return MemoryStorage(self.size, logical_block_size=self.logical_block_size,
                             name=self.name, data=bytes(self.durable))

    def close(self) -> None:
        self.closed = True


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
