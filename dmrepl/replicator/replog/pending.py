"""The pending-write index: logged entries not yet on the local devices.

Reads overlay these entries on what the local device returns, and resync skips
regions they touch (the local copy is not there yet).  Entries are kept by device
and by 1 MiB bucket so that a lookup looks only at the buckets it touches (as
DRBD's ``drbd_interval`` tree of requests in flight, flatter).

Not thread-safe: the replicator's lock guards it (every caller holds it).
"""

from __future__ import annotations

from dmrepl.replicator.ringlog import Entry

INDEX_BUCKET = 1 << 20  # bytes per bucket of the pending-entry index


def _buckets(e: Entry) -> range | tuple[int]:
    first = e.offset // INDEX_BUCKET
    last = (max(e.offset + e.length, e.offset + 1) - 1) // INDEX_BUCKET
    # (most writes fall in one bucket: no range to make and walk)
    return (first,) if last == first else range(first, last + 1)


class PendingIndex:
    """Entries by device and bucket; lookups in log order."""

    __slots__ = ("_index",)

    def __init__(self) -> None:
        self._index: dict[int, dict[int, dict[int, Entry]]] = {}

    def add(self, e: Entry) -> None:
        buckets = self._index.setdefault(e.dev, {})
        for b in _buckets(e):
            buckets.setdefault(b, {})[e.seq] = e

    def drop(self, e: Entry) -> None:
        buckets = self._index.get(e.dev)
        if buckets is None:
            return
        for b in _buckets(e):
            bucket = buckets.get(b)
            if bucket is not None:
                bucket.pop(e.seq, None)
                if not bucket:
                    del buckets[b]

    def overlapping(self, dev_nr: int, lo: int, hi: int, applied: int) -> list[Entry]:
        """Entries overlapping [lo, hi) of a device with a sequence number above
        ``applied`` (the local site link's position), in log order."""
        buckets = self._index.get(dev_nr)
        if not buckets or hi <= lo:
            return []
        found: dict[int, Entry] = {}
        for b in range(lo // INDEX_BUCKET, (hi - 1) // INDEX_BUCKET + 1):
            bucket = buckets.get(b)
            if not bucket:
                continue
            for seq, e in bucket.items():
                if seq > applied and e.offset < hi and lo < e.end:
                    found[seq] = e
        return [found[k] for k in sorted(found)]

    def count(self, dev_nr: int) -> int:
        """Entries of a device still indexed (an entry spanning buckets counts once)."""
        seqs: set[int] = set()
        for bucket in self._index.get(dev_nr, {}).values():
            seqs.update(bucket)
        return len(seqs)
