"""Several copies in flight per site link, one epoch at a time.

An epoch is what one log flush made durable: writes in flight together at the
primary.  A site link may apply the copies of one epoch in any order (they are in
flight together, up to ``copy_inflight``), but never starts a copy of the next
epoch before every copy of the current one completed.
"""

from __future__ import annotations

import functools
import random
import threading
from dataclasses import replace

import pytest

from dmrepl.replicator import Replicator
from dmrepl_testing.replicator import (
    FakeStore,
    PrefixChecker,
    Recorder,
    StoreSet,
    history_from_ring,
    need_from_epochs,
)

DEV = 1 << 20


def wait_slink_1_down(rep: Replicator) -> dict:
    """Site link 1's status once it is no longer up (or after ~20 s of events)."""
    ev = 0
    for _ in range(200):
        if rep.status_dict()["slinks"][1]["state"] != "up":
            break
        ev = rep.wait_event(ev, 0.1)
    return rep.status_dict()["slinks"][1]


def make(*, durable_acks: bool = True, delay=None, copy_inflight: int = 8,
         rec: Recorder | None = None):
    stores = StoreSet()
    stores.add(FakeStore((8192 + 64) * 512, name="log", recorder=rec))
    stores.add(FakeStore(DEV, name="l0", recorder=rec))
    remote = stores.add(FakeStore(DEV, name="r0", delay=delay, recorder=rec))
    rep = Replicator.from_table(
        "0 1 replicator ringbuffer 4 log 0 create 8192 blockdev 2 0 async "
        "blockdev 2 1 async", opener=stores.open, durable_acks=durable_acks,
        copy_inflight=copy_inflight, persist_interval=0.01, retry_interval=0.01)
    dev = rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                         "1 1 r0 core 2 8 nosync")
    return rep, dev, stores, remote


def block(i: int) -> bytes:
    return bytes([i % 251 + 1]) * 4096


