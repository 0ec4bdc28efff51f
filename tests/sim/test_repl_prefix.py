"""Write-order fidelity under random delays and failures; drop + resync to identity.

Every remote store records its writes in one global order; the write history is
rebuilt from the entries written to the log store.  After the run, the recorded
remote writes are replayed and each intermediate multi-device state must be a
prefix state of the history (PrefixChecker), where the entries of one epoch (one
group commit, recorded by the engine as it happens) may land in any order.  That
the engine's epochs never join writes a caller ordered is checked on its own, in
test_epochs_never_overlap_across_acknowledged_writes.
"""

from __future__ import annotations

import random
import threading
import time

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

DEV_SIZE = 64 << 10
REGION = 8  # sectors


def setup(n_dev: int, slinks: str, legs: list[tuple[int, str]], *, log_sectors: int = 65536,
          dev_size: int = DEV_SIZE, delay=None, seed: int = 0, **tuning):
    rec = Recorder()
    stores = StoreSet()
    stores.add(FakeStore((log_sectors + 64) * 512, name="log", recorder=rec))
    rng = random.Random(seed)
    for d in range(n_dev):
        stores.add(FakeStore(dev_size, name=f"l{d}", recorder=rec))
        for nr, _ in legs:
            dl = None
            if delay is not None:
                r2 = random.Random(rng.random())
                def dl(r=r2):
                    return (delay(r))
            stores.add(FakeStore(dev_size, name=f"r{nr}_{d}", recorder=rec, delay=dl))
    tuning.setdefault("retry_interval", 0.01)
    tuning.setdefault("persist_interval", 0.01)
    rep = Replicator.from_table(
        f"0 1 replicator ringbuffer 4 log 0 create {log_sectors} {slinks}",
        opener=stores.open, **tuning)
    rep.ring.epoch_listener = lambda bound: rec.mark(("epoch", bound))
    devs = []
    for d in range(n_dev):
        words = [f"0 {dev_size // 512} replicator-dev rep {d} 0 1 l{d} nolog 0"]
        for nr, dlog in legs:
            words.append(f"{nr} 1 r{nr}_{d} {dlog}")
        devs.append(rep.add_device(" ".join(words)))
    return rep, devs, stores, rec


