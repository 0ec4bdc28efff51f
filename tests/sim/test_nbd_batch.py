"""The NBD export's batch path: the requests of one receive served as a batch on
the connection's thread (writes through one ``write_many``), waits handed to the
waiter, FLUSH after the writes received before it; and the engine's
``write_many`` (one log append; sync site links, a full ring)."""

from __future__ import annotations

import errno
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dmrepl.blockio import AckWait, WriteOp
from dmrepl.daemon.exports import ConcatBackend
from dmrepl.nbd import Export, MemoryBackend, NbdServer
from dmrepl.nbd import _proto as p
from dmrepl.replicator import Replicator
from dmrepl.replicator.ringlog import RingLog
from dmrepl.replicator.status import replicator_status_dict
from dmrepl_testing.replicator import FakeStore, StoreSet, wait_for

BLOCK = 4096
SIZE = 1 << 20
IHAVEOPT = 0x49484156454F5054
CLIENT_FLAGS = 3            # fixed newstyle, no zeroes
GREETING_SIZE = 18          # NBDMAGIC, IHAVEOPT, handshake flags
EXPORT_REPLY_SIZE = 10      # size, transmission flags (no zeroes)
REPLY_SIZE = p.SIMPLE_REPLY_S.size


# -- a raw pipelining client -----------------------------------------------------

class Client:
    """Requests sent back to back without waiting; replies read by handle."""

    def __init__(self, path: str, export: str = "d") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        assert len(self.sock.recv(GREETING_SIZE, socket.MSG_WAITALL)) == GREETING_SIZE
        name = export.encode()
        self.sock.sendall(struct.pack(">IQII", CLIENT_FLAGS, IHAVEOPT, p.Opt.EXPORT_NAME,
                                      len(name)) + name)
        assert len(self.sock.recv(EXPORT_REPLY_SIZE, socket.MSG_WAITALL)) == \
            EXPORT_REPLY_SIZE
        self.read_lengths: dict[int, int] = {}
        self.handle = 0

    def request(self, cmd: p.Cmd, offset: int = 0, length: int = 0, data: bytes = b"",
                flags: int = 0) -> tuple[int, bytes]:
        """(handle, the bytes of the request), to send with others."""
        self.handle += 1
        if cmd == p.Cmd.READ:
            self.read_lengths[self.handle] = length
        return self.handle, p.REQUEST_S.pack(p.REQUEST_MAGIC, flags, cmd, self.handle,
                                             offset, length) + data

    def replies(self, n: int, timeout: float = 10) -> list[tuple[int, int, bytes]]:
        """The next ``n`` replies: (handle, error, data), in arrival order."""
        self.sock.settimeout(timeout)
        out = []
        for _ in range(n):
            head = self.sock.recv(REPLY_SIZE, socket.MSG_WAITALL)
            assert len(head) == REPLY_SIZE, "connection closed"
            magic, error, handle = p.SIMPLE_REPLY_S.unpack(head)
            assert magic == p.SIMPLE_REPLY_MAGIC
            data = b""
            length = self.read_lengths.pop(handle, 0)
            if length and not error:
                data = self.sock.recv(length, socket.MSG_WAITALL)
            out.append((handle, error, data))
        return out

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            return not self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True

    def close(self) -> None:
        self.sock.close()


def block(i: int) -> bytes:
    return bytes([i % 251 + 1]) * BLOCK


# -- backends --------------------------------------------------------------------