def test_epochs_never_overlap_across_acknowledged_writes() -> None:
    """Each write is acknowledged (durable) before the next is submitted, so each
    is its own epoch and the remote must apply them strictly in order.  The remote
    holds the first copy until every write is logged (so the copier then finds
    them all at once) and delays every other write: had two epochs been in flight
    together, the undelayed later write would land first."""
    delayed: set[int] = set()
    rep, dev, _stores, remote = make(copy_inflight=8)
    order: list[int] = []
    lock = threading.Lock()
    current = threading.local()

    def slow() -> float:
        return 0.02 if getattr(current, "slow", False) else 0.0

    def before_write(offset: int) -> None:
        current.slow = offset // 4096 in delayed

    def on_write(offset: int, data: bytes) -> None:
        with lock:
            order.append(offset // 4096)

    remote.before_write = before_write
    remote.on_write = on_write
    remote.delay = slow
    remote.concurrent_writes = True  # a remote site: epochs may go out together
    remote.gate.clear()
    rep.start()
    n = 40
    for i in range(n):
        if i % 2 == 0:
            delayed.add(i)
        dev.write(i * 4096, block(i))  # durable acks: each one acknowledged
    remote.gate.set()
    assert rep.wait_drained(30), rep.status_dict()
    st = rep.status_dict()["slinks"][1]
    rep.close()
    assert order == list(range(n)), f"copies applied out of order: {order}"
    assert st["copies_in_flight_max"] <= 1


def test_one_epoch_is_copied_with_several_writes_in_flight() -> None:
    """Writes with write-cache acks and one flush form one epoch: the remote gets
    several of them at once, and still only valid (epoch-prefix) states."""
    rec = Recorder()
    rep, dev, stores, remote = make(durable_acks=False, delay=lambda: 0.003, rec=rec)
    bounds: list[int] = []
    rep.ring.epoch_listener = bounds.append
    for i in range(48):
        dev.write(i * 8192, block(i))
    dev.flush()  # one group commit: one epoch (the copiers are not running yet)
    for i in range(48, 64):
        dev.write(i * 8192, block(i))
        dev.flush()  # one epoch each
    rep.start()
    assert rep.wait_drained(30), rep.status_dict()
    st = rep.status_dict()["slinks"][1]
    st0 = rep.status_dict()["slinks"][0]
    rep.close()
    assert bounds[0] == 48 and len(bounds) == 17, bounds
    assert remote.max_in_flight > 1
    assert st["copies_in_flight_max"] > 1
    # the local store is fast (no delay): written inline, one copy at a time
    assert stores.stores["l0"].max_in_flight == 1 and st0["copies_in_flight_max"] == 0
    assert remote.snapshot() == stores.stores["l0"].snapshot()
    history = history_from_ring(rec, "log")
    assert len(history) == 64
    checker = PrefixChecker(history, {0: DEV}, need=need_from_epochs(bounds, 64))
    image = bytearray(DEV)
    steps = 0
    for op in rec.ops:
        if op.store == "r0" and op.kind == "write":
            image[op.offset:op.offset + len(op.data)] = op.data
            checker.match({0: image})
            steps += 1
    assert steps == 64


def test_checker_rejects_a_later_epoch_before_an_earlier_one() -> None:
    """The relaxed checker itself: within an epoch any order, across epochs none."""
    hist = [(0, i * 512, bytes([i + 1]) * 512) for i in range(4)]
    need = need_from_epochs([2, 4], 4)  # epochs {1, 2}, {3, 4}
    assert need == [0, 0, 2, 2]
    img = bytearray(2048)
    ok = PrefixChecker(hist, {0: 2048}, need=need)
    img[512:1024] = hist[1][2]  # entry 2 before entry 1: same epoch, fine
    ok.match({0: img})
    img[0:512] = hist[0][2]
    ok.match({0: img})
    bad = PrefixChecker(hist, {0: 2048}, need=need)
    img2 = bytearray(2048)
    img2[0:512] = hist[0][2]
    img2[1024:1536] = hist[2][2]  # entry 3 (epoch 2) while entry 2 (epoch 1) is missing
    try:
        bad.match({0: img2})
    except AssertionError:
        pass
    else:
        raise AssertionError("a state mixing two epochs was accepted")


def test_random_epochs_prefix_with_concurrent_writers() -> None:
    """Many writers (write-cache acks, random flushes) and a slow remote: every
    state the remote goes through is valid for the epochs the writers caused."""
    rec = Recorder()
    rng = random.Random(4)
    rep, dev, stores, remote = make(durable_acks=False, rec=rec,
                                    delay=lambda: rng.random() * 0.002)
    rep.ring.epoch_listener = lambda b: rec.mark(("epoch", b))
    rep.start()

    def writer(seed: int) -> None:
        r = random.Random(seed)
        for i in range(60):
            off = r.randrange(DEV // 512 - 8) * 512
            dev.write(off, bytes([seed, i % 256]) * (r.randint(1, 8) * 256))
            if r.random() < 0.2:
                dev.flush()

    ts = [threading.Thread(target=writer, args=(s,)) for s in range(1, 5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive()
    dev.flush()
    assert rep.wait_drained(30), rep.status_dict()
    rep.close()
    bounds = [op.note[1] for op in rec.ops
              if op.kind == "mark" and isinstance(op.note, tuple) and op.note[0] == "epoch"]
    history = history_from_ring(rec, "log")
    checker = PrefixChecker(history, {0: DEV}, need=need_from_epochs(bounds, len(history)))
    image = bytearray(DEV)
    for op in rec.ops:
        if op.store == "r0" and op.kind == "write":
            image[op.offset:op.offset + len(op.data)] = op.data
            checker.match({0: image})
    assert bytes(image) == stores.stores["l0"].snapshot()
    assert remote.max_in_flight > 1


def test_a_failing_site_gets_at_most_copy_inflight_copies_of_an_epoch() -> None:
    """Once a copy of an epoch fails, no more of it are sent: a dead site costs one
    round of (possibly slow) failures, not one per copy."""
    rep, dev, _stores, remote = make(durable_acks=False, copy_inflight=4)
    rep.tuning = replace(rep.tuning, retry_interval=3600.0)  # no retry during the test
    attempts = []
    remote.before_write = attempts.append
    for i in range(64):
        dev.write(i * 8192, block(i))
    dev.flush()  # one epoch of 64 copies
    remote.fail_writes = True
    assert remote.concurrent_writes is False  # no delay given
    remote.concurrent_writes = True  # a remote site: the epoch goes to the I/O threads
    rep.start()
    st = wait_slink_1_down(rep)
    rep.close()
    assert st["state"] == "down"
    assert 1 <= len(attempts) <= 4, f"{len(attempts)} copies sent to a failing site"


@pytest.mark.parametrize("failing", ["inline", "concurrent"])
def test_mixed_stores_failure_counts_only_what_was_written(failing: str) -> None:
    """One site link, two devices: one on a store taking concurrent writes (sent on
    the I/O threads first), one written inline; one of them fails.  The site
    link's position must stop before the first copy not written, whichever store
    it was for (with a failing concurrent store the inline copies are not sent)."""
    stores = StoreSet()
    stores.add(FakeStore((8192 + 64) * 512, name="log"))
    for d in range(2):
        stores.add(FakeStore(DEV, name=f"l{d}"))
    conc = stores.add(FakeStore(DEV, name="r0", delay=lambda: 0.001))
    inline = stores.add(FakeStore(DEV, name="r1"))
    assert conc.concurrent_writes and not inline.concurrent_writes
    rep = Replicator.from_table(
        "0 1 replicator ringbuffer 4 log 0 create 8192 blockdev 2 0 async "
        "blockdev 2 1 async", opener=stores.open, durable_acks=False,
        persist_interval=0.01, retry_interval=3600)
    devs = [rep.add_device(f"0 {DEV // 512} replicator-dev rep {d} 0 1 l{d} nolog 0 "
                           f"1 1 r{d} core 2 8 nosync") for d in range(2)]
    # one epoch; write n is entry n + 1.  inline failing: healthy concurrent copy
    # first (entry 1), the failing one is entry 2.  concurrent failing: healthy
    # inline copy first (entry 1, not sent once the concurrent ones failed).
    first = 0 if failing == "inline" else 1
    for i in range(32):
        devs[(first + i) % 2].write(i * 4096, block(i))
    devs[0].flush()
    (inline if failing == "inline" else conc).fail_writes = True
    rep.start()
    st = wait_slink_1_down(rep)
    assert st["state"] == "down"
    assert st["applied_seq"] <= (1 if failing == "inline" else 0), st
    inline.fail_writes = conc.fail_writes = False
    with rep.cond:
        rep.slinks[1].next_retry = 0.0
        rep.cond.notify_all()
    assert rep.wait_drained(20), rep.status_dict()
    rep.close()
    for d, store in ((0, conc), (1, inline)):
        assert store.snapshot() == stores.stores[f"l{d}"].snapshot()


class HeldReplies(FakeStore):
    """A remote site that takes several writes per call (an NBD site's
    ``start_writes``) and answers each one only when the test lets it: what
    was sent and when is what the test sees."""

    def __init__(self, size: int) -> None:
        super().__init__(size, name="r0")
        self.concurrent_writes = True
        self.sent: list[int] = []          # block numbers, in the order sent
        self.answered = threading.Semaphore(0)
        self.changed = threading.Condition()

    def start_writes(self, writes, fua: bool = False):
        with self.changed:
            self.sent += [offset // 4096 for offset, _data in writes]
            self.changed.notify_all()

        def wait(offset: int, data: bytes) -> None:
            assert self.answered.acquire(timeout=30), "the test answered no more"
            self.pwrite(offset, data)
        return [functools.partial(wait, offset, bytes(data)) for offset, data in writes]

    def wait_sent(self, n: int) -> list[int]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.sent) >= n, 30), self.sent
            return list(self.sent)


def test_an_nbd_site_gets_more_copies_as_the_first_replies_come() -> None:
    """A sliding window: once the oldest copies of an epoch are answered, the next
    ones leave while the rest are still in flight (stop-and-wait per window left
    the site idle for a round trip per window); never more than
    ``copy_inflight`` at once, and the site ends equal to the local device."""
    stores = StoreSet()
    stores.add(FakeStore((8192 + 64) * 512, name="log"))
    stores.add(FakeStore(DEV, name="l0"))
    remote = stores.add(HeldReplies(DEV))
    rep = Replicator.from_table(
        "0 1 replicator ringbuffer 4 log 0 create 8192 blockdev 2 0 async "
        "blockdev 2 1 async", opener=stores.open, durable_acks=False,
        copy_inflight=8, persist_interval=0.01, retry_interval=3600)
    dev = rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                         "1 1 r0 core 2 8 nosync")
    for i in range(32):
        dev.write(i * 8192, block(i))
    dev.flush()  # one epoch of 32 copies
    rep.start()
    try:
        assert remote.wait_sent(8) == [2 * i for i in range(8)]   # the window is full
        remote.answered.release(4)   # the oldest half answered, the rest not
        assert len(remote.wait_sent(12)) == 12
        with remote.changed:
            assert not remote.changed.wait(0.2) and len(remote.sent) == 12, \
                "more than copy_inflight copies in flight"
        remote.answered.release(28)
        assert rep.wait_drained(30), rep.status_dict()
        assert rep.status_dict()["slinks"][1]["copies_in_flight_max"] == 8
    finally:
        remote.answered.release(64)
        rep.close()
    assert sorted(remote.sent) == [2 * i for i in range(32)]
    assert remote.snapshot() == stores.stores["l0"].snapshot()
