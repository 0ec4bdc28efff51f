"""Fakes for testing the replicator (and what is built on it): in-memory block
stores that delay, fail on demand, and record every write in one global order.

The recorder models what survives a crash: per store, writes before that store's
last ``flush`` are durable; later ones may each be lost, applied, or torn at
sector granularity (:meth:`Recorder.crash_image`).
"""

from __future__ import annotations

import contextlib
import errno
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from dmrepl.blockio import MemoryBlockIO
from dmrepl.crc import crc32c
from dmrepl.replicator import ondisk

SECTOR = 512

# how a crash leaves the unflushed writes of a store (see Recorder.crash_image)
TEARS = ("random", "lost", "applied", "torn-head", "torn-tail", "torn-alternate")


@dataclass(frozen=True, slots=True)
class Op:
    store: str
    kind: str  # "write" | "flush" | "mark"
    offset: int = 0
    data: bytes = b""
    note: object = None
    durable: bool = False  # a write durable on its own (pwritev_durable: RWF_DSYNC)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll ``cond`` (1 ms) until it is true; AssertionError naming ``what`` after
    ``timeout`` seconds.  For tests driving an engine whose threads run on."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def run_with_deadline(fn: Callable[[], None], what: str, timeout: float = 30.0) -> None:
    """Run ``fn`` in a thread; fail naming ``what`` (instead of hanging) if it is not
    done in ``timeout`` seconds; its exception is re-raised here."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # re-raised in the caller below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{what}: still blocked after {timeout} s"
    if errors:
        raise errors[0]


class Recorder:
    """A global, ordered log of writes and flushes to named stores."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: list[Op] = []

    def mark(self, note: object) -> None:
        """Record an event (e.g. a write acknowledgement) in the same order."""
        with self.lock:
            self.ops.append(Op("", "mark", note=note))

    def image(self, name: str, size: int, cut: int, base: bytes | None = None) -> bytearray:
        """The store's content after ops[:cut], all applied (no crash)."""
        img = bytearray(base if base is not None else bytes(size))
        for op in self.ops[:cut]:
            if op.store == name and op.kind == "write":
                img[op.offset:op.offset + len(op.data)] = op.data
        return img

    def crash_image(self, name: str, size: int, cut: int, rng: random.Random,
                    base: bytes | None = None, tear: str = "random") -> bytearray:
        """The store's content after a crash at ``cut``: durable writes (followed by a
        flush, or durable on their own) plus the unflushed ones as ``tear`` says
        (one of :data:`TEARS`): ``random``, each lost, applied, or torn by sectors
        at random; ``lost``, none; ``applied``, all; ``torn-head``, all but the last,
        whose first sector alone arrived; ``torn-tail``, all but the last, which lost
        its first sector; ``torn-alternate``, all but the last two, whose odd
        sectors were lost."""
        if tear not in TEARS:
            raise ValueError(f"tear {tear!r} is not one of {TEARS}")
        ops = [op for op in self.ops[:cut] if op.store == name]
        last_flush = max((i for i, op in enumerate(ops) if op.kind == "flush"), default=-1)
        img = bytearray(base if base is not None else bytes(size))
        pending = [op for i, op in enumerate(ops)
                   if op.kind == "write" and not (i < last_flush or op.durable)]
        torn = {"torn-head": 1, "torn-tail": 1, "torn-alternate": 2}.get(tear, 0)
        last = {id(op) for op in pending[len(pending) - torn:]} if torn else set()
        for i, op in enumerate(ops):
            if op.kind != "write":
                continue
            if i < last_flush or op.durable:
                img[op.offset:op.offset + len(op.data)] = op.data
                continue
            if tear == "random":
                keep = self._random_sectors(op, rng)
            elif tear == "lost":
                keep = []
            elif id(op) not in last:
                keep = list(range(0, len(op.data), SECTOR))
            elif tear == "torn-head":
                keep = [0]
            elif tear == "torn-tail":
                keep = list(range(SECTOR, len(op.data), SECTOR))
            else:
                keep = list(range(0, len(op.data), 2 * SECTOR))
            for s in keep:
                img[op.offset + s:op.offset + s + SECTOR] = op.data[s:s + SECTOR]
        return img

    @staticmethod
    def _random_sectors(op: Op, rng: random.Random) -> list[int]:
        """Sectors of an unflushed write that a crash left: none, all, or a random
        choice (one rng draw for the fate, one per sector when torn)."""
        fate = rng.randrange(3)
        if fate == 0:
            return []
        if fate == 1:
            return list(range(0, len(op.data), SECTOR))
        return [s for s in range(0, len(op.data), SECTOR) if rng.random() < 0.5]


