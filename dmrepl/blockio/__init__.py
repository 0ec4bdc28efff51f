"""One block-I/O surface: what the engine, the NBD server and the dirty logs read
and write (a replication log, local and remote devices, an export, a log device).

:class:`BlockIO` is the protocol; :class:`FileBlockIO` (``file.py``) serves
regular files and block devices, :class:`MemoryBlockIO` (``memory.py``) a
bytearray (tests, simulations).  The NBD client (:class:`dmrepl.nbd.client.NbdStore`)
is the third kind, a remote site.  :func:`open_store` picks the kind from a path or
URL (``opener.py``): a path or ``file:`` URL is a file, ``nbd://`` and
``nbd+unix://`` the NBD client.

Contract (``tests/unit/test_blockio.py`` runs it against every implementation):

* ``size`` bytes, addressed ``[0, size)``.  A read inside returns exactly
  ``length`` bytes; a read reaching past ``size`` fails with ``OSError(EIO)``
  (a short read, reported), a write reaching past it with ``OSError(ENOSPC)``.
* ``pwrite``/``pwritev`` land in the device's cache; ``flush`` makes everything
  written before it durable.  ``pwritev_durable`` is a write that is durable when
  it returns (``RWF_DSYNC``, NBD ``FUA``), so a lone log write needs no flush.
* ``trim`` is a hint: the range's content is undefined afterwards.
* ``logical_block_size`` is the unit ``direct`` (``O_DIRECT``) I/O must align to;
  ``name`` is what status shows (``major:minor`` for a block device).
* ``concurrent_writes``: the caller may keep several writes in flight on it (a
  remote site with latency); otherwise one at a time is as fast.

Failures raise ``OSError``.  The files' and memory's ``read``/``write``/
``size_bytes`` are the NBD export and dirty-log names of the same calls, kept for
callers that still use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from dmrepl.blockio._range import Buffer
from dmrepl.blockio.file import FileBlockIO, open_file
from dmrepl.blockio.memory import MemoryBlockIO
from dmrepl.blockio.opener import (
    SCHEMES,
    UnknownScheme,
    open_store,
    open_store_beside_the_kernel,
)


@runtime_checkable
class BlockIO(Protocol):
    name: str
    size: int
    logical_block_size: int
    concurrent_writes: bool

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: Buffer) -> None: ...

    def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None: ...

    def pwritev_durable(self, offset: int, bufs: Sequence[Buffer]) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


#: Path or URL -> an open store (the engine's device opener).
Opener = Callable[[str], BlockIO]

#: One write of a batch (an NBD backend's ``write_many``): offset, data (None:
#: zeros, a discard), length, FUA.
WriteOp = tuple[int, bytes | None, int, bool]
#: Returns once a write of a batch is acknowledged (raises if it cannot be).
AckWait = Callable[[], None]

__all__ = [
    "SCHEMES",
    "AckWait",
    "BlockIO",
    "Buffer",
    "FileBlockIO",
    "MemoryBlockIO",
    "Opener",
    "UnknownScheme",
    "WriteOp",
    "open_file",
    "open_store",
    "open_store_beside_the_kernel",
]
