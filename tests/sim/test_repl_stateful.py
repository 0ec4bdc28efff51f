"""Stateful property test: random writes, trims, reads, failures, recoveries,
start/stop and policy messages against a byte-array model of each device.

Invariant: every read returns the model's bytes (newest data, whatever the copy
state).  At the end, with failures cleared, every site is identical to the model.

Writes are issued only while the replicator runs, and only site link 1 (async,
fall-behind ios 8) fails: a stopped replicator, or a failed *sync* or *stall* site
link with a full log, holds writers by design (tested elsewhere).
"""

from __future__ import annotations

import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dmrepl.replicator import Replicator
from dmrepl_testing.replicator import FakeStore, StoreSet

DEV = 32 << 10
SECT = DEV // 512
N_DEV = 2
REMOTES = (1, 2)


class ReplicatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stores = StoreSet()
        self.stores.add(FakeStore(4200 * 512, name="log"))
        for d in range(N_DEV):
            self.stores.add(FakeStore(DEV, name=f"l{d}"))
            for nr in REMOTES:
                self.stores.add(FakeStore(DEV, name=f"r{nr}_{d}"))
        self.rep = Replicator.from_table(
            "ringbuffer 4 log 0 create 4096 blockdev 2 0 async "
            "blockdev 4 1 async ios 8 blockdev 2 2 async", opener=self.stores.open,
            retry_interval=0.005, persist_interval=0.005, full_grace=0.05)
        self.devs = [self.rep.add_device(
            f"0 {SECT} replicator-dev rep {d} 0 1 l{d} nolog 0 "
            f"1 1 r1_{d} core 2 8 nosync 2 1 r2_{d} core 2 8 nosync") for d in range(N_DEV)]
        self.model = [bytearray(DEV) for _ in range(N_DEV)]
        self.counter = 0
        self.failed: set[str] = set()
        self.running = False

    @precondition(lambda self: self.running)
    @rule(d=st.integers(0, N_DEV - 1), sector=st.integers(0, SECT - 1),
          n=st.integers(1, 24))
    def write(self, d: int, sector: int, n: int) -> None:
        n = min(n, SECT - sector)
        self.counter += 1
        data = bytes([self.counter % 251 + 1]) * (n * 512)
        self.devs[d].write(sector * 512, data)
        self.model[d][sector * 512:(sector + n) * 512] = data

    @precondition(lambda self: self.running)
    @rule(d=st.integers(0, N_DEV - 1), sector=st.integers(0, SECT - 1),
          n=st.integers(1, 16))
    def trim(self, d: int, sector: int, n: int) -> None:
        n = min(n, SECT - sector)
        self.devs[d].trim(sector * 512, n * 512)
        self.model[d][sector * 512:(sector + n) * 512] = bytes(n * 512)

    @rule(d=st.integers(0, N_DEV - 1), sector=st.integers(0, SECT - 1),
          n=st.integers(1, 64))
    def read(self, d: int, sector: int, n: int) -> None:
        n = min(n, SECT - sector)
        got = self.devs[d].read(sector * 512, n * 512)
        assert got == bytes(self.model[d][sector * 512:(sector + n) * 512])

    @rule(d=st.integers(0, N_DEV - 1))
    def fail_remote(self, d: int) -> None:
        s = self.stores.stores[f"r1_{d}"]
        s.fail_writes = s.fail_reads = True
        self.failed.add(s.name)

    @precondition(lambda self: bool(self.failed))
    @rule(data=st.data())
    def recover_remote(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.failed)))
        s = self.stores.stores[name]
        s.fail_writes = s.fail_reads = False
        self.failed.discard(name)

    @rule()
    def start(self) -> None:
        self.rep.message(["start"])
        self.running = True

    @rule()
    def stop(self) -> None:
        self.rep.message(["stop"])
        self.running = False

    @rule(policy=st.sampled_from(["async", "sync"]))
    def policy(self, policy: str) -> None:
        self.rep.message(["slink", "message", "2", "policy", policy])

    @rule(d=st.integers(0, N_DEV - 1))
    def flush(self, d: int) -> None:
        self.devs[d].flush()

    @invariant()
    def status_parses(self) -> None:
        info = self.rep.status()
        assert info.endswith(("up", "down", "resync"))

    def teardown(self) -> None:
        try:
            for name in list(self.failed):
                s = self.stores.stores[name]
                s.fail_writes = s.fail_reads = False
            self.rep.message(["slink", "message", "2", "policy", "async"])
            self.rep.start()
            deadline = time.monotonic() + 30
            assert self.rep.wait_drained(max(0.0, deadline - time.monotonic())), \
                self.rep.status_dict()
            for d in range(N_DEV):
                want = bytes(self.model[d])
                assert self.devs[d].read(0, DEV) == want
                assert self.stores.stores[f"l{d}"].snapshot() == want
                for nr in REMOTES:
                    assert self.stores.stores[f"r{nr}_{d}"].snapshot() == want, (nr, d)
        finally:
            self.rep.close()


ReplicatorMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=40,
                                               deadline=None)
TestReplicatorMachine = ReplicatorMachine.TestCase
