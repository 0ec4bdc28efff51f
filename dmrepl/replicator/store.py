"""Block stores: what the replicator reads and writes (log, local and remote devices).

A :class:`BlockStore` has ``size`` (bytes), ``pread(offset, length)``,
``pwrite(offset, data)``, ``flush()`` (everything written before is durable) and
``close()``; failures raise ``OSError``.  :class:`FileStore` serves plain files and
block devices; tests inject fakes through a :data:`DeviceOpener`.  A store may set
``concurrent_writes = True`` (the NBD client of a remote site does): the copiers
then keep several writes of one epoch in flight on it (others get one at a time).
A store may also have ``pwritev_durable(offset, bufs)``: a write that is durable
when it returns (``RWF_DSYNC``), so that a lone log write needs no separate flush.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from dmrepl.ownership import Claim, claim_device

BLKGETSIZE64 = 0x80081272


@runtime_checkable
class BlockStore(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


DeviceOpener = Callable[[str], BlockStore]


class FileStore:
    """A regular file or a block device, with positional I/O (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if self.is_blockdev:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            self.size = int(struct.unpack("=Q", buf)[0])
        else:
            self.size = st.st_size
        self._lock = threading.Lock()
        self._dsync = hasattr(os, "RWF_DSYNC")
        self._claim: Claim | None = None

    def claim_exclusive(self) -> None:
        """Own this file or device alone for as long as the store is open (a
        replication log has one writer): :class:`~dmrepl.errors.InUse` if another
        process owns it."""
        self._claim = claim_device(self.fd, self.path, self.is_blockdev)

    def pread(self, offset: int, length: int) -> bytes:
        out = os.pread(self.fd, length, offset)
        if len(out) < length:  # a file read past its end: holes read as zeros
            out += bytes(length - len(out))
        return out

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def pwritev(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        total = sum(len(b) for b in bufs)
        n = os.pwritev(self.fd, bufs, offset)
        if n < total:
            self._write_rest(offset, bufs, n)

    def _write_rest(self, offset: int, bufs: Sequence[bytes | bytearray | memoryview],
                    done: int) -> None:
        """After a short vectored write of ``done`` bytes: the rest, in one piece."""
        self.pwrite(offset + done, b"".join(bytes(b) for b in bufs)[done:])

    def pwritev_durable(self, offset: int,
                        bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write and make just this range durable in one system call (``RWF_DSYNC``:
        no second call, no whole-file flush).  Where the file system refuses the
        flag, a write and an fdatasync."""
        if self._dsync:
            total = sum(len(b) for b in bufs)
            try:
                n = os.pwritev(self.fd, bufs, offset, os.RWF_DSYNC)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._dsync = False
            else:
                if n == total:
                    return
                # short write: the rest, then a flush covers both parts
                self._write_rest(offset, bufs, n)
                os.fdatasync(self.fd)
                return
        self.pwritev(offset, bufs)
        os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def grow(self, size: int) -> None:
        """Extend a regular file to ``size`` bytes (block devices cannot grow)."""
        with self._lock:
            if not self.is_blockdev and self.size < size:
                os.ftruncate(self.fd, size)
                self.size = size

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)     # a file's flock goes with it
                self.fd = -1
            if self._claim is not None:
                self._claim.release()
                self._claim = None


def open_file_store(path: str) -> BlockStore:
    """The default opener: files and block devices by path."""
    return FileStore(path)


def pwritev(store: BlockStore, offset: int,
            bufs: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write several buffers back to back, with one system call where possible."""
    fn = getattr(store, "pwritev", None)
    if fn is not None:
        fn(offset, bufs)
    else:
        store.pwrite(offset, b"".join(bytes(b) for b in bufs))
