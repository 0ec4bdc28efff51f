"""What an NBD export serves: anything with ``size_bytes``, read, write, flush, trim.

:class:`dmrepl.replicator.ReplicatedDevice` fits this protocol as it is; files,
block devices and memory are served by :mod:`dmrepl.blockio`'s implementations
through their compatibility names (``size_bytes``, ``read``, ``write(fua=)``).
``Backend`` becomes :class:`dmrepl.blockio.BlockIO` once the server and the
replicated device speak its names (``size``, ``pread``, ``pwrite``...).
"""

from __future__ import annotations

from typing import Protocol

from dmrepl.blockio import FileBlockIO, MemoryBlockIO


class Backend(Protocol):
    @property
    def size_bytes(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...
    def flush(self) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...


# Compatibility names (callers still use them); remove once callers move to blockio.
FileBackend = FileBlockIO
MemoryBackend = MemoryBlockIO
