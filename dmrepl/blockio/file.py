"""A block store on a regular file or a block device (positional I/O, thread-safe).

The size of a block device comes from ``BLKGETSIZE64``, its logical block size from
``BLKSSZGET`` (``cdefs.blkdev``); a regular file has its length and 512.  With
``direct`` the file is opened ``O_DIRECT`` and every buffer goes through a page
aligned bounce buffer: the dirty log uses it on block devices, so that it reads
what the kernel's disk log wrote with dm-io, and the kernel reads what we wrote.
``pwritev_durable`` is one ``RWF_DSYNC`` write (a write and an ``fdatasync``
where the file system refuses the flag); ``flush`` is ``fdatasync``, which on a
block device also flushes the device's volatile cache; ``trim`` is
``BLKDISCARD`` on a block device and nothing on a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Iterator, Sequence
from urllib.parse import unquote, urlsplit

from cdefs import blkdev
from dmrepl.blockio._compat import CompatNames
from dmrepl.blockio._range import Buffer, check_read, check_write, joined
from dmrepl.ownership import Claim, claim_device

#: The logical block size of a regular file (the sector the engine works in).
FILE_BLOCK_SIZE = 512


class NotADevice(OSError):
    """The path is neither a block device nor a regular file: give one that is."""


class FileBlockIO(CompatNames):
    concurrent_writes = False

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = False,
                 size: int | None = None, dsync: bool = True,
                 direct_reads: bool = False) -> None:
        """Open ``path`` read-write.  ``size`` exports only the first ``size`` bytes,
        or grows a shorter regular file to ``size``.  ``dsync=False`` makes durable
        writes a write and an fdatasync, as on a file system without ``RWF_DSYNC``.
        ``direct_reads``: a block device is read with ``O_DIRECT`` (past the page
        cache; writes still go through it): the kernel writes it too, behind the
        page cache (a kernel mirror's local leg), and a cached page would be stale."""
        self.path = os.fspath(path)
        st = os.stat(self.path)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if not self.is_blockdev and not stat.S_ISREG(st.st_mode):
            raise NotADevice(errno.ENOTBLK,
                             f"{self.path}: not a block device or regular file")
        self.direct = direct
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        try:
            if self.is_blockdev:
                self.name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                end = self._ioctl_out(blkdev.BLKGETSIZE64, blkdev.U64)
                self.logical_block_size = self._ioctl_out(blkdev.BLKSSZGET, blkdev.INT)
            else:
                self.name = self.path
                end = st.st_size
                self.logical_block_size = FILE_BLOCK_SIZE
            self.size = end if size is None else size
            if self.size > end:
                if self.is_blockdev:
                    raise OSError(errno.ENOSPC, f"{self.path}: {end} bytes, not {self.size}")
                os.ftruncate(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()  # close, grow, and the bounce buffer
        self._dsync = dsync and hasattr(os, "RWF_DSYNC")
        self._bounce = mmap.mmap(-1, mmap.PAGESIZE) if direct else None
        self._claim: Claim | None = None
        self._read_fd = -1   # the O_DIRECT descriptor of direct_reads
        if direct_reads and self.is_blockdev and not direct:
            self._read_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            self._read_lock = threading.Lock()
            self._read_bounce = mmap.mmap(-1, mmap.PAGESIZE)

    def claim_exclusive(self) -> None:
        """Own this file or device alone for as long as the store is open (a
        replication log has one writer): :class:`~dmrepl.errors.InUse` if another
        process owns it."""
        self._claim = claim_device(self.fd, self.path, self.is_blockdev)

    def _ioctl_out(self, request: int, out: struct.Struct) -> int:
        buf = fcntl.ioctl(self.fd, request, bytes(out.size))
        return int(out.unpack(buf)[0])

    @contextlib.contextmanager
    def _aligned(self, length: int) -> Iterator[memoryview]:
        """A page-aligned buffer of ``length`` bytes for O_DIRECT (one at a time)."""
        with self._lock:
            assert self._bounce is not None
            if len(self._bounce) < length:
                self._bounce.close()
                self._bounce = mmap.mmap(-1, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
            view = memoryview(self._bounce)[:length]
            try:
                yield view
            finally:
                view.release()

    # -- reads -------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        check_read(self.name, self.size, offset, length)
        if self._read_fd >= 0:
            return self._pread_direct(offset, length)
        if self._bounce is None:
            data = os.pread(self._open_fd(), length, offset)  # one call, one copy: the usual case
            if len(data) == length:
                return data
            out = bytearray(length)
            out[:len(data)] = data
            self._read_into(memoryview(out)[len(data):], offset + len(data))
            return bytes(out)
        with self._aligned(length) as view:
            self._read_into(view, offset)
            return bytes(view)

    def _pread_direct(self, offset: int, length: int) -> bytes:
        with self._read_lock:
            if self._read_fd < 0:
                raise OSError(errno.EBADF, f"{self.name}: closed")
            if len(self._read_bounce) < length:
                self._read_bounce.close()
                self._read_bounce = mmap.mmap(-1, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
            with memoryview(self._read_bounce)[:length] as view:
                self._read_into(view, offset, self._read_fd)
                return bytes(view)

    def _open_fd(self) -> int:
        """The file's descriptor; EBADF once closed (a device removed while its
        site link's copier or resync still held it: an I/O error that copier
        handles, not the ValueError os.* raises for -1)."""
        fd = self.fd
        if fd < 0:
            raise OSError(errno.EBADF, f"{self.name}: closed")
        return fd

    def _read_into(self, view: memoryview, offset: int, fd: int | None = None) -> None:
        fd = self._open_fd() if fd is None else fd
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:  # the file shrank under us
                raise OSError(errno.EIO, f"short read at {offset + done} of {self.path}")
            done += n

    # -- writes ------------------------------------------------------------------

    def pwrite(self, offset: int, data: Buffer) -> None:
        if self._bounce is not None:
            self.pwritev(offset, [data])
            return
        # one buffer through the page cache (every copy a site link applies):
        # one call, no list, no generator
        length = len(data)
        check_write(self.name, self.size, offset, length)
        n = os.pwrite(self._open_fd(), data, offset)
        if n != length:
            self._writev_all(offset + n, [memoryview(data)[n:]], length - n, 0)

    def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None:
        self._writev(offset, bufs, 0)

    def pwritev_durable(self, offset: int, bufs: Sequence[Buffer]) -> None:
        """Write and make just this range durable in one system call (``RWF_DSYNC``:
        no second call, no whole-file flush).  Where the file system refuses the
        flag, a write and an fdatasync."""
        if self._dsync:
            try:
                if self._writev(offset, bufs, os.RWF_DSYNC):
                    return
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._dsync = False
                self._writev(offset, bufs, 0)
        else:
            self._writev(offset, bufs, 0)
        # the flag refused, or a short write whose rest went without it
        os.fdatasync(self._open_fd())

    def _writev(self, offset: int, bufs: Sequence[Buffer], flags: int) -> bool:
        """Write ``bufs`` at ``offset``; True if one call with ``flags`` wrote it all
        (else the rest followed without them)."""
        total = sum(len(b) for b in bufs)
        check_write(self.name, self.size, offset, total)
        if self._bounce is not None:
            with self._aligned(total) as view:
                view[:] = joined(bufs)
                return self._writev_all(offset, [view], total, flags)
        return self._writev_all(offset, bufs, total, flags)

    def _writev_all(self, offset: int, bufs: Sequence[Buffer], total: int,
                    flags: int) -> bool:
        fd = self._open_fd()
        n = os.pwritev(fd, bufs, offset, flags) if flags else os.pwritev(fd, bufs, offset)
        if n == total:
            return True
        rest = memoryview(joined(bufs))[n:] if len(bufs) > 1 else memoryview(bufs[0])[n:]
        offset += n
        while rest:  # a short write: the rest, without the flags
            done = os.pwrite(fd, rest, offset)
            rest, offset = rest[done:], offset + done
        return False

    def flush(self) -> None:
        os.fdatasync(self._open_fd())

    def trim(self, offset: int, length: int) -> None:
        check_write(self.name, self.size, offset, length)
        if not self.is_blockdev or not length:
            return  # a hint: a regular file keeps its bytes
        try:
            fcntl.ioctl(self._open_fd(), blkdev.BLKDISCARD, blkdev.RANGE.pack(offset, length))
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise  # a device without discard: still only a hint

    def grow(self, size: int) -> None:
        """Extend a regular file to ``size`` bytes (block devices cannot grow)."""
        with self._lock:
            if not self.is_blockdev and self.size < size:
                os.ftruncate(self._open_fd(), size)
                self.size = size

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)     # a file's flock goes with it
                self.fd = -1
                if self._bounce is not None:
                    self._bounce.close()
            if self._read_fd >= 0:
                with self._read_lock:   # (a read in flight holds its buffer)
                    os.close(self._read_fd)
                    self._read_fd = -1
                    self._read_bounce.close()
            if self._claim is not None:
                self._claim.release()
                self._claim = None


def open_file(url: str, *, direct_reads: bool = False) -> FileBlockIO:
    """A path, or a ``file:`` URL (``file:///dev/sdb``, ``file:/var/disk.img``);
    ``direct_reads``: see :class:`FileBlockIO`."""
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise OSError(errno.EINVAL, f"{url}: a file: URL names a local path, "
                                        f"not host {parts.netloc!r}")
        return FileBlockIO(unquote(parts.path), direct_reads=direct_reads)
    return FileBlockIO(url, direct_reads=direct_reads)