class FakeStore(MemoryBlockIO):
    """A :class:`MemoryBlockIO` with latency, fault injection and recording."""

    def __init__(self, size: int, *, name: str = "mem", data: bytes | None = None,
                 recorder: Recorder | None = None,
                 delay: Callable[[], float] | None = None) -> None:
        super().__init__(size, data=data, name=name)
        self.recorder = recorder
        self.delay = delay
        # a store with latency stands for a remote site: the copiers send it
        # several writes at once (see BlockIO)
        self.concurrent_writes = delay is not None
        self.fail_writes = False
        self.fail_reads = False
        self.gate = threading.Event()  # cleared: writes block until set
        self.gate.set()
        self.lock = threading.Lock()  # the counters below
        self.writes = 0
        self.in_flight = 0  # pwrite calls under way now
        self.max_in_flight = 0  # most pwrite calls seen under way at once
        # the harness's hooks on every write that reaches the store (``pwrite`` and
        # ``pwritev_durable``), in the writing thread: ``before_write(offset)`` first,
        # before the latency, the gate and any injected fault (it sees every attempt);
        # ``on_write(offset, data)`` once the write is stored
        self.before_write: Callable[[int], None] | None = None
        self.on_write: Callable[[int, bytes], None] | None = None

    def _io_error(self, what: str) -> OSError:
        return OSError(errno.EIO, f"{self.name}: injected {what} error")

    def pread(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            raise self._io_error("read")
        return super().pread(offset, length)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self.lock:
                self.in_flight -= 1

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._in_flight():
            self._pwrite(offset, data)

    def pwritev_durable(self, offset: int,
                        bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        """A write durable when it returns (the log's lone-writer path)."""
        with self._in_flight():
            self._pwrite(offset, b"".join(bytes(b) for b in bufs), durable=True)

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview,
                durable: bool = False) -> None:
        """The hooks, latency, the gate, injected faults, then the write, recorded."""
        if self.before_write is not None:
            self.before_write(offset)
        if self.delay is not None:
            d = self.delay()
            if d > 0:
                time.sleep(d)  # simulated device latency
        self.gate.wait()
        if self.fail_writes:
            raise self._io_error("write")
        b = bytes(data)
        rec = self.recorder
        if rec is not None:
            with rec.lock:
                self.store(offset, b, durable=durable)
                rec.ops.append(Op(self.name, "write", offset, b, durable=durable))
        else:
            self.store(offset, b, durable=durable)
        with self.lock:
            self.writes += 1
        if self.on_write is not None:
            self.on_write(offset, b)

    def flush(self) -> None:
        if self.fail_writes:
            raise self._io_error("flush")
        if self.recorder is not None:
            with self.recorder.lock:
                self.recorder.ops.append(Op(self.name, "flush"))
        super().flush()


class StoreSet:
    """An opener over named FakeStores (``opener=stores.open``)."""

    def __init__(self) -> None:
        self.stores: dict[str, FakeStore] = {}

    def add(self, store: FakeStore) -> FakeStore:
        self.stores[store.name] = store
        return store

    def open(self, path: str) -> FakeStore:
        try:
            store = self.stores[path]
        except KeyError:
            raise OSError(errno.ENOENT, f"no such device {path}") from None
        store.closed = False
        return store


def history_from_ring(recorder: Recorder, log_name: str, log_id: int | None = None,
                      base: int = 0) -> list[tuple[int, int, bytes]]:
    """Rebuild the write history (dev, offset, data) in log order from the recorded
    writes to the log store, by parsing the entry headers written there.

    An entry is one write (header + data), or, for large entries, a header write
    and a data write at the next sector (in either order: they are issued
    together); the data write taken is the one nearest to the header's whose CRC
    matches it."""
    ops = [(i, op) for i, op in enumerate(recorder.ops)
           if op.store == log_name and op.kind == "write" and len(op.data) >= SECTOR]
    by_offset: dict[int, list[tuple[int, bytes]]] = {}
    for i, op in ops:
        by_offset.setdefault(op.offset, []).append((i, op.data))
    found: dict[int, tuple[int, int, bytes]] = {}
    for i, op in ops:
        try:
            h = ondisk.EntryHeader.parse(op.data[:SECTOR])
        except Exception:
            continue
        v = h.body.value
        if log_id is not None and v.log_id != log_id:
            continue
        if v.flags & ondisk.ENTRY_FLAG_ZERO:
            data = bytes(v.length)
        elif len(op.data) >= SECTOR + v.length:
            data = bytes(op.data[SECTOR:SECTOR + v.length])
        else:
            candidates = sorted(by_offset.get(op.offset + SECTOR, ()),
                                key=lambda c: abs(c[0] - i))
            for _j, raw in candidates:
                if len(raw) >= v.length and crc32c(raw[:v.length]) == v.data_crc:
                    data = bytes(raw[:v.length])
                    break
            else:
                continue  # its data was never written: a torn entry
        found[v.seq] = (v.dev, v.offset, data)
    return [found[s] for s in sorted(found)]


class PrefixChecker:
    """Checks that a sequence of multi-device states are prefix states of a history.

    ``history`` is [(dev, offset, data)] in log order; ``devs`` maps dev -> size.

    ``need`` relaxes the order for writes that may be applied in any order (DRBD
    style epochs): entry ``t`` may be applied once every entry before ``need[t]``
    is (``need[t] <= t``, non-decreasing).  A valid state is then the entries ``[0, j)`` plus any
    subset of the entries ``t >= j`` with ``need[t] <= j``, applied in log order.
    Without ``need`` (``need[t] == t``) only the strict prefixes are valid.  The
    subset is found from the state itself: an entry counts as applied when the
    state holds its data on the bytes no later candidate also writes."""

    def __init__(self, history: list[tuple[int, int, bytes]], devs: dict[int, int],
                 initial: dict[int, bytes] | None = None,
                 need: list[int] | None = None) -> None:
        self.history = history
        self.state = {d: bytearray(initial[d] if initial else bytes(n))
                      for d, n in devs.items()}
        self.need = need
        if need is not None:
            assert len(need) >= len(history) and all(
                0 <= need[t] <= t and (t == 0 or need[t - 1] <= need[t])
                for t in range(len(history))), "bad need list"
        self.j = 0  # states[j] = after history[:j]

    def _advance(self) -> None:
        dev, off, data = self.history[self.j]
        if dev in self.state:
            self.state[dev][off:off + len(data)] = data
        self.j += 1

    def _relaxed(self, remote: dict[int, bytes | bytearray]) -> bool:
        """Does ``remote`` equal prefix j plus a subset of the free entries?"""
        need = self.need
        assert need is not None
        j, hist = self.j, self.history
        cands = []
        for t in range(j, len(hist)):
            if need[t] > j:
                break  # need is non-decreasing: no later entry is free either
            cands.append(t)
        if not cands:
            return False
        trial = {d: bytearray(b) for d, b in self.state.items()}
        for k, t in enumerate(cands):
            dev, off, data = hist[t]
            if dev not in trial:
                continue
            # bytes of t that no later candidate on the same device writes
            end = off + len(data)
            covered = sorted((max(off, o2), min(end, o2 + len(x2)))
                             for d2, o2, x2 in (hist[u] for u in cands[k + 1:])
                             if d2 == dev and o2 < end and off < o2 + len(x2))
            free, pos = [], off
            for lo, hi in covered:
                if lo > pos:
                    free.append((pos, lo))
                pos = max(pos, hi)
            if pos < end:
                free.append((pos, end))
            have = remote[dev]
            if not free:
                free = [(off, end)]
            applied = all(have[lo:hi] == data[lo - off:hi - off] for lo, hi in free)
            if applied:
                trial[dev][off:off + len(data)] = data
        return all(trial[d] == remote[d] for d in trial)

    def match(self, remote: dict[int, bytes | bytearray]) -> int:
        """Advance to the first valid state equal to ``remote``; return its prefix
        length, or raise AssertionError if no valid state from the current one
        matches."""
        while True:
            if all(self.state[d] == remote[d] for d in self.state):
                return self.j
            if self.need is not None and self._relaxed(remote):
                return self.j
            if self.j >= len(self.history):
                raise AssertionError("remote state is not a prefix of the write history "
                                     f"(checked up to {self.j} writes)")
            self._advance()


def need_from_epochs(bounds: list[int], n: int, first_seq: int = 1) -> list[int]:
    """``need`` for :class:`PrefixChecker` from epoch boundaries (the last sequence
    number of each epoch, ascending) over a history of ``n`` entries starting at
    ``first_seq``: an entry needs every entry of the earlier epochs.  Entries past
    the last boundary are one epoch each."""
    need = []
    start = 0
    bi = 0
    for t in range(n):
        seq = first_seq + t
        while bi < len(bounds) and bounds[bi] < seq:
            start = bounds[bi] - first_seq + 1
            bi += 1
        need.append(max(0, min(start, t)) if bi < len(bounds) else t)
    return need