class BatchMemory(MemoryBackend):
    """A memory backend with ``write_many``: records each batch's size, takes at
    most ``take`` writes of a batch, and holds the writes at ``held`` offsets
    until ``release`` is set (their outcome: a wait)."""

    def __init__(self, size: int, take: int = 1 << 30) -> None:
        super().__init__(size)
        self.take = take
        self.batches: list[int] = []
        self.held: set[int] = set()
        self.release = threading.Event()
        self.acked: list[int] = []     # offsets of held writes, as acknowledged
        self.refused: set[int] = set()  # held writes whose acknowledgement fails
        self.one_by_one: list[int] = []   # offsets written through write()

    def write_many(self, ops: Sequence[WriteOp]) -> list[AckWait | None]:
        self.batches.append(len(ops))
        out: list[AckWait | None] = []
        for offset, data, length, _fua in ops[:self.take]:
            if data is None:
                self.trim(offset, length)
            else:
                super().write(offset, data)
            if offset in self.held:
                def wait(offset: int = offset) -> None:
                    assert self.release.wait(10)
                    if offset in self.refused:
                        raise OSError(errno.EIO, "the sync site link failed")
                    self.acked.append(offset)
                out.append(wait)
            else:
                out.append(None)
        return out

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.one_by_one.append(offset)
        super().write(offset, data, fua)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, BatchMemory, NbdServer]]:
    path = str(tmp_path / "nbd.sock")
    backend = BatchMemory(SIZE)
    with NbdServer(path) as srv:
        srv.add_export(Export("d", backend))
        yield path, backend, srv


def test_pipelined_writes_reach_the_backend_in_batches_and_reads_see_them(
        served: tuple[str, BatchMemory, NbdServer]) -> None:
    path, backend, _srv = served
    c = Client(path)
    n = 48
    wire = []
    writes, reads = {}, {}
    for i in range(n):
        h, req = c.request(p.Cmd.WRITE, i * BLOCK, BLOCK, block(i))
        writes[h] = i
        wire.append(req)
    for i in range(n):
        h, req = c.request(p.Cmd.READ, i * BLOCK, BLOCK)
        reads[h] = i
        wire.append(req)
    flush, req = c.request(p.Cmd.FLUSH)
    wire.append(req)
    c.sock.sendall(b"".join(wire))
    got = c.replies(2 * n + 1)
    c.close()
    assert sorted(h for h, _, _ in got) == sorted([*writes, *reads, flush])
    assert all(error == 0 for _, error, _ in got)
    for h, _, data in got:
        if h in reads:
            assert data == block(reads[h])     # written earlier in the pipeline
    assert sum(backend.batches) == n and not backend.one_by_one
    assert max(backend.batches) > 1            # writes of one receive: one call


def test_a_held_write_holds_neither_other_replies_nor_a_flush_before_it(
        served: tuple[str, BatchMemory, NbdServer]) -> None:
    path, backend, _srv = served
    backend.held = {0}
    c = Client(path)
    c.sock.sendall(b"".join(c.request(p.Cmd.WRITE, 0, BLOCK, block(1))[1:]))
    assert c.nothing_within(0.3)               # held: no reply yet
    h_write2, w2 = c.request(p.Cmd.WRITE, 2 * BLOCK, BLOCK, block(2))
    h_read, r = c.request(p.Cmd.READ, 4 * BLOCK, BLOCK)
    h_flush, f = c.request(p.Cmd.FLUSH)
    c.sock.sendall(w2 + r + f)
    early = c.replies(2)
    assert {h for h, _, _ in early} == {h_write2, h_read}
    assert c.nothing_within(0.3)               # the flush waits for the held write
    backend.release.set()
    late = c.replies(2)
    assert [h for h, _, _ in late] == [1, h_flush]   # the write, then the flush
    assert backend.acked == [0]
    c.close()


def test_held_writes_of_one_batch_are_answered_each_with_its_outcome_before_a_flush(
        tmp_path: Path) -> None:
    # more held writes than the waiter may have threads: none waits for a free one
    path = str(tmp_path / "nbd.sock")
    backend = BatchMemory(SIZE)
    n = 12
    backend.held = {i * BLOCK for i in range(n)}
    backend.refused = {5 * BLOCK}
    with NbdServer(path, workers=8) as srv:
        srv.add_export(Export("d", backend))
        c = Client(path)
        wire, handles = [], {}
        for i in range(n):
            h, req = c.request(p.Cmd.WRITE, i * BLOCK, BLOCK, block(i))
            handles[h] = i * BLOCK
            wire.append(req)
        h_flush, f = c.request(p.Cmd.FLUSH)
        c.sock.sendall(b"".join(wire) + f)
        assert c.nothing_within(0.3)           # all held
        # the batch's waits take one thread of the waiter, not one per write (and
        # the flush one): three if the batch came in two receives
        assert sum(t.name.startswith("nbd-io") for t in threading.enumerate()) <= 3
        backend.release.set()
        got = c.replies(n + 1)
        c.close()
    assert got[-1][:2] == (h_flush, 0)         # the flush after every write before it
    errors = {handles[h]: error for h, error, _ in got[:-1]}
    assert errors == {off: (p.ERRORS[errno.EIO] if off in backend.refused else 0)
                      for off in backend.held}
    assert sorted(backend.acked) == sorted(backend.held - backend.refused)


