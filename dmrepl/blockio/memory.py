"""A block store in memory: tests, simulations, the NBD protocol tests.

With ``volatile_cache`` it models a device's write cache: writes land in ``data``
(what reads see), ``flush`` and durable writes copy to ``durable``, and
:meth:`MemoryBlockIO.crash` returns the store a power failure leaves.  With
``direct`` it refuses unaligned I/O as ``O_DIRECT`` on a real device does.
Test doubles with latency and fault injection build on it
(:class:`dmrepl_testing.replicator.FakeStore`, in the test harness).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from dmrepl.blockio._compat import CompatNames
from dmrepl.blockio._range import Buffer, check_aligned, check_read, check_write, joined


class MemoryBlockIO(CompatNames):
    concurrent_writes = False

    def __init__(self, size: int, *, data: Buffer | None = None, name: str = "mem",
                 logical_block_size: int = 512, direct: bool = False,
                 volatile_cache: bool = False) -> None:
        self.name = name
        self.size = size
        self.logical_block_size = logical_block_size
        self.direct = direct
        self.data = bytearray(size)
        if data is not None:
            self.data[:len(data)] = bytes(data[:size])
        # Without a volatile cache every write is durable: one buffer serves both.
        self.durable = bytearray(self.data) if volatile_cache else self.data
        self.volatile_cache = volatile_cache
        self.flushes = 0
        self.durable_writes = 0
        self.closed = False
        self._lock = threading.Lock()

    def _check(self, offset: int, length: int) -> None:
        if self.direct:
            check_aligned(self.name, self.logical_block_size, offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        check_read(self.name, self.size, offset, length)
        with self._lock:
            return bytes(self.data[offset:offset + length])

    def pwrite(self, offset: int, data: Buffer) -> None:
        self.store(offset, data, durable=False)

    def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None:
        self.pwrite(offset, joined(bufs))

    def pwritev_durable(self, offset: int, bufs: Sequence[Buffer]) -> None:
        self.store(offset, joined(bufs), durable=True)

    def store(self, offset: int, data: Buffer, *, durable: bool) -> None:
        """The write itself, after the checks: what subclasses adding latency or
        faults call once they let a write through."""
        self._check(offset, len(data))
        check_write(self.name, self.size, offset, len(data))
        with self._lock:
            self.data[offset:offset + len(data)] = data
            if durable:
                self.durable[offset:offset + len(data)] = data
                self.durable_writes += 1

    def flush(self) -> None:
        with self._lock:
            if self.volatile_cache:
                self.durable[:] = self.data
            self.flushes += 1

    def trim(self, offset: int, length: int) -> None:
        check_write(self.name, self.size, offset, length)  # a hint: the data stays

    def close(self) -> None:
        self.closed = True

    def snapshot(self) -> bytes:
        """The content reads see now."""
        with self._lock:
            return bytes(self.data)

    def crash(self) -> MemoryBlockIO:
        """A new store holding what a power failure leaves: the durable bytes."""
        with self._lock:
            durable = bytes(self.durable)
        return MemoryBlockIO(self.size, data=durable, name=self.name,
                             logical_block_size=self.logical_block_size,
                             direct=self.direct, volatile_cache=self.volatile_cache)
