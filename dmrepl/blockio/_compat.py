"""The NBD export's and the dirty log's names for BlockIO's calls, kept for their
callers (``Backend``, ``Storage``) until those use ``size``/``pread``/``pwrite``:
remove then."""

from __future__ import annotations

from collections.abc import Sequence

from dmrepl.blockio._range import Buffer


class CompatNames:
    size: int

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, offset: int, data: Buffer) -> None:
        raise NotImplementedError

    def pwritev_durable(self, offset: int, bufs: Sequence[Buffer]) -> None:
        raise NotImplementedError

    @property
    def size_bytes(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        return self.pread(offset, length)

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if fua:
            self.pwritev_durable(offset, [data])
        else:
            self.pwrite(offset, data)
