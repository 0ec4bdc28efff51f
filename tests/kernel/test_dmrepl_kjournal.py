"""/dev/mapper/NAME as a kernel journal (``--tuning kernel_journal=1``): a dm
``log-writes`` target over the local device that the daemon drains into the
replication log, segment by segment.

A daemon of its own (the tuning is the daemon's); each test makes its own remote
site.  The writes are sequence-stamped (tests/kernel/test_dmrepl_crash.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl_testing.daemon import DaemonProcess, KernelLab, RemoteSite, Replicated, trace
from tests.kernel.test_dmrepl_crash import (
    BLOCK,
    Writer,
    assert_prefix,
    read_blocks,
    seqs_present,
)
from tests.kernel.test_dmrepl_outage import digest

pytestmark = pytest.mark.kernel

MB = 1 << 20
SIZE_MB = 8
BLOCKS = SIZE_MB * MB // BLOCK
SEGMENT_MIB = 64


@pytest.fixture(scope="module")
def kdaemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("kjournal"),
                      tuning={"retry_interval": 1, "kernel_journal": True,
                              "journal_interval": 0.2,
                              "journal_segment_mib": SEGMENT_MIB}).start()
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


def table(name: str) -> str:
    return subprocess.run(["dmsetup", "table", name], capture_output=True, text=True,
                          check=True).stdout


def outage_under(w: Writer, d: DaemonProcess) -> None:
    """Once ``w`` has 300 writes acknowledged, ``kill -9`` of the daemon: 300 more
    go through meanwhile (no daemon in the write path), then it is started again."""
    w.wait_acked(300, timeout=300)
    d.kill()
    at_kill = w.acked
    trace(f"kill -9 after {at_kill + 1} acknowledged writes")
    w.wait_acked(at_kill + 300, timeout=300)
    assert w.error is None
    d.start()
    trace("daemon restarted")


def half_swap(d: DaemonProcess, name: str) -> None:
    """Leave ``name`` as a daemon killed in the middle of a segment swap does (and
    no guardian resumed): the next free segment's table loaded, the device
    suspended."""
    journal = os.path.join(d.state_dir, "journal")
    with open(os.path.join(journal, f"{name}.journal")) as f:
        saved = json.load(f)
    busy = {saved["current"], *saved["pending"]}
    nxt = min(i for i in range(3) if i not in busy)
    loop = subprocess.run(["losetup", "-n", "-O", "NAME", "-j",
                           os.path.join(journal, f"{name}.{nxt}.seg")],
                          capture_output=True, text=True, check=True).stdout.split()[0]
    rdev = os.stat(loop).st_rdev
    start, length, target, under, _logdev = table(name).split()
    assert target == "log-writes"
    subprocess.run(["dmsetup", "load", name, "--table",
                    f"{start} {length} log-writes {under} "
                    f"{os.major(rdev)}:{os.minor(rdev)}"], check=True)
    subprocess.run(["dmsetup", "suspend", name], check=True)
    trace(f"{name}: left half swapped to segment {nxt} ({loop}), suspended")


def test_the_kernel_journals_the_writes_and_the_remote_gets_them_in_order(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    d, site, lab = kj
    with Replicated(lab, d, "dmrepl-test-kj", size_mb=SIZE_MB, log_mb=32,
                    remote_policy="async", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        assert r.describe()["structure"] == "log-writes"
        assert " log-writes " in table(r.devs[0])
        # (every stamp a block of its own; each one O_DSYNC: an epoch of its own at
        # the remote, one round trip each)
        writes = BLOCKS // 2
        w = Writer([(r.mapper(), (i * 7919) % BLOCKS) for i in range(writes)]).start()
        w.wait_acked(writes // 4, timeout=300)
        # its /dev/mapper node gone (as udev's late handling of a removed device's
        # event, whose minor it took, removes it): the daemon still sees its writes
        os.unlink(r.mapper())
        w.wait_acked(writes // 2, timeout=300)
        # the remote site, mid-stream: a prefix of the history
        r.site.cut()
        assert_prefix(seqs_present(r, r.remotes, BLOCKS), "the remote, mid-stream")
        r.site.restore()
        w.thread.join(600)
        assert w.error is None and w.acked == writes - 1
        r.wait_converged(timeout=600)
        assert r.describe()["kernel_journal"]["swaps"] > 0
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)


def test_kill_9_the_writer_goes_on_and_the_restart_drains_the_journal(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    d, site, lab = kj
    with Replicated(lab, d, "dmrepl-test-kjkill", size_mb=SIZE_MB, log_mb=32,
                    remote_policy="async", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        writes = 1200
        w = Writer([(r.mapper(), i % BLOCKS) for i in range(writes)]).start()
        outage_under(w, d)
        w.thread.join(600)
        assert w.error is None and w.acked == writes - 1
        r.wait_converged(timeout=600)
        st = r.describe()
        # (a segment holds every write of the test: none filled during the outage)
        assert st["structure"] == "log-writes" and st["kernel_journal"]["resyncs"] == 0, \
            (st["kernel_journal"], d.log()[-4000:])
        assert seqs_present(r, r.remotes, BLOCKS) == seqs_present(r, r.locals, BLOCKS)
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)

        # killed in the middle of a swap (the next segment's table loaded, the
        # device suspended) with no guardian to resume it: the restart finishes
        # the swap and drains both segments; what is written after it is kept
        d.kill()
        half_swap(d, r.devs[0])
        d.start()
        more = 400
        # (other blocks than before: a lost write leaves an older stamp)
        w = Writer([(r.mapper(), (i * 7919) % BLOCKS) for i in range(more)]).start()
        w.thread.join(600)
        assert w.error is None and w.acked == more - 1
        r.wait_converged(timeout=600)
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB), \
            d.log()[-4000:]

        # an outage that writes more than a segment holds fills the segment in use
        # (the guardian's flushes log the writes of a writer that never flushes as
        # they come); the restart finds it short of its end mark and resynchronises
        # what it held
        resyncs = r.describe()["kernel_journal"]["resyncs"]
        guardian = int(Path(d.state_dir, "journal", "guardian.pid").read_text())
        d.kill()
        logged = logged_entries(r.devs[0])
        subprocess.run(["fio", "--name=fill", f"--filename={r.mapper()}", "--rw=write",
                        "--bs=1M", "--direct=1", "--ioengine=psync", f"--size={SIZE_MB}M",
                        f"--loops={SEGMENT_MIB // SIZE_MB + 2}", "--refill_buffers"],
                       check=True, capture_output=True)
        # log-writes logs a completed write only at the next flush (or as its target
        # goes, at the daemon's swaps), holding a copy in kernel memory until then:
        # with the daemon down, only the guardian's flushes get them logged
        deadline = time.monotonic() + 60
        while logged_entries(r.devs[0]) <= logged:
            assert time.monotonic() < deadline, (
                f"nothing logged during the outage: the kernel holds every write\n"
                f"{d.log()[-2000:]}")
            time.sleep(0.2)
        d.start()
        cmdline = Path(f"/proc/{guardian}/cmdline")   # (gone, or a zombie: empty)
        assert not cmdline.exists() or b"dmrepl.daemon.guardian" not in cmdline.read_bytes(), \
            "the dead daemon's guardian outlived the restart"
        r.wait_converged(timeout=600)
        assert r.describe()["kernel_journal"]["resyncs"] > resyncs, d.log()[-4000:]
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB), \
            d.log()[-4000:]


def logged_entries(name: str) -> int:
    """The entries ``name``'s log-writes target has logged into its segment so far
    (its status: ``<logged entries> <highest allocated sector>``, then
    ``logging_disabled`` once the segment filled)."""
    _start, _length, target, entries, *_rest = subprocess.run(
        ["dmsetup", "status", name], capture_output=True, text=True, check=True
    ).stdout.split()
    assert target == "log-writes"
    return int(entries)


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
        st = r.describe()
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
    size_mb = 16      # (the site's disks: four era blocks)
    with Replicated(lab, d, "dmrepl-test-kjera", size_mb=size_mb, log_mb=32,
                    remote_policy="async", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        assert r.describe()["kernel_journal"]["era_record"]
        # what a kernel journal cannot follow is refused, and changes nothing
        table = r.check(d.cli("table", r.rep))
        proc = d.cli("message", r.rep, "0", "slink", "message", "1", "policy", "sync")
        assert proc.returncode == 3 and "kernel journal" in proc.stderr, proc.stderr
        assert r.check(d.cli("table", r.rep)) == table
        r.check(d.cli("message", r.rep, "0", "slink", "message", "1", "policy", "async"))
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
        st = r.describe()["kernel_journal"]
        assert st["resyncs"] == 1 and 0 < st["resync_bytes"] <= 4 * MB, (st, d.log()[-3000:])
        assert digest(r.remotes[0], size_mb * MB) == digest(r.locals[0], size_mb * MB)


def suspended(name: str) -> bool:
    proc = subprocess.run(["dmsetup", "info", name], capture_output=True, text=True,
                          check=True)
    return "SUSPENDED" in proc.stdout


def test_past_its_fall_behind_limit_the_device_is_held_and_a_dead_daemon_lets_it_go(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """An async site link with a fall-behind limit: the kernel journal's device
    waits (suspended) while the site is past it, counting the journal's writes not
    yet in the replication log.  The daemon killed while it waits: its guardian
    resumes the device and the writes go on."""
    d, site, lab = kj
    with Replicated(lab, d, "dmrepl-test-kjlag", size_mb=SIZE_MB, log_mb=32,
                    remote_policy="async ios 64", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        assert r.describe()["structure"] == "log-writes"
        w = Writer([(r.mapper(), i % BLOCKS) for i in range(3 * BLOCKS)]).start()
        try:
            w.wait_acked(200, timeout=300)
            site.netem(2000)     # round trips of 4 s: the site falls behind, stays so
            deadline = time.monotonic() + 120
            while not (suspended(r.devs[0]) and not time.sleep(0.5)
                       and suspended(r.devs[0])):
                assert time.monotonic() < deadline, "the device was never held"
                assert w.thread.is_alive(), w.error
            # (suspended twice, 0.5 s apart: not a segment swap's moment)
            assert r.describe()["kernel_journal"]["writes_held"]
            at_hold = w.acked
            time.sleep(2)
            assert w.acked == at_hold, "writes went on while the device was held"
            d.kill()
            trace(f"kill -9 with the device held, after {at_hold + 1} acknowledged writes")
            w.wait_acked(at_hold + 200, timeout=300)   # the guardian resumed it
            assert not suspended(r.devs[0])
            assert f"the daemon is gone: resumed {r.devs[0]}" in d.log()
        finally:
            site.netem(20)
            w.stop.set()
            w.thread.join(300)
        assert w.error is None
        d.start()
        trace("daemon restarted")
        # what the kernel journalled meanwhile counts: held while it drains
        r.wait_converged(timeout=600)
        assert r.describe()["kernel_journal"]["holds"] >= 1
        assert seqs_present(r, r.remotes, BLOCKS) == seqs_present(r, r.locals, BLOCKS)
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)


def test_a_second_device_joins_the_kernel_journal_and_the_order_holds_across_them(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """A kernel journal keeps its own device's write order; a second device on
    its replicator joins it: one journal for both (each device a slice of it),
    the first switched in place, its own journal drained into the replication
    log first; then writes alternating between the two devices reach the remote
    site as a prefix of their history.  Once the second device is removed, the
    first is a kernel journal of its own again, in place, under a writer."""
    d, site, lab = kj
    disks = site.take(3)
    with Replicated(lab, d, "dmrepl-test-kjtwo", size_mb=8, log_mb=16, remote_policy="async",
                    delay_ms=30, site=site, site_disks=disks[:1]) as r:
        assert r.describe()["structure"] == "log-writes"
        name2 = "dmrepl-test-kjtwo-1"
        mapper2 = f"/dev/mapper/{name2}"
        per_dev = 8 * MB // BLOCK
        # every write to a block of its own (an overwritten stamp would look missing)
        targets = [(r.mapper(), b) for b in range(64)] + [
            (r.mapper() if i % 2 else mapper2, 64 + (i // 2 * 7919) % (per_dev - 64))
            for i in range(160)]
        Writer(targets[:64]).run()        # into the kernel journal
        local2 = lab.disk(f"{name2}-l", 8)
        r.check(d.cli("create", name2, "--table",
                      f"0 {8 * MB // 512} replicator-dev {r.rep} 1 0 1 {local2} nolog 0 "
                      f"1 1 {site.url_of(disks[1])} core 2 1024 nosync"))
        try:
            st = r.describe()
            assert st["structure"] == "log-writes", st
            assert st["kernel_journal"]["group"] == [r.devs[0], name2], st
            group_dev = st["kernel_journal"]["device"]
            assert " linear " in table(r.devs[0]) and " linear " in table(name2)
            assert " log-writes " in table(group_dev)
            assert subprocess.run(["dmsetup", "info", f".{r.devs[0]}.era"],
                                  capture_output=True).returncode, "its era device stayed"
            assert f"structure-changed object=replicator-dev name={r.devs[0]}" in d.log()
            w = Writer(targets).start()   # (its first 64 writes: the same stamps again)
            w.wait_acked(120, timeout=300)
            site.cut()
            w.thread.join(300)
            assert w.error is None and w.acked == len(targets) - 1
            remotes = [r.remotes[0], site.disks[disks[1]]]
            locals_ = [r.locals[0], local2]

            def present(devs: list[str]) -> set[int]:
                seqs: set[int] = set()
                for i, dev in enumerate(devs):
                    for b, s in enumerate(read_blocks(dev, per_dev)):
                        if s is not None:
                            assert targets[s] == ([r.mapper(), mapper2][i], b), s
                            seqs.add(s)
                return seqs
            assert_prefix(present(remotes), "the remote site (both devices), mid-stream")
            site.restore()
            r.wait_converged(timeout=600)
            assert present(remotes) == present(locals_) == set(range(len(targets)))
            for remote, local in zip(remotes, locals_, strict=True):
                assert digest(remote, 8 * MB) == digest(local, 8 * MB)
            # a third device joins (a group of three), is written, and leaves again
            name3 = "dmrepl-test-kjtwo-2"
            local3 = lab.disk(f"{name3}-l", 8)
            r.check(d.cli("create", name3, "--table",
                          f"0 {8 * MB // 512} replicator-dev {r.rep} 2 0 1 {local3} nolog 0 "
                          f"1 1 {site.url_of(disks[2])} core 2 1024 nosync"))
            try:
                assert r.describe()["kernel_journal"]["group"] == [r.devs[0], name2, name3]
                Writer([(f"/dev/mapper/{name3}" if i % 3 == 2 else mapper2 if i % 3
                         else r.mapper(), per_dev - 1 - i // 3) for i in range(90)]).run()
                r.check(d.cli("remove", name3, "--wait", "120"))
            finally:
                d.cli("remove", name3, "--wait", "120")
            assert digest(site.disks[disks[2]], 8 * MB) == digest(local3, 8 * MB)
            st = r.describe()
            assert st["kernel_journal"]["group"] == [r.devs[0], name2], st
            r.wait_converged(timeout=600)
            for remote, local in zip(remotes, locals_, strict=True):
                assert digest(remote, 8 * MB) == digest(local, 8 * MB)
            # alone again, under a writer: a kernel journal of its own
            later = [(r.mapper(), b) for b in range(per_dev - 256, per_dev)]
            w = Writer(later).start()
            w.wait_acked(40, timeout=300)
            r.check(d.cli("remove", name2, "--wait", "120"))
            w.thread.join(300)
            assert w.error is None and w.acked == len(later) - 1
            st = r.describe()
            assert st["structure"] == "log-writes" and "group" not in st["kernel_journal"], st
            assert " log-writes " in table(r.devs[0])
            assert subprocess.run(["dmsetup", "info", group_dev],
                                  capture_output=True).returncode, "the group's device stayed"
            Writer([(r.mapper(), b) for b in range(64, 128)]).run()
            r.wait_converged(timeout=600)
            assert digest(r.remotes[0], 8 * MB) == digest(r.locals[0], 8 * MB)
        finally:
            d.cli("remove", name2, "--wait", "120")


def test_a_group_outlives_its_daemon_and_a_crash_resyncs_what_it_lost(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """Two devices in one kernel journal: ``kill -9`` of the daemon under a writer
    alternating between them: no write fails, the restarted daemon takes the
    group over and drains it, the remote equals the local devices.  Then a crash
    (the daemon killed, every device torn down without a flush): the restart
    builds the group again and resynchronises what its journal lost."""
    d, site, lab = kj
    per_dev = SIZE_MB * MB // BLOCK
    with Replicated(lab, d, "dmrepl-test-kjgroup", size_mb=SIZE_MB, log_mb=32, ndev=2,
                    remote_policy="async", delay_ms=20, site=site,
                    site_disks=site.take(2)) as r:
        for i in range(2):
            st = r.describe(i)
            assert st["structure"] == "log-writes" and st["kernel_journal"]["group"] == r.devs
        group_dev = r.describe()["kernel_journal"]["device"]
        targets = [(r.mapper(i % 2), (i // 2 * 7919) % per_dev) for i in range(1200)]
        w = Writer(targets).start()
        outage_under(w, d)
        w.thread.join(600)
        assert w.error is None and w.acked == len(targets) - 1
        r.wait_converged(timeout=600)
        st = r.describe()
        assert st["kernel_journal"]["group"] == r.devs and \
            st["kernel_journal"]["resyncs"] == 0, (st, d.log()[-4000:])
        for remote, local in zip(r.remotes, r.locals, strict=True):
            assert digest(remote, SIZE_MB * MB) == digest(local, SIZE_MB * MB)
        # a crash: the kernel's journal in memory is lost with the devices
        w = Writer([(r.mapper(i % 2), (i * 7919) % per_dev) for i in range(4000)]).start()
        w.wait_acked(300, timeout=300)
        d.kill()
        for name in [*r.devs, group_dev]:
            subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True)
        w.thread.join(300)
        trace(f"crash after {w.acked + 1} acknowledged writes ({w.error})")
        d.start()
        trace("daemon restarted")
        r.wait_converged(timeout=600)
        st = r.describe()
        assert st["kernel_journal"]["group"] == r.devs and \
            st["kernel_journal"]["resyncs"] == 1, (st, d.log()[-4000:])
        for remote, local in zip(r.remotes, r.locals, strict=True):
            assert digest(remote, SIZE_MB * MB) == digest(local, SIZE_MB * MB)
        w2 = Writer([(r.mapper(1), 0)])
        w2.run()
        assert w2.error is None


def test_a_group_member_that_does_not_come_back_leaves_the_others_journalled(
        kj: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """A restart where one member of a group cannot be made again (its local
    device is gone): the group cannot be put back without it; the member that
    came back is journalled again on its own and resynchronised whole, and the
    restart says what it could not recreate."""
    d, site, lab = kj
    with Replicated(lab, d, "dmrepl-test-kjpart", size_mb=SIZE_MB, log_mb=32, ndev=2,
                    remote_policy="async", delay_ms=20, site=site,
                    site_disks=site.take(2)) as r:
        assert r.describe(1)["kernel_journal"]["group"] == r.devs
        Writer([(r.mapper(i % 2), i) for i in range(200)]).run()
        r.wait_converged(timeout=600)
        assert d.stop() == 0, d.log()
        gone = r.locals[1].removeprefix("/dev/mapper/")
        subprocess.run(["dmsetup", "rename", gone, f"{gone}-away"], check=True)
        try:
            d.start()
            assert f"could not recreate {r.devs[1]}" in d.log()
            assert "kernel-journal-group-incomplete" in d.log()
            r.devs = r.devs[:1]
            st = r.describe()
            assert st["structure"] == "log-writes" and "group" not in st["kernel_journal"], st
            Writer([(r.mapper(), BLOCKS - 1 - i) for i in range(50)]).run()
            r.wait_converged(timeout=600)
            assert r.slink()["resync_bytes"] >= SIZE_MB * MB, r.slink()
            assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)
        finally:
            subprocess.run(["dmsetup", "rename", f"{gone}-away", gone], check=False)
