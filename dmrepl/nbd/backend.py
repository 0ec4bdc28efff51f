"""What an NBD export serves: anything with ``size_bytes``, read, write, flush, trim.

:class:`dmrepl.replicator.ReplicatedDevice` fits this protocol as it is;
:class:`FileBackend` serves a plain file or block device (tests, benchmarks).
"""

from __future__ import annotations

import os
import threading
from typing import Protocol


class Backend(Protocol):
    size_bytes: int

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...
    def flush(self) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...


class FileBackend:
    """A file or block device; ``fua`` is an fdatasync after the write."""

    def __init__(self, path: str, size: int | None = None) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        end = os.lseek(self._fd, 0, os.SEEK_END)
        self.size_bytes = end if size is None else size
        if size is not None and end < size:
            os.ftruncate(self._fd, size)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def trim(self, offset: int, length: int) -> None:
        # A hint only: nothing to do for a plain file.
        del offset, length

    def close(self) -> None:
        os.close(self._fd)


class MemoryBackend:
    """A bytearray; for protocol tests."""

    def __init__(self, size: int) -> None:
        self.size_bytes = size
        self.data = bytearray(size)
        self.flushes = 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        with self._lock:
            self.data[offset:offset + len(data)] = data
            if fua:
                self.flushes += 1

    def flush(self) -> None:
        with self._lock:
            self.flushes += 1

    def trim(self, offset: int, length: int) -> None:
        del offset, length
