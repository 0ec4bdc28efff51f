"""A second site-link type (test-only, :mod:`memory_slink`) registered by the test:
the table takes it, the copiers drive it, and its site holds a prefix of the
write history at every step (whole epochs, in log order)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
from memory_slink import MemorySlink

from dmrepl.replicator import Replicator, TableError
from dmrepl.replicator import slink as slink_types
from dmrepl_testing.replicator import FakeStore, StoreSet

DEV_SIZE = 32 << 10
N_DEV = 2
TABLE = ("0 1 replicator ringbuffer 4 log 0 create 65536 blockdev 2 0 async "
         "blockdev 2 1 async memory 2 2 async")


@pytest.fixture
def memory_type() -> Iterator[None]:
    slink_types.register("memory", MemorySlink)
    try:
        yield
    finally:
        slink_types.unregister("memory")


def stores() -> StoreSet:
    st = StoreSet()
    st.add(FakeStore((65536 + 64) * 512, name="log"))
    for d in range(N_DEV):
        for name in (f"l{d}", f"r{d}", f"m{d}"):
            st.add(FakeStore(DEV_SIZE, name=name))
    return st


def test_an_unregistered_type_is_refused_by_the_table() -> None:
    with pytest.raises(TableError, match="invalid site link type 'memory'"):
        Replicator.from_table(TABLE, opener=stores().open)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_memory_site_holds_a_prefix_of_the_history(memory_type: None, seed: int) -> None:
    st = stores()
    # acknowledged once written (no durable write each): group commits, epochs
    rep = Replicator.from_table(TABLE, opener=st.open, persist_interval=0.01,
                                durable_acks=False)
    try:
        assert rep.status("table").endswith("memory 2 2 async")
        ops = rep.slinks[2].ops
        assert isinstance(ops, MemorySlink)
        rng = random.Random(seed)
        ops.delay = lambda: rng.random() * 0.002  # epochs accumulate meanwhile
        devs = [rep.add_device(f"0 {DEV_SIZE // 512} replicator-dev rep {d} 0 1 l{d} "
                               f"nolog 0 1 1 r{d} core 2 8 nosync 2 1 m{d} core 2 8 nosync")
                for d in range(N_DEV)]
        rep.start()

        def writer(t: int) -> None:
            wrng = random.Random(seed * 100 + t)
            for i in range(60):
                dev = wrng.choice(devs)
                sectors = wrng.randint(1, 16)
                off = wrng.randrange(0, DEV_SIZE // 512 - sectors + 1) * 512
                if wrng.random() < 0.1:
                    dev.trim(off, sectors * 512)
                else:
                    dev.write(off, bytes([t * 60 + i & 0xFF or 1]) * (sectors * 512))

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert rep.wait_drained(30), rep.status_dict()
        last = rep.ring.next_seq - 1
        calls = [(seqs, ends) for nr, seqs, ends in ops.applied if nr == 2]
        # every step was whole epochs of the log, in order: after each call the
        # site held exactly the entries 1..k (a prefix), never a later one alone
        held = 0
        for seqs, ends in calls:
            assert seqs == list(range(held + 1, held + 1 + len(seqs))), (held, seqs)
            assert len(ends) == 1, "one call, one epoch"
            held += len(seqs)
        assert held == last
        assert len(calls) < last, "no group commit: the epochs were not exercised"
        for dev in devs:
            local = st.stores[f"l{dev.dev_nr}"].snapshot()
            assert bytes(ops.images[(2, dev.dev_nr)]) == local
            assert st.stores[f"r{dev.dev_nr}"].snapshot() == local
            assert st.stores[f"m{dev.dev_nr}"].snapshot() == bytes(DEV_SIZE)  # unused
        assert rep.status_dict()["slinks"][2]["copies"] == last
        # the type opened its devices and gives its status word
        assert all(dev.legs[2].ops is ops and dev.legs[1].ops is not ops for dev in devs)
        assert "2:up:memory" in rep.status().split()
    finally:
        rep.close()
