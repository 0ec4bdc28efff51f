"""A site link whose remote device is an NBD export: the copier sends an epoch's
copies from its own thread, several per system call, and a refused copy takes
the link down without losing any write (the retry copies it)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmrepl.blockio import BlockIO
from dmrepl.nbd import Export, MemoryBackend, NbdServer
from dmrepl.nbd._proto import FLAG_SEND_FUA
from dmrepl.nbd.client import NbdStore
from dmrepl.replicator import Replicator
from dmrepl_testing.replicator import FakeStore, StoreSet, wait_for

DEV = 1 << 20
LOG = 8192
BLOCK = 4096


class Refusing(MemoryBackend):
    """A memory export that refuses writes at ``refused`` offsets while
    ``refusing`` is set."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.refused: set[int] = set()
        self.refusing = threading.Event()

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.refusing.is_set() and offset in self.refused:
            raise OSError(errno.EIO, "the remote disk refused the write")
        super().write(offset, data, fua)


def site_opener(tmp_path: Path, export_fua: bool = True) -> tuple[str, Callable[[str], BlockIO]]:
    """The NBD site's URL (a server on a socket in ``tmp_path``), and an opener of
    it and of the local stores (log, l0); ``export_fua`` False: as an export that
    does not offer FUA."""
    stores = StoreSet()
    for name, size in (("log", (LOG + 8) * 512), ("l0", DEV)):
        stores.add(FakeStore(size, name=name))
    url = f"nbd+unix:///r?socket={tmp_path / 'nbd.sock'}"

    def opener(path: str) -> BlockIO:
        if path != url:
            return stores.open(path)
        store = NbdStore(path)
        if not export_fua:
            store.flags &= ~FLAG_SEND_FUA
        return store
    return url, opener


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Replicator, Refusing]]:
    remote = Refusing(DEV)
    url, opener = site_opener(tmp_path)

    with NbdServer(str(tmp_path / "nbd.sock")) as srv:
        srv.add_export(Export("r", remote))
        rep = Replicator.from_table(
            f"0 1 replicator ringbuffer 4 log 0 create {LOG} blockdev 2 0 async "
            "blockdev 2 1 async", opener=opener, persist_interval=0.002, retry_interval=0.05,
            coalesce_delay=0.05)
        rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                       f"1 1 {url} core 2 8 nosync")
        rep.start()
        try:
            yield rep, remote
        finally:
            rep.close()


def block(i: int) -> bytes:
    return bytes([i % 251 + 1]) * BLOCK


def test_an_epoch_of_copies_is_in_flight_together_and_reaches_the_site(
        site: tuple[Replicator, Refusing]) -> None:
    rep, remote = site
    dev = rep.devices[0]
    n = 64
    # one batch of the log: entries of one epoch, sent together to the site
    assert dev.write_many([(i * 2 * BLOCK, block(i), BLOCK, False) for i in range(n)]) \
        == [None] * n
    assert rep.wait_drained(30)
    snap = remote.pread(0, DEV)
    for i in range(n):
        assert snap[i * 2 * BLOCK:i * 2 * BLOCK + BLOCK] == block(i)
    assert rep.status_dict()["slinks"][1]["copies_in_flight_max"] > 1


def test_a_refused_copy_takes_the_link_down_and_the_retry_copies_every_write(
        site: tuple[Replicator, Refusing]) -> None:
    rep, remote = site
    dev = rep.devices[0]
    n = 40
    remote.refused = {17 * 2 * BLOCK}
    remote.refusing.set()
    assert dev.write_many([(i * 2 * BLOCK, block(i), BLOCK, False) for i in range(n)]) \
        == [None] * n
    wait_for(lambda: rep.status_dict()["slinks"][1]["failures"] > 0,
             "the refused copy to take the link down")
    remote.refusing.clear()
    assert rep.wait_drained(30)
    snap = remote.pread(0, DEV)
    for i in range(n):
        assert snap[i * 2 * BLOCK:i * 2 * BLOCK + BLOCK] == block(i)


class Recording(MemoryBackend):
    """A memory export that records each write (offset, FUA) and each flush."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.lock = threading.Lock()
        self.ops: list[tuple[str, int, bool]] = []

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        super().write(offset, data, fua)
        with self.lock:
            self.ops.append(("write", offset, fua))

    def flush(self) -> None:
        super().flush()
        with self.lock:
            self.ops.append(("flush", 0, False))

    def made_durable(self, offset: int) -> bool:
        """Was the last write at ``offset`` durable: with FUA, or followed by a flush?"""
        with self.lock:
            ops = list(self.ops)
        last = max(i for i, (kind, off, _fua) in enumerate(ops)
                   if kind == "write" and off == offset)
        return ops[last][2] or any(kind == "flush" for kind, _o, _f in ops[last + 1:])


@pytest.mark.parametrize("export_fua", [True, False], ids=["fua", "no-fua"])
def test_a_sync_write_is_durable_on_the_site_when_acknowledged(
        tmp_path: Path, export_fua: bool) -> None:
    """Sync: each acknowledged write is durable on the NBD site.  An export that
    takes FUA gets FUA copies and no flush round trip after them; one that does
    not gets the copies and a flush."""
    remote = Recording(DEV)
    url, opener = site_opener(tmp_path, export_fua)

    with NbdServer(str(tmp_path / "nbd.sock")) as srv:
        srv.add_export(Export("r", remote))
        rep = Replicator.from_table(
            f"0 1 replicator ringbuffer 4 log 0 create {LOG} blockdev 2 0 async "
            "blockdev 2 1 sync", opener=opener, persist_interval=0.002)
        try:
            dev = rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                                 f"1 1 {url} core 2 8 nosync")
            rep.start()

            wrong: list[str] = []

            def writer(first: int) -> None:
                for i in range(first, first + 20):
                    dev.write(i * 2 * BLOCK, block(i))
                    if remote.pread(i * 2 * BLOCK, BLOCK) != block(i):
                        wrong.append(f"write {i} acknowledged, not on the site")
                    elif not remote.made_durable(i * 2 * BLOCK):
                        wrong.append(f"write {i} acknowledged, not durable on the site")

            threads = [threading.Thread(target=writer, args=(k * 20,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not wrong
        finally:
            rep.close()
    writes = [op for op in remote.ops if op[0] == "write"]
    flushes = [op for op in remote.ops if op[0] == "flush"]
    assert len(writes) == 80
    if export_fua:
        assert all(fua for _k, _o, fua in writes) and not flushes
    else:
        assert not any(fua for _k, _o, fua in writes) and flushes