def test_a_flush_with_no_write_waiting_is_answered_in_its_batch(
        served: tuple[str, BatchMemory, NbdServer]) -> None:
    path, backend, _srv = served
    backend.held = {8 * BLOCK}
    c = Client(path)
    h_w, w = c.request(p.Cmd.WRITE, 0, BLOCK, block(3))
    h_f, f = c.request(p.Cmd.FLUSH)
    c.sock.sendall(w + f)
    assert [h for h, _, _ in c.replies(2)] == [h_w, h_f]
    c.close()


def test_writes_a_batch_leaves_are_written_one_by_one_and_answered(
        tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    backend = BatchMemory(SIZE, take=2)        # e.g. a full ring after two
    with NbdServer(path) as srv:
        srv.add_export(Export("d", backend))
        c = Client(path)
        wire = b"".join(c.request(p.Cmd.WRITE, i * BLOCK, BLOCK, block(i))[1]
                        for i in range(10))
        _, flush = c.request(p.Cmd.FLUSH)
        c.sock.sendall(wire + flush)
        got = c.replies(11)
        assert all(error == 0 for _, error, _ in got)
        assert got[-1][0] == 11                # the flush: after every write
        assert backend.one_by_one              # the ones not taken
        assert bytes(backend.read(0, 10 * BLOCK)) == b"".join(block(i) for i in range(10))
        c.close()


def test_a_backend_without_write_many_serves_pipelined_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    backend = MemoryBackend(SIZE)
    with NbdServer(path) as srv:
        srv.add_export(Export("d", backend))
        c = Client(path)
        wire = b"".join(c.request(p.Cmd.WRITE, i * BLOCK, BLOCK, block(i))[1]
                        for i in range(20))
        h_f, flush = c.request(p.Cmd.FLUSH)
        _, read = c.request(p.Cmd.READ, 0, 20 * BLOCK)
        c.sock.sendall(wire + flush + read)
        got = c.replies(22)
        assert all(error == 0 for _, error, _ in got)
        order = [h for h, _, _ in got]
        assert all(order.index(h_f) > order.index(w) for w in range(1, 21))
        assert backend.read(0, 20 * BLOCK) == b"".join(block(i) for i in range(20))
        c.close()


# -- an export of several lines (ConcatBackend) -------------------------------------

LINE = 2 * BLOCK


def two_lines(take: int = 1 << 30) -> tuple[ConcatBackend, BatchMemory, BatchMemory]:
    """Two lines of two blocks; the second line's backend takes ``take`` writes of
    a batch."""
    first, second = BatchMemory(LINE), BatchMemory(LINE, take=take)
    return ConcatBackend([(0, LINE, first), (LINE, LINE, second)]), first, second


def test_a_batch_across_lines_is_one_write_many_per_line_in_order() -> None:
    cat, first, second = two_lines()
    ops: list[WriteOp] = [
        (BLOCK, block(1) + block(2), 2 * BLOCK, False),   # across the boundary
        (0, block(3), BLOCK, False),
        (LINE + BLOCK, None, BLOCK, False),              # a discard, second line
        (LINE, block(4), BLOCK, True)]                    # over block(2): after it
    assert cat.write_many(ops) == [None] * len(ops)
    assert first.batches == [2] and second.batches == [3]
    assert not first.one_by_one and not second.one_by_one
    assert cat.read(0, 2 * LINE) == block(3) + block(1) + block(4) + bytes(BLOCK)


def test_pieces_a_line_leaves_are_written_by_their_outcome_and_none_twice() -> None:
    cat, first, second = two_lines(take=1)        # e.g. the second line's ring full
    first.held = {BLOCK}
    ops: list[WriteOp] = [
        (LINE + BLOCK, block(1), BLOCK, False),       # taken by the second line
        (BLOCK, block(2) + block(3), 2 * BLOCK, False),   # first: held; second: left
        (0, block(4), BLOCK, False)]                  # first line: taken
    outcomes = cat.write_many(ops)
    assert len(outcomes) == 3 and outcomes[0] is None and outcomes[2] is None
    wait = outcomes[1]
    assert wait is not None
    assert cat.read(LINE, BLOCK) == bytes(BLOCK)  # not written yet
    done = threading.Event()
    threading.Thread(target=lambda: (wait(), done.set()), daemon=True).start()
    assert not done.wait(0.3)                     # its first piece is held
    first.release.set()
    assert done.wait(10)
    assert first.acked == [BLOCK] and not first.one_by_one
    assert second.one_by_one == [0]               # the piece left: written, once
    assert cat.read(0, 2 * LINE) == block(4) + block(2) + block(3) + block(1)


def test_pipelined_writes_to_a_multi_line_export_take_the_batch_path(
        tmp_path: Path) -> None:
    cat, first, second = two_lines()
    path = str(tmp_path / "nbd.sock")
    with NbdServer(path) as srv:
        srv.add_export(Export("d", cat))
        c = Client(path)
        wire = [c.request(p.Cmd.WRITE, BLOCK, 2 * BLOCK, block(1) + block(2))[1],
                c.request(p.Cmd.WRITE, 0, BLOCK, block(3))[1],
                c.request(p.Cmd.WRITE, LINE + BLOCK, BLOCK, block(4))[1]]
        h_read, read = c.request(p.Cmd.READ, 0, 2 * LINE)
        c.sock.sendall(b"".join(wire) + read)
        got = c.replies(4)
        c.close()
    assert all(error == 0 for _, error, _ in got)
    assert dict((h, data) for h, _, data in got)[h_read] == \
        block(3) + block(1) + block(2) + block(4)
    assert sum(first.batches) == 2 and sum(second.batches) == 2
    assert not first.one_by_one and not second.one_by_one


# -- the engine's write_many -------------------------------------------------------

def replicator(slinks: str, *, log_sectors: int = 8192,
               **tuning: object) -> tuple[Replicator, StoreSet]:
    stores = StoreSet()
    stores.add(FakeStore((log_sectors + 64) * 512, name="log"))
    stores.add(FakeStore(SIZE, name="l0"))
    stores.add(FakeStore(SIZE, name="r1"))
    tuning.setdefault("retry_interval", 0.01)
    tuning.setdefault("persist_interval", 0.01)
    rep = Replicator.from_table(
        f"0 1 replicator ringbuffer 4 log 0 create {log_sectors} {slinks}",
        opener=stores.open, **tuning)
    rep.add_device(f"0 {SIZE // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                   "1 1 r1 core 2 8 nosync")
    return rep, stores


def test_write_many_is_one_log_append_and_the_ring_replays_it() -> None:
    rep, stores = replicator("blockdev 2 0 async blockdev 2 1 async")
    dev = rep.devices[0]
    rep.start()
    ops: list[WriteOp] = [(i * BLOCK, block(i), BLOCK, False) for i in range(16)]
    ops.append((16 * BLOCK, None, BLOCK, False))   # a discard: a zero entry
    before = stores.stores["log"].writes
    assert dev.write_many(ops) == [None] * len(ops)
    assert stores.stores["log"].writes - before == 1   # one write, durable
    assert dev.read(0, 17 * BLOCK) == b"".join(block(i) for i in range(16)) + bytes(BLOCK)
    assert rep.wait_drained(10)
    assert stores.stores["r1"].snapshot()[:16 * BLOCK] == \
        b"".join(block(i) for i in range(16))
    # what the batch wrote is entries the replay accepts, in order
    ring = RingLog(stores.stores["log"], rep.replog.cfg)
    ring._load()
    replayed = [(e.offset, e.length, e.zero) for e in ring.entries]
    assert replayed[-17:] == [(i * BLOCK, BLOCK, False) for i in range(16)] + \
        [(16 * BLOCK, BLOCK, True)]
    rep.close()


@pytest.mark.parametrize("refused", [
    (BLOCK + 1, block(1), BLOCK, False),         # unaligned offset
    (BLOCK, block(1)[:BLOCK - 1], BLOCK - 1, False),   # unaligned length
    (-BLOCK, block(1), BLOCK, False),            # before the start
    (SIZE, block(1), BLOCK, False),              # beyond the end
    (SIZE - BLOCK // 2, block(1), BLOCK, False),   # across the end
    (BLOCK, b"", 0, False),                      # empty
    (BLOCK, block(1)[:BLOCK // 2], BLOCK, False),  # data not of its length
], ids=["offset", "length", "negative", "beyond", "across-end", "empty", "short-data"])
def test_write_many_ends_its_prefix_at_a_write_it_refuses(refused: WriteOp) -> None:
    rep, _stores = replicator("blockdev 2 0 async blockdev 2 1 async")
    dev = rep.devices[0]
    rep.start()
    try:
        after = (2 * BLOCK, block(3), BLOCK, False)
        assert dev.write_many([(0, block(2), BLOCK, False), refused, after]) == [None]
        assert dev.read(0, 3 * BLOCK) == block(2) + bytes(2 * BLOCK)
        assert dev.write_many([refused, after]) == []
    finally:
        rep.close()


def test_write_many_under_a_sync_site_link_acknowledges_once_the_remote_has_it() -> None:
    rep, stores = replicator("blockdev 2 0 async blockdev 2 1 sync")
    dev = rep.devices[0]
    remote = stores.stores["r1"]
    rep.start()
    remote.gate.clear()
    outcomes = dev.write_many([(0, block(7), BLOCK, False), (BLOCK, block(8), BLOCK, False)])
    assert len(outcomes) == 2 and all(o is not None for o in outcomes)
    done = threading.Event()

    def acknowledge() -> None:
        for wait in outcomes:
            assert wait is not None
            wait()
        done.set()

    threading.Thread(target=acknowledge, daemon=True).start()
    assert not done.wait(0.3)                  # the remote does not have it
    assert dev.read(0, BLOCK) == block(7)      # (the log has it)
    remote.gate.set()
    assert done.wait(10)
    assert remote.snapshot()[:2 * BLOCK] == block(7) + block(8)
    rep.close()


def test_write_many_copies_locally_on_the_writers_thread_rewrites_included() -> None:
    # site link 0 (the local device) is sync: a write is acknowledged once the
    # local device has it; with the local copier idle the writer copies its own
    # batch, so the acknowledgement needs no other thread.  A rewrite overlaps a
    # copy made since the last persisted position: the writer persists the
    # position first (idempotent replay) and still copies it itself
    rep, stores = replicator("blockdev 2 0 sync blockdev 2 1 async")
    dev = rep.devices[0]
    local = stores.stores["l0"]
    rep.start()
    try:
        for generation in range(3):
            ops: list[WriteOp] = [(i * BLOCK, block(i + generation), BLOCK, False)
                                  for i in range(8)]
            assert dev.write_many(ops) == [None] * len(ops)
            assert local.snapshot()[:8 * BLOCK] == b"".join(block(i + generation)
                                                            for i in range(8))
        assert rep.wait_drained(10)
        assert stores.stores["r1"].snapshot()[:8 * BLOCK] == local.snapshot()[:8 * BLOCK]
    finally:
        rep.close()


def test_write_many_leaves_its_local_copy_to_a_busy_copier() -> None:
    rep, stores = replicator("blockdev 2 0 sync blockdev 2 1 async")
    dev = rep.devices[0]
    local = stores.stores["l0"]
    rep.start()
    try:
        local.gate.clear()   # the copier's copy of the first write hangs
        first = threading.Thread(target=dev.write, args=(0, block(1)), daemon=True)
        first.start()
        wait_for(lambda: local.in_flight > 0, "the copier is copying the first write")
        outcomes = dev.write_many([(BLOCK, block(2), BLOCK, False)])
        assert len(outcomes) == 1 and outcomes[0] is not None   # waits: not copied here
        local.gate.set()
        outcomes[0]()
        first.join(10)
        assert local.snapshot()[:2 * BLOCK] == block(1) + block(2)
    finally:
        local.gate.set()
        rep.close()


def test_writers_and_the_local_copier_lose_no_write_and_keep_each_writers_order() -> None:
    # writers' batches copied on their threads or by the copier (whichever is
    # free), each writer overwriting its own blocks again and again: the local
    # device and the remote end with each block's last version
    rep, stores = replicator("blockdev 2 0 sync blockdev 2 1 async", log_sectors=4096,
                             window_entries=16)
    dev = rep.devices[0]
    rep.start()
    writers, rounds, blocks_each = 4, 200, 8
    final: dict[int, bytes] = {}

    def writer(w: int) -> None:
        rng = random.Random(w)
        mine = [w * blocks_each + i for i in range(blocks_each)]
        for r in range(rounds):
            picked = rng.sample(mine, rng.randint(1, blocks_each))
            ops: list[WriteOp] = [(b * BLOCK, block(r * 7 + b), BLOCK, False)
                                  for b in picked]
            taken = dev.write_many(ops)
            for wait in taken:
                if wait is not None:
                    wait()
            for offset, data, _length, _fua in ops[len(taken):]:
                assert data is not None
                dev.write(offset, data)
            for b in picked:
                final[b] = block(r * 7 + b)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert rep.wait_drained(10)
        for store in ("l0", "r1"):
            image = stores.stores[store].snapshot()
            for b, data in final.items():
                assert image[b * BLOCK:(b + 1) * BLOCK] == data, (store, b)
        # every write counted out once, by whoever copied it
        for nr, link in replicator_status_dict(rep)["slinks"].items():
            assert (link["lag_writes"], link["lag_bytes"]) == (0, 0), nr
    finally:
        rep.close()


def test_write_many_takes_what_a_full_ring_holds_and_leaves_the_rest() -> None:
    rep, stores = replicator("blockdev 2 0 async blockdev 2 1 async+stall",
                             log_sectors=4096)
    dev = rep.devices[0]
    remote = stores.stores["r1"]
    remote.fail_writes = remote.fail_reads = True   # down: holds every entry (stall)
    rep.start()
    ops: list[WriteOp] = [((i % 64) * BLOCK, block(i), BLOCK, False) for i in range(1000)]
    taken = dev.write_many(ops)
    assert 0 < len(taken) < len(ops)
    assert dev.write_many(ops[len(taken):]) == []   # still full: nothing taken
    remote.fail_writes = remote.fail_reads = False
    wait_for(lambda: dev.write_many(ops[len(taken):len(taken) + 1]) != [],
             "room in the ring once the site link is back")
    rep.close()


def test_a_sync_site_link_holds_only_its_writes_replies_through_the_export(
        tmp_path: Path) -> None:
    rep, stores = replicator("blockdev 2 0 async blockdev 2 1 sync")
    dev = rep.devices[0]
    remote = stores.stores["r1"]
    rep.start()
    dev.write(8 * BLOCK, block(5))
    path = str(tmp_path / "nbd.sock")
    with NbdServer(path) as srv:
        srv.add_export(Export("d", dev))
        c = Client(path)
        remote.gate.clear()
        h_w, w = c.request(p.Cmd.WRITE, 0, BLOCK, block(9))
        h_r, r = c.request(p.Cmd.READ, 8 * BLOCK, BLOCK)
        started = time.monotonic()
        c.sock.sendall(w + r)
        first = c.replies(1)
        assert first == [(h_r, 0, block(5))]   # the read, while the write waits
        assert c.nothing_within(0.2)
        remote.gate.set()
        assert c.replies(1) == [(h_w, 0, b"")]
        assert time.monotonic() - started >= 0.2
        assert remote.snapshot()[:BLOCK] == block(9)
        c.close()
    rep.close()