def random_writes(dev_list, rng: random.Random, n: int, tag: int, max_sectors: int = 16):
    for i in range(n):
        dev = rng.choice(dev_list)
        sectors = rng.randint(1, max_sectors)
        off = rng.randrange(0, dev.size_bytes // 512 - sectors + 1) * 512
        stamp = f"{tag}:{i}:".encode()
        data = (stamp * (sectors * 512 // len(stamp) + 1))[:sectors * 512]
        if rng.random() < 0.05:
            dev.trim(off, sectors * 512)
        else:
            dev.write(off, data)


def check_prefix(rec: Recorder, slink: int, n_dev: int, dev_size: int = DEV_SIZE) -> int:
    history = history_from_ring(rec, "log")
    assert history, "no entries recorded"
    names = {f"r{slink}_{d}": d for d in range(n_dev)}
    bounds = [op.note[1] for op in rec.ops
              if op.kind == "mark" and isinstance(op.note, tuple) and op.note[0] == "epoch"]
    checker = PrefixChecker(history, {d: dev_size for d in range(n_dev)},
                            need=need_from_epochs(bounds, len(history)))
    image = {d: bytearray(dev_size) for d in range(n_dev)}
    steps = 0
    for op in rec.ops:
        d = names.get(op.store)
        if d is None or op.kind != "write":
            continue
        image[d][op.offset:op.offset + len(op.data)] = op.data
        checker.match(image)
        steps += 1
    return steps


def assert_identical(devs, stores: StoreSet, slinks) -> None:
    for dev in devs:
        local = stores.stores[f"l{dev.dev_nr}"].snapshot()
        assert dev.read(0, dev.size_bytes) == local
        for nr in slinks:
            assert stores.stores[f"r{nr}_{dev.dev_nr}"].snapshot() == local, \
                f"device {dev.dev_nr} differs on site link {nr}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prefix_property_with_delays_and_failures(seed: int) -> None:
    rng = random.Random(seed)
    rep, devs, stores, rec = setup(
        3, "blockdev 2 0 async blockdev 4 1 async ios 40 blockdev 2 2 sync",
        [(1, "core 2 8 nosync"), (2, "core 2 8 nosync")],
        delay=lambda r: r.random() * 0.001 if r.random() < 0.3 else 0.0, seed=seed)
    rep.start()
    stop = threading.Event()
    failures = 0

    def chaos() -> None:
        nonlocal failures
        crng = random.Random(seed + 100)
        while not stop.wait(crng.uniform(0.005, 0.03)):
            victim = stores.stores[f"r{crng.choice([1, 2])}_{crng.randrange(3)}"]
            victim.fail_writes = victim.fail_reads = True
            failures += 1
            stop.wait(crng.uniform(0.005, 0.03))
            victim.fail_writes = victim.fail_reads = False

    writers = [threading.Thread(target=random_writes,
                                args=(devs, random.Random(rng.random()), 120, t))
               for t in range(4)]
    ct = threading.Thread(target=chaos)
    ct.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
        assert not t.is_alive()
    stop.set()
    ct.join()
    assert rep.wait_drained(30), rep.status_dict()
    st = rep.status_dict()
    rep.close()
    assert failures > 0
    assert st["slinks"][1]["drops"] == 0 and st["slinks"][2]["drops"] == 0
    assert_identical_after_close(devs, stores, (1, 2))
    for nr in (1, 2):
        assert check_prefix(rec, nr, 3) > 0


def assert_identical_after_close(devs, stores, slinks) -> None:
    for dev in devs:
        local = stores.stores[f"l{dev.dev_nr}"].snapshot()
        for nr in slinks:
            assert stores.stores[f"r{nr}_{dev.dev_nr}"].snapshot() == local


def test_single_writer_prefix_with_slow_remote() -> None:
    rep, devs, stores, rec = setup(
        2, "blockdev 2 0 sync blockdev 2 1 async", [(1, "core 2 8 nosync")],
        delay=lambda r: 0.0005)
    rep.start()
    random_writes(devs, random.Random(7), 300, 0)
    assert rep.wait_drained(30)
    assert_identical(devs, stores, (1,))
    rep.close()
    assert check_prefix(rec, 1, 2) >= 280


def _wait(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def test_ring_full_drops_failed_async_slink_then_resyncs() -> None:
    rep, devs, stores, _rec = setup(
        2, "blockdev 2 0 async blockdev 2 1 async", [(1, "core 2 8 nosync")],
        log_sectors=4096, dev_size=1 << 20)
    for d in range(2):
        stores.stores[f"r1_{d}"].fail_writes = True
        stores.stores[f"r1_{d}"].fail_reads = True
    rep.start()
    rng = random.Random(5)
    # 4 MiB through a 2 MiB log while site link 1 is down: must drop, never block
    random_writes(devs, rng, 500, 1, max_sectors=16)
    st = rep.status_dict()
    assert st["slinks"][1]["drops"] >= 1
    assert st["slinks"][1]["regions_out_of_sync"] > 0
    assert not st["slinks"][1]["consistent"]
    assert "/" in devs[0].status() and "," in devs[0].status()
    for d in range(2):
        stores.stores[f"r1_{d}"].fail_writes = False
        stores.stores[f"r1_{d}"].fail_reads = False
    assert rep.wait_drained(30), rep.status_dict()
    st = rep.status_dict()
    assert st["slinks"][1]["consistent"] and st["slinks"][1]["state"] == "up"
    assert sum(leg["resynced"] for d in st["devices"].values()
               for nr, leg in d["legs"].items() if nr == 1) > 0
    assert_identical(devs, stores, (1,))
    rep.close()


def test_ring_full_drops_lagging_slink_after_grace() -> None:
    rep, devs, stores, _rec = setup(
        1, "blockdev 2 0 async blockdev 2 1 async", [(1, "core 2 8 nosync")],
        log_sectors=4096, dev_size=1 << 20, delay=lambda r: 0.004, full_grace=0.05)
    rep.start()
    random_writes(devs, random.Random(9), 900, 2, max_sectors=16)
    assert rep.status_dict()["slinks"][1]["drops"] >= 1
    assert rep.wait_drained(60), rep.status_dict()
    assert_identical(devs, stores, (1,))
    rep.close()


def test_stall_policy_blocks_writer_instead_of_dropping() -> None:
    rep, devs, stores, rec = setup(
        1, "blockdev 2 0 async blockdev 2 1 async+stall", [(1, "core 2 8 nosync")],
        log_sectors=4096, dev_size=1 << 20)
    remote = stores.stores["r1_0"]
    remote.fail_writes = remote.fail_reads = True
    rep.start()
    t = threading.Thread(target=random_writes, args=(devs, random.Random(3), 900, 3))
    t.start()
    _wait(lambda: rep.status_dict()["stats"]["c"] > 0, what="ring full")
    assert t.is_alive()
    assert rep.status_dict()["slinks"][1]["drops"] == 0
    remote.fail_writes = remote.fail_reads = False
    t.join(60)
    assert not t.is_alive()
    assert rep.wait_drained(30)
    assert rep.status_dict()["slinks"][1]["drops"] == 0
    assert_identical(devs, stores, (1,))
    rep.close()
    assert check_prefix(rec, 1, 1, 1 << 20) > 0


def test_initial_sync_of_new_remote_device() -> None:
    rep, _devs, stores, _rec = setup(1, "blockdev 2 0 async blockdev 2 1 async",
                                   [(1, "core 2 8 sync")])
    local = stores.stores["l0"]
    local.data[:] = random.Random(1).randbytes(DEV_SIZE)
    rep.start()
    assert rep.wait_drained(20)
    assert stores.stores["r1_0"].snapshot() == local.snapshot()
    rep.close()
