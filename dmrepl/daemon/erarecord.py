"""Which blocks a kernel journal's device wrote, by era: a dm ``era`` device
between its ``log-writes`` target and the local device.

The kernel journal (:mod:`dmrepl.daemon.kjournal`) can lose writes: a segment
that filled up, a crash before its log reached the segment.  Without a record of
where those writes went, the remote site links had to resynchronise the whole
device.  ``era`` commits, before the first write to a block in an era goes
down, that the block was written in that era (:mod:`dmrepl.dm.era`).  The
journal starts a new era at every segment swap and keeps, for each segment it
has not drained, the era that was current when the segment began: what a lost
segment held is then among the blocks written since its era, and only those are
resynchronised.

The era device is ``/dev/mapper/.NAME.era`` (a name no dmrepl device can have:
they do not start with a dot); its metadata is ``NAME.era`` in the journal's
directory, on a loop device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from dmrepl.daemon import _kernel
from dmrepl.dm import era as fmt

log = logging.getLogger(__name__)

#: Sectors of the local device per era block: the resync's granularity (the
#: mirror's region size; smaller blocks cost a metadata commit more often).
BLOCK_SECTORS = 8192


@dataclass
class EraRecord:
    """The era device under one kernel journal."""

    name: str
    sectors: int
    local: str
    directory: str

    @property
    def dm_name(self) -> str:
        return f".{self.name}.era"

    @property
    def metadata(self) -> str:
        return os.path.join(self.directory, f"{self.name}.era")

    @property
    def usable(self) -> bool:
        """Can the device have one (its era device's name fits dm's limit)?"""
        from dmrepl.dm.ioctl import check_name
        from dmrepl.errors import UserError
        try:
            check_name(self.dm_name)
        except UserError:
            return False
        return True

    def metadata_bytes(self) -> int:
        blocks = -(-self.sectors // BLOCK_SECTORS)
        # the era array (4 bytes a block), two live writesets and archived ones
        # waiting to be digested, each version copied on write: generously
        return (8 << 20) + 16 * blocks

    def live_devno(self) -> str | None:
        """``major:minor`` of the era device, None if it is not there."""
        return _kernel.mapper_devno(self.dm_name)

    def open(self) -> str:
        """The era device over the local device (made on the existing metadata,
        or taken over from a dead daemon); returns its path."""
        loop, _made = _kernel.attach_file_loop(self.metadata, self.metadata_bytes())
        if self.live_devno() is not None:
            return f"/dev/mapper/{self.dm_name}"
        return _kernel.create_era(self.dm_name, self.sectors, loop, self.local, BLOCK_SECTORS)

    def current_era(self) -> int:
        status = _kernel.era_status(self.dm_name)
        if status is None:
            raise _kernel.KernelDeviceError(f"{self.dm_name}: no era target")
        return int(status.current_era)

    def checkpoint(self) -> int:
        """Start a new era; returns the era current before it."""
        before = self.current_era()
        _kernel.era_message(self.dm_name, "checkpoint")
        return before

    def _read(self, fd: int) -> fmt.ReadBlock:
        def read_block(number: int) -> bytes:
            return os.pread(fd, fmt.BLOCK_SIZE, number * fmt.BLOCK_SIZE)
        return read_block

    def written_since(self, era: int) -> list[tuple[int, int]]:
        """(offset, length) in bytes of the blocks written in ``era`` or later: by
        a metadata snapshot of the live device, or by the metadata as committed
        when there is no device (after a crash).  Raises EraFormatError (the
        metadata unreadable) or KernelDeviceError."""
        live = self.live_devno() is not None
        if live:
            # (one a dead daemon left held would refuse a new one)
            status = _kernel.era_status(self.dm_name)
            if status is not None and status.snapshot is not None:
                _kernel.era_message(self.dm_name, "drop_metadata_snap")
            _kernel.era_message(self.dm_name, "take_metadata_snap")
        try:
            fd = os.open(self.metadata, os.O_RDONLY)
            try:
                block_sectors, blocks = fmt.written_since(self._read(fd), era, snapshot=live)
            finally:
                os.close(fd)
        finally:
            if live:
                _kernel.era_message(self.dm_name, "drop_metadata_snap")
        return [(start * 512, length * 512)
                for start, length in fmt.ranges(blocks, block_sectors, self.sectors)]

    def close(self, *, keep: bool) -> None:
        """Remove the era device (after the journal's device is gone) and detach
        its metadata (``keep``: the file stays)."""
        _kernel.remove_mapper(self.dm_name)
        _kernel.detach_file_loop(self.metadata, delete=not keep)
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.metadata)
