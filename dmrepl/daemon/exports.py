"""What a device's NBD export serves: its engine device, or several back to back."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

from dmrepl.blockio import AckWait, WriteOp
from dmrepl.daemon._engine import EngineDevice
from dmrepl.daemon.tables import Line
from dmrepl.nbd.backend import Backend

SECTOR = 512


class ConcatBackend:
    """Several engine devices back to back (one per replicator-dev table line)."""

    def __init__(self, parts: list[tuple[int, int, Backend]], *,
                 left_now: bool = False) -> None:
        """``left_now``: a piece of a batch its part did not take is written by
        :meth:`write_many` itself, waiting for room (the kernel journal's drainer,
        which may leave the outcomes' waits uncalled), not by its outcome's wait
        (the export, whose waiter threads wait for room instead of its reader)."""
        self.parts = parts  # (start byte, length bytes, backend)
        self.size_bytes = sum(length for _, length, _ in parts)
        self.left_now = left_now

    def _split(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """The pieces of ``offset``+``length``: (part index, offset in the part,
        length, offset in the request)."""
        for index, (start, size, _) in enumerate(self.parts):
            lo, hi = max(offset, start), min(offset + length, start + size)
            if lo < hi:
                yield index, lo - start, hi - lo, lo - offset

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.parts[i][2].read(o, n)
                        for i, o, n, _ in self._split(offset, length))

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        for i, o, n, rel in self._split(offset, len(data)):
            # the engine wants bytes: copy only the pieces of a write across parts
            self.parts[i][2].write(o, data if n == len(data) else data[rel:rel + n], fua)

    def write_many(self, ops: Sequence[WriteOp]) -> list[AckWait | None]:
        """A batch of writes: each split at the parts' boundaries, the pieces of a
        part given to its ``write_many`` (where it has one) in the batch's order.

        Every write of the batch is taken.  A piece its part did not take (a full
        ring, a suspended device, a write it refuses) is written by the write's
        outcome, waiting, as :meth:`write` would (or raises as it would), or here
        (``left_now``): so no piece is logged twice, though a write's pieces on
        other parts are taken."""
        pieces: list[list[tuple[int, WriteOp]]] = [[] for _ in self.parts]
        for index, (offset, data, length, fua) in enumerate(ops):
            for i, o, n, rel in self._split(offset, length):
                part_data = data if data is None or n == length else data[rel:rel + n]
                pieces[i].append((index, (o, part_data, n, fua)))
        outcomes: list[AckWait | None] = [None] * len(ops)
        for (_, _, backend), part_pieces in zip(self.parts, pieces, strict=True):
            if not part_pieces:
                continue
            write_many = getattr(backend, "write_many", None)
            taken: list[AckWait | None] = \
                write_many([op for _, op in part_pieces]) if write_many is not None else []
            for (index, _), outcome in zip(part_pieces, taken, strict=False):
                if outcome is not None:
                    outcomes[index] = _then(outcomes[index], outcome)
            for index, op in part_pieces[len(taken):]:
                if self.left_now:
                    write_op(backend, op)
                else:
                    outcomes[index] = _then(outcomes[index],
                                            functools.partial(write_op, backend, op))
        return outcomes

    def flush(self) -> None:
        for _, _, b in self.parts:
            b.flush()

    def trim(self, offset: int, length: int) -> None:
        for i, o, n, _ in self._split(offset, length):
            self.parts[i][2].trim(o, n)


def _then(first: AckWait | None, then: AckWait) -> AckWait:
    """Waits for ``first`` (if any), then ``then``: a write's pieces, in order."""
    if first is None:
        return then

    def both() -> None:
        first()
        then()
    return both


def write_op(backend: Backend, op: WriteOp) -> None:
    """One write of a batch (``None`` data: a trim) that a ``write_many`` did
    not take, written through the backend's waiting ``write``/``trim``."""
    offset, data, length, fua = op
    if data is None:
        backend.trim(offset, length)
    else:
        backend.write(offset, data, fua)


def backend_of(lines: Sequence[Line], devs: Sequence[EngineDevice], *,
               journal: bool = False) -> Backend:
    """The export's backend for the engine devices of ``lines`` (sorted, tiling);
    ``journal``: their journal legs (the export is a kernel mirror's second leg)."""
    parts: list[Backend] = [dev.journal() if journal else dev for dev in devs]
    if len(parts) == 1 and lines[0].start == 0:
        return parts[0]
    return ConcatBackend([(line.start * SECTOR, line.length * SECTOR, part)
                          for line, part in zip(lines, parts, strict=True)])
