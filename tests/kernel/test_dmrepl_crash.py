"""kill -9 of the daemon during writes; cross-device write order at the remote site.

Both use a sequence-stamped workload: write number ``i`` is one 4 KiB block
holding ``i`` (and a checksum-able pattern), written with O_DIRECT|O_DSYNC one at
a time, and ``i`` is recorded as acknowledged only after the write returned.

The daemon and the remote site are the session's (``dmrepl`` in conftest.py): the
crash test kills that daemon and restarts it; each test has remote disks of its own.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from typing import Any

import pytest

from dmrepl_testing.daemon import Replicated, trace

BLOCK = 4096
MAGIC = b"DMREPLSQ"


def stamp(seq: int) -> bytes:
    head = MAGIC + struct.pack("<Q", seq)
    return (head * (BLOCK // len(head)))[:BLOCK]


def read_seq(raw: bytes) -> int | None:
    """The stamp in a block: its sequence number, None if never written."""
    if raw[:8] != MAGIC:
        assert raw == bytes(BLOCK), "a block that is neither empty nor a whole stamp"
        return None
    seq = struct.unpack("<Q", raw[8:16])[0]
    assert raw == stamp(seq), f"torn block for write {seq}"
    return int(seq)


class Writer:
    """Writes stamps (seq -> device, block) in order; ``acked`` = highest acked seq."""

    def __init__(self, targets: list[tuple[str, int]]) -> None:
        self.targets = targets
        self.acked = -1
        self.error: OSError | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        fds = {dev: os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
               for dev in {d for d, _ in self.targets}}
        buf = mmap.mmap(-1, BLOCK)
        try:
            for seq, (dev, block) in enumerate(self.targets):
                if self.stop.is_set():
                    return
                buf[:] = stamp(seq)
                os.pwrite(fds[dev], buf, block * BLOCK)
                self.acked = seq
        except OSError as e:
            self.error = e
        finally:
            for fd in fds.values():
                os.close(fd)

    def start(self) -> Writer:
        self.thread.start()
        return self

    def wait_acked(self, n: int, timeout: float = 120) -> None:
        import time
        deadline = time.monotonic() + timeout
        while self.acked < n:
            assert self.thread.is_alive() or self.acked >= n, f"writer died: {self.error}"
            assert time.monotonic() < deadline, f"only {self.acked + 1} writes in {timeout}s"
            time.sleep(0.05)


def read_blocks(dev: str, count: int) -> list[int | None]:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK * 256)
    out: list[int | None] = []
    try:
        while len(out) < count:
            n = min(256, count - len(out))
            got = os.preadv(fd, [memoryview(buf)[:n * BLOCK]], len(out) * BLOCK)
            assert got == n * BLOCK
            out += [read_seq(bytes(buf[i * BLOCK:(i + 1) * BLOCK])) for i in range(n)]
    finally:
        os.close(fd)
    return out


def seqs_present(r: Replicated, devs: list[str], per_dev: int) -> set[int]:
    present: set[int] = set()
    for dev in devs:
        present |= {s for s in read_blocks(dev, per_dev) if s is not None}
    return present


def assert_prefix(present: set[int], what: str) -> int:
    n = len(present)
    assert present == set(range(n)), (
        f"{what} is not a prefix of the write history: has {n} writes, first missing "
        f"{min(set(range(max(present) + 1)) - present)}, highest {max(present)}")
    return n


def test_kill_9_during_writes_no_io_error_no_acked_write_lost(dmrepl: Any) -> None:
    """The daemon dies under a writer: the writer sees no error and goes on (the
    kernel mirror writes the local device, marking regions the journal leg missed);
    the restarted daemon rejoins; the remote site converges to the local device."""
    d, site, lab = dmrepl
    with Replicated(lab, d, "dmrepl-test-crash", size_mb=8, log_mb=16,
                    structure="mirror", remote_policy="async ios 100000", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        blocks = (8 << 20) // BLOCK
        w = Writer([(r.mapper(), i) for i in range(blocks)]).start()
        w.wait_acked(200)
        d.kill()                                   # SIGKILL mid-stream
        at_kill = w.acked
        trace(f"kill -9 after {at_kill + 1} acked writes")
        # the remote site, before any recovery: a prefix of the history (the log's)
        assert_prefix(seqs_present(r, r.remotes, blocks), "remote after the crash")
        # writes go on while the daemon is down (once the journal leg's requests in
        # flight at the kill time out)
        w.wait_acked(at_kill + 300, timeout=240)
        assert w.error is None, f"the writer saw {w.error} while the daemon was down"
        trace(f"{w.acked - at_kill} writes acknowledged during the outage")
        d.start()                                  # recreates everything from state.json
        trace("daemon restarted")
        w.thread.join(600)
        assert not w.thread.is_alive(), "writer hung"
        assert w.error is None, f"the writer saw {w.error}"
        assert w.acked == blocks - 1
        # no acknowledged write lost, through /dev/mapper/NAME (never recreated)
        present = seqs_present(r, [r.mapper()], blocks)
        assert present == set(range(blocks)), "acknowledged writes lost"
        r.wait_converged()
        assert seqs_present(r, r.remotes, blocks) == present
        trace("converged")
        # and the device takes writes again, through the rejoined journal leg
        w2 = Writer([(r.mapper(), blocks - 1)])
        w2.run()
        assert w2.error is None and w2.acked == 0


@pytest.mark.parametrize("structure", ["mirror", "log-writes"])
def test_two_devices_keep_cross_device_order_at_remote(dmrepl: Any, structure: str) -> None:
    """Both structures that keep a replicator's order across its devices: a mirror
    each (the daemon's journal legs), or one kernel journal for both (a group)."""
    d, site, lab = dmrepl
    with Replicated(lab, d, "dmrepl-test-order", size_mb=8, log_mb=16, ndev=2,
                    structure=structure, remote_policy="async ios 100000", delay_ms=30,
                    site=site, site_disks=site.take(2)) as r:
        if structure == "log-writes":
            assert r.describe(1)["kernel_journal"]["group"] == r.devs
        per_dev = (8 << 20) // BLOCK
        # write i goes to device i % 2 (pseudo-random block order inside each device)
        total = 400    # the remote copier pays a round trip per write: keep it short
        targets = [(r.mapper(i % 2), (i // 2 * 7919) % per_dev) for i in range(total)]

        def remote_seqs() -> set[int]:
            present: set[int] = set()
            for i, dev in enumerate(r.remotes):
                blocks = read_blocks(dev, per_dev)
                for b, s in enumerate(blocks):
                    if s is not None:
                        assert targets[s] == (r.mapper(i), b), f"write {s} in the wrong place"
                        present.add(s)
            return present
        w = Writer(targets).start()
        w.wait_acked(150)
        # (a kernel journal reaches the remote a drain interval behind the writer)
        r.wait_for("a first write at the remote", lambda _status: remote_seqs())
        # freeze the remote site mid-copy, then look at both of its disks
        site.cut()
        w.thread.join(300)
        assert w.error is None and w.acked == len(targets) - 1
        frozen = remote_seqs()
        n = assert_prefix(frozen, "the remote site (both devices)")
        assert 0 < n < len(targets), f"remote held {n} writes: the cut froze nothing useful"
        site.restore()
        r.wait_converged()
        assert remote_seqs() == set(range(len(targets)))
