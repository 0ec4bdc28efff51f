"""/dev/mapper/NAME as a kernel journal (``--tuning kernel_journal=1``): a dm
``log-writes`` target over the local device that the daemon drains into the
replication log, segment by segment.

A daemon of its own (the tuning is the daemon's); each test makes its own remote
site.  The writes are sequence-stamped (tests/kernel/test_dmrepl_crash.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from dmrepl_testing.daemon import DaemonProcess, KernelLab, RemoteSite, Replicated, trace
from tests.kernel.test_dmrepl_crash import BLOCK, Writer, assert_prefix, seqs_present
from tests.kernel.test_dmrepl_outage import digest

pytestmark = pytest.mark.kernel

MB = 1 << 20
SIZE_MB = 8
BLOCKS = SIZE_MB * MB // BLOCK


@pytest.fixture(scope="module")
def kdaemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("kjournal"),
                      tuning={"retry_interval": 1, "kernel_journal": True,
                              "journal_interval": 0.2, "journal_segment_mib": 64}).start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


@pytest.fixture
def kj(kdaemon: DaemonProcess, dmrepl_session: Any
       ) -> Iterator[tuple[DaemonProcess, RemoteSite, KernelLab]]:
    """This module's daemon, the session's remote site (a site of one's own would
    take the session site's address), a lab for the test's disks."""
    if kdaemon.proc is None or kdaemon.proc.poll() is not None:
        kdaemon.start()
    site = dmrepl_session[1]
    site.reset(20)
    with KernelLab("kj") as lab:
        yield kdaemon, site, lab


def describe(r: Replicated, i: int = 0) -> dict[str, Any]:
    return dict(json.loads(r.check(r.daemon.cli("status", r.devs[i], "--json")))[0])


def table(name: str) -> str:
    return subprocess.run(["dmsetup", "table", name], capture_output=True, text=True,
                          check=True).stdout


def test_the_kernel_journals_the_writes_and_the_remote_gets_them_in_order(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    d, site, lab = kj
    with Replicated(lab, d, "dmrepl-test-kj", size_mb=SIZE_MB, log_mb=32,
                    remote_policy="async", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        assert describe(r)["structure"] == "log-writes"
        assert " log-writes " in table(r.devs[0])
        w = Writer([(r.mapper(), (i * 7919) % BLOCKS) for i in range(2 * BLOCKS)]).start()
        w.wait_acked(BLOCKS // 2, timeout=300)
        # the remote site, mid-stream: a prefix of the history
        r.site.cut()
        assert_prefix(seqs_present(r, r.remotes, BLOCKS), "the remote, mid-stream")
        r.site.restore()
        w.thread.join(600)
        assert w.error is None and w.acked == 2 * BLOCKS - 1
        r.wait_converged(timeout=600)
        assert describe(r)["kernel_journal"]["swaps"] > 0
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)


def test_kill_9_the_writer_goes_on_and_the_restart_drains_the_journal(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    d, site, lab = kj
    with Replicated(lab, d, "dmrepl-test-kjkill", size_mb=SIZE_MB, log_mb=32,
                    remote_policy="async", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        w = Writer([(r.mapper(), i % BLOCKS) for i in range(2 * BLOCKS)]).start()
        w.wait_acked(300, timeout=300)
        d.kill()
        at_kill = w.acked
        trace(f"kill -9 after {at_kill + 1} acknowledged writes")
        w.wait_acked(at_kill + 300, timeout=300)   # no daemon in the write path
        assert w.error is None
        d.start()
        trace("daemon restarted")
        w.thread.join(600)
        assert w.error is None and w.acked == 2 * BLOCKS - 1
        r.wait_converged(timeout=600)
        st = describe(r)
        # (a segment holds every write of the test: none filled during the outage)
        assert st["structure"] == "log-writes" and st["kernel_journal"]["resyncs"] == 0, \
            (st["kernel_journal"], d.log()[-4000:])
        assert seqs_present(r, r.remotes, BLOCKS) == seqs_present(r, r.locals, BLOCKS)
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)


def test_a_crash_of_the_primary_resyncs_the_device(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """The daemon killed and the device torn down under a writer (the kernel's
    journal in memory lost): the restart resynchronises what was written since
    the oldest segment it had not drained began (here: all of the device)."""
    d, site, lab = kj
    with Replicated(lab, d, "dmrepl-test-kjcrash", size_mb=SIZE_MB, log_mb=32,
                    remote_policy="async", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        w = Writer([(r.mapper(), (i * 7919) % BLOCKS) for i in range(2 * BLOCKS)]).start()
        w.wait_acked(500, timeout=300)
        d.kill()
        subprocess.run(["dmsetup", "remove", "--force", r.devs[0]], capture_output=True)
        w.thread.join(300)
        trace(f"crash after {w.acked + 1} acknowledged writes ({w.error})")
        local = seqs_present(r, r.locals, BLOCKS)
        for seq in range(w.acked + 1):
            assert seq in local or any(s > seq for s in local), seq
        d.start()
        trace("daemon restarted")
        r.wait_converged(timeout=600)
        st = describe(r)
        assert st["kernel_journal"]["resyncs"] == 1, st
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)
        w2 = Writer([(r.mapper(), 0)])
        w2.run()
        assert w2.error is None


def test_a_crash_resyncs_only_the_blocks_written_since_the_journal_last_drained(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """The era device under the journal records which 4 MiB blocks were written
    in which era; after a crash only those written since the oldest segment not
    drained began reach the remote again, not the whole device."""
    d, site, lab = kj
    size_mb = 32
    with Replicated(lab, d, "dmrepl-test-kjera", size_mb=size_mb, log_mb=32,
                    remote_policy="async", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        assert describe(r)["kernel_journal"]["era_record"]
        Writer([(r.mapper(), b) for b in range(0, size_mb * MB // BLOCK, MB // BLOCK)]).run()
        r.wait_converged(timeout=600)       # every MiB written, all drained
        Writer([(r.mapper(), 1)]).run()     # the segment after begins with this one
        r.wait_converged(timeout=600)
        w = Writer([(r.mapper(), i % (MB // BLOCK)) for i in range(4 * MB // BLOCK)]).start()
        w.wait_acked(100, timeout=300)      # the first MiB only, when the crash comes
        d.kill()
        era_dev = f".{r.devs[0]}.era"
        subprocess.run(["dmsetup", "remove", "--force", r.devs[0]], capture_output=True)
        w.thread.join(300)
        for name in (r.devs[0], era_dev):
            subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True)
        assert subprocess.run(["dmsetup", "info", era_dev], capture_output=True).returncode
        trace(f"crash after {w.acked + 1} acknowledged writes ({w.error})")
        d.start()
        r.wait_converged(timeout=600)
        st = describe(r)["kernel_journal"]
        assert st["resyncs"] == 1 and 0 < st["resync_bytes"] <= 4 * MB, (st, d.log()[-3000:])
        assert digest(r.remotes[0], size_mb * MB) == digest(r.locals[0], size_mb * MB)
