"""A replicated device as a kernel mirror's journal leg (``ReplicatedDevice.journal``).

The kernel writes the local device itself; the journal leg logs each write for the
remote site links only, reads the local device, and acknowledges per the remote
site links' policies."""

from __future__ import annotations

import threading

import pytest

from dmrepl.errors import UserError
from dmrepl.replicator import Replicator
from dmrepl_testing.replicator import FakeStore, StoreSet

DEV = 64 << 10
LOG = 4096


def setup(policy: str = "async", *, start: bool = True) -> tuple[Replicator, StoreSet]:
    stores = StoreSet()
    for name, size in (("log", (LOG + 8) * 512), ("l0", DEV), ("r1", DEV)):
        stores.add(FakeStore(size, name=name))
    rep = Replicator.from_table(
        f"0 1 replicator ringbuffer 4 log 0 create {LOG} blockdev 2 0 async "
        f"blockdev 2 1 {policy}", opener=stores.open, persist_interval=0.002)
    rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 1 1 r1 core 2 8 nosync")
    if start:
        rep.start()
    return rep, stores


def test_journal_writes_reach_the_remote_and_never_the_local_device() -> None:
    rep, stores = setup()
    try:
        journal = rep.devices[0].journal()
        assert journal.size_bytes == DEV
        journal.write(4096, b"\x07" * 4096)
        journal.trim(8192, 4096)
        journal.flush()
        assert rep.wait_drained(30)
        remote = stores.stores["r1"].snapshot()
        assert remote[4096:8192] == b"\x07" * 4096
        # the kernel's own write is the local copy: the engine did not write it
        assert stores.stores["l0"].snapshot() == bytes(DEV)
        # reads come from the local device as the kernel left it
        stores.stores["l0"].pwrite(0, b"\x05" * 512)
        assert journal.read(0, 1024) == b"\x05" * 512 + bytes(512)
    finally:
        rep.close()


def test_a_sync_site_link_holds_the_journal_write_until_the_remote_has_it() -> None:
    rep, stores = setup("sync")
    remote = stores.stores["r1"]
    gate = threading.Event()
    real_pwrite = remote.pwrite

    def slow_pwrite(offset: int, data: bytes) -> None:
        gate.wait(30)
        real_pwrite(offset, data)

    remote.pwrite = slow_pwrite  # type: ignore[method-assign]
    try:
        journal = rep.devices[0].journal()
        done = threading.Event()
        t = threading.Thread(target=lambda: (journal.write(0, b"\x09" * 4096), done.set()))
        t.start()
        assert not done.wait(0.5), "acknowledged before the sync site link had it"
        gate.set()
        assert done.wait(30)
        t.join()
        assert remote.snapshot()[:4096] == b"\x09" * 4096
    finally:
        gate.set()
        rep.close()



def test_a_batch_of_journal_writes_reaches_the_remote_only() -> None:
    rep, stores = setup()
    try:
        journal = rep.devices[0].journal()
        waits = journal.write_many([(0, b"\x01" * 4096, 4096, False),
                                    (8192, None, 4096, False),
                                    (12288, b"\x03" * 512, 512, True)])
        assert len(waits) == 3
        for wait in waits:
            if wait is not None:
                wait()
        assert rep.wait_drained(30)
        remote = stores.stores["r1"].snapshot()
        assert remote[:4096] == b"\x01" * 4096 and remote[12288:12800] == b"\x03" * 512
        assert stores.stores["l0"].snapshot() == bytes(DEV)
    finally:
        rep.close()


def test_the_device_write_and_trim_with_journal_log_for_the_remote_only() -> None:
    rep, stores = setup()
    try:
        dev = rep.devices[0]
        dev.write(0, b"\x04" * 8192)                 # both sites: the baseline
        dev.write(0, b"\x06" * 4096, journal=True)
        dev.trim(4096, 4096, journal=True)
        dev.flush()
        assert rep.wait_drained(30)
        assert stores.stores["r1"].snapshot()[:8192] == b"\x06" * 4096 + bytes(4096)
        assert stores.stores["l0"].snapshot()[:8192] == b"\x04" * 8192
    finally:
        rep.close()


def test_the_journal_leg_refuses_what_the_device_refuses() -> None:
    rep, _stores = setup()
    try:
        journal = rep.devices[0].journal()
        for write in (lambda: journal.write(100, b"\x01" * 512),
                      lambda: journal.write(0, b"\x01" * 100),
                      lambda: journal.write(DEV, b"\x01" * 512),
                      lambda: journal.trim(DEV - 512, 1024)):
            with pytest.raises(UserError):
                write()
    finally:
        rep.close()


def test_a_cached_journal_leg_commits_at_its_flush_and_its_batches_are_one_epoch() -> None:
    """The kernel journal's drainer (``journal(cached=True)``): its batches are
    logged without a commit (the copiers not running: nobody else commits), and
    its flush makes them one epoch; a FUA write is committed at once, as on any
    leg (a mirror's leg commits every batch)."""
    rep, stores = setup(start=False)
    bounds: list[int] = []
    rep.ring.epoch_listener = bounds.append
    try:
        journal = rep.devices[0].journal(cached=True)
        for batch in range(3):
            assert journal.write_many([(i * 4096, bytes([batch + 1]) * 4096, 4096, False)
                                       for i in range(4)]) == [None] * 4
        assert bounds == []
        journal.flush()
        assert bounds == [12]
        journal.write_many([(0, b"\x09" * 4096, 4096, True)])     # FUA: committed
        assert bounds == [12, 13]
        rep.devices[0].journal().write_many([(4096, b"\x08" * 4096, 4096, False)])
        assert bounds == [12, 13, 14]
        rep.start()
        assert rep.wait_drained(30)
        assert stores.stores["r1"].snapshot()[:4 * 4096] == \
            b"\x09" * 4096 + b"\x08" * 4096 + b"\x03" * 2 * 4096
    finally:
        rep.close()
