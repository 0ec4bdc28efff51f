"""What a device's NBD export serves: its engine device, or several back to back."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from dmrepl.daemon._engine import EngineDevice
from dmrepl.daemon.tables import Line
from dmrepl.nbd.backend import Backend

SECTOR = 512


class ConcatBackend:
    """Several engine devices back to back (one per replicator-dev table line)."""

    def __init__(self, parts: list[tuple[int, int, Backend]]) -> None:
        self.parts = parts  # (start byte, length bytes, backend)
        self.size_bytes = sum(length for _, length, _ in parts)

    def _split(self, offset: int, length: int) -> Iterator[tuple[Backend, int, int, int]]:
        for start, size, backend in self.parts:
            lo, hi = max(offset, start), min(offset + length, start + size)
            if lo < hi:
                yield backend, lo - start, hi - lo, lo - offset

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(b.read(o, n) for b, o, n, _ in self._split(offset, length))

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        for b, o, n, rel in self._split(offset, len(data)):
            # the engine wants bytes: copy only the pieces of a write across parts
            b.write(o, data if n == len(data) else data[rel:rel + n], fua)

    def flush(self) -> None:
        for _, _, b in self.parts:
            b.flush()

    def trim(self, offset: int, length: int) -> None:
        for b, o, n, _ in self._split(offset, length):
            b.trim(o, n)


def backend_of(lines: Sequence[Line], devs: Sequence[EngineDevice], *,
               journal: bool = False) -> Backend:
    """The export's backend for the engine devices of ``lines`` (sorted, tiling);
    ``journal``: their journal legs (the export is a kernel mirror's second leg)."""
    parts: list[Backend] = [dev.journal() if journal else dev for dev in devs]
    if len(parts) == 1 and lines[0].start == 0:
        return parts[0]
    return ConcatBackend([(line.start * SECTOR, line.length * SECTOR, part)
                          for line, part in zip(lines, parts, strict=True)])
