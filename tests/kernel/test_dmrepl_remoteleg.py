"""/dev/mapper/NAME as a raid1 of the local device and the remote site's export
(``--tuning remote_leg=1``, a sync site link): the kernel writes both legs, the
daemon is in no write's or read's path.

A daemon of its own (the tuning is the daemon's) and the session's remote site.
The writes are sequence-stamped (tests/kernel/test_dmrepl_crash.py)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl_testing.daemon import DaemonProcess, KernelLab, RemoteSite, Replicated, trace
from tests.kernel.test_dmrepl_crash import BLOCK, Writer, read_blocks, seqs_present
from tests.kernel.test_dmrepl_outage import (
    digest,
    fio_verify,
    mount_options,
    sh,
    write_and_fsync,
)

pytestmark = pytest.mark.kernel

MB = 1 << 20
SIZE_MB = 16   # the session site's disks
BLOCKS = SIZE_MB * MB // BLOCK
#: sequence-stamped writes per test: each waits for the site's round trip (40 ms)
WRITES = 600


@pytest.fixture(scope="module")
def rdaemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("remoteleg"),
                      tuning={"retry_interval": 1, "remote_leg": True}).start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


@pytest.fixture
def rl(rdaemon: DaemonProcess, dmrepl_session: Any
       ) -> Iterator[tuple[DaemonProcess, RemoteSite, KernelLab]]:
    """This module's daemon (running), the session's remote site (link up, 20 ms),
    a lab for the test's disks."""
    if rdaemon.proc is None or rdaemon.proc.poll() is not None:
        rdaemon.start()
    site = dmrepl_session[1]
    site.reset(20)
    with KernelLab("rl") as lab:
        yield rdaemon, site, lab


def nbd_reads(nbd: str) -> int:
    with open(f"/sys/block/{os.path.basename(nbd)}/stat") as f:
        return int(f.read().split()[0])


def nbd_writes(nbd: str) -> int:
    with open(f"/sys/block/{os.path.basename(nbd)}/stat") as f:
        return int(f.read().split()[4])


def wait_leg(r: Replicated, what: str, pred: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        leg = r.describe()["remote_leg"]
        if pred(leg):
            return dict(leg)
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {leg}"
        time.sleep(0.2)


def cut_off_under_writes(r: Replicated, site: RemoteSite, then: int
                         ) -> tuple[Writer, list[tuple[str, int]]]:
    """A writer running, the site cut off until md fails the remote leg, then
    ``then`` more writes acknowledged (by the local leg alone)."""
    targets = [(r.mapper(), (i * 7919) % BLOCKS) for i in range(WRITES + 1000)]
    w = Writer(targets).start()
    w.wait_acked(200, timeout=300)
    site.cut()
    trace("site cut")
    wait_leg(r, "the remote leg failed", lambda leg: leg["failed"], timeout=120)
    w.wait_acked(w.acked + then, timeout=300)
    assert w.error is None
    return w, targets


def crash_primary(r: Replicated) -> None:
    """What a crash of the primary does: the daemon killed, then every kernel
    device it made gone without a flush (the device, the remote's nbd device,
    the loop devices over the metadata files)."""
    nbd = r.describe()["remote_leg"]["device"]
    r.daemon.kill()
    subprocess.run(["dmsetup", "remove", "--force", r.devs[0]], capture_output=True)
    if nbd:   # (None: the daemon's attempt to attach the remote again let it go)
        subprocess.run(["nbd-client", "-d", nbd], capture_output=True)
    for path in glob.glob(os.path.join(r.daemon.state_dir, "raid", "*.meta*")):
        for loop in subprocess.run(["losetup", "-j", path, "-n", "-O", "NAME"],
                                   capture_output=True, text=True).stdout.split():
            sh("losetup", "-d", loop)


def sync_replicated(lab: KernelLab, d: DaemonProcess, site: RemoteSite,
                    name: str, policy: str = "sync") -> Replicated:
    return Replicated(lab, d, name, size_mb=SIZE_MB, log_mb=16, remote_policy=policy,
                      delay_ms=20, site=site, site_disks=site.take())


def test_an_acknowledged_write_is_on_the_remote_and_reads_stay_local(
        rl: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    d, site, lab = rl
    # (md's recovery capped at the site link's resync_rate: 512 MiB/s)
    with sync_replicated(lab, d, site, "dmrepl-test-rl", "sync resync_rate 512m") as r:
        desc = r.describe()
        assert desc["structure"] == "raid1", desc
        assert " raid raid1 " in sh("dmsetup", "table", r.devs[0])
        assert " max_recovery_rate 524288 " in sh("dmsetup", "table", r.devs[0])
        nbd = desc["remote_leg"]["device"]
        targets = [(r.mapper(), (i * 7919) % BLOCKS) for i in range(WRITES)]
        w = Writer(targets).start()
        w.wait_acked(WRITES // 3, timeout=300)
        acked = w.acked
        # mid-stream, without waiting for anything: every acknowledged write (or a
        # later one to its block) is on the remote
        on_remote = dict(enumerate(read_blocks(r.remotes[0], BLOCKS)))
        for seq in range(acked + 1):
            got = on_remote[targets[seq][1]]
            assert got is not None and got >= seq, f"acknowledged write {seq} not on the remote"
        w.thread.join(600)
        assert w.error is None and w.acked == WRITES - 1
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)
        # reads go to the local leg only
        before = nbd_reads(nbd)
        assert digest(r.mapper(), SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)
        assert nbd_reads(nbd) == before, "a read of the device reached the remote leg"
        # what a raid1 cannot follow is refused, and changes nothing
        table = r.check(d.cli("table", r.rep))
        for name, words in ((r.rep, ["slink", "message", "1", "policy", "async"]),
                            (r.rep, ["slink", "message", "1", "fallbehind", "ios", "100",
                                     "policy", "async"]),
                            (r.devs[0], ["device", "del", "1"])):
            proc = d.cli("message", name, "0", *words)
            assert proc.returncode == 3 and "raid1" in proc.stderr, (words, proc.stderr)
        assert r.check(d.cli("table", r.rep)) == table
        r.check(d.cli("message", r.rep, "0", "slink", "message", "1", "policy", "sync"))


def test_kill_9_under_ext4_and_fio_verify_changes_nothing(
        rl: tuple[DaemonProcess, RemoteSite, KernelLab], tmp_path: Path) -> None:
    d, site, lab = rl
    with sync_replicated(lab, d, site, "dmrepl-test-rlkill") as r:
        dev = r.mapper()
        sh("mkfs.ext4", "-q", "-F", "-E",
           "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        sh("mount", dev, str(mnt))
        nbd = r.describe()["remote_leg"]["device"]
        try:
            fio = fio_verify(mnt / "fio.dat", loops=2)
            start = nbd_writes(nbd)
            deadline = time.monotonic() + 180
            while nbd_writes(nbd) < start + 200:   # fio writing (through both legs)
                assert fio.poll() is None, fio.communicate()[0]
                assert time.monotonic() < deadline, "fio does not write"
                time.sleep(0.2)
            d.kill()
            trace("daemon killed under fio")
            write_and_fsync(mnt / "during-outage", b"x" * 65536, timeout=60)
            assert "rw" in mount_options(mnt)
            d.start()
            trace("daemon restarted")
            desc = r.describe()
            assert desc["structure"] == "raid1" and desc["remote_leg"]["device"] == nbd, desc
            out, _ = fio.communicate(timeout=900)
            assert fio.returncode == 0, f"fio failed:\n{out}"
            assert "rw" in mount_options(mnt)
            write_and_fsync(mnt / "after-outage", b"y" * 65536, timeout=60)
        finally:
            sh("umount", str(mnt))
        sh("fsck.ext4", "-n", "-f", dev)
        r.wait_converged(timeout=300)
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)


def test_the_remote_down_and_back_gets_the_regions_written_meanwhile(
        rl: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    d, site, lab = rl
    with sync_replicated(lab, d, site, "dmrepl-test-rlcut") as r:
        w, targets = cut_off_under_writes(r, site, then=500)
        # the replicator's site link is as its remote leg is (the kernel copies)
        s = r.slink(1)
        assert s["state"] == "down" and s["remote_legs"][r.devs[0]]["failed"], s
        site.restore()
        trace("site restored")
        leg = wait_leg(r, "the remote leg back in sync", lambda leg: leg["in_sync"],
                       timeout=300)
        s = r.slink(1)
        assert s["state"] == "up" and s["remote_legs"][r.devs[0]]["in_sync"], s
        assert leg["rejoins"] >= 1, leg
        events = [line.split("dmrepl.events: ")[1].split()[0] for line in d.log().splitlines()
                  if f"name={r.devs[0]}" in line and "dmrepl.events: remote-leg" in line]
        assert events[:1] == ["remote-leg-failed"] and "remote-leg-rejoined" in events, events
        w.thread.join(900)
        assert w.error is None and w.acked == len(targets) - 1
        r.wait_converged(timeout=300)
        assert seqs_present(r, r.remotes, BLOCKS) == seqs_present(r, r.locals, BLOCKS)
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)


def test_a_crash_of_the_primary_while_the_remote_is_down(
        rl: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """The remote leg failed (its regions marked in md's bitmap), then the whole
    primary crashes: daemon killed, every kernel device torn down without a
    flush.  The restart, from the files only, copies what the remote missed."""
    d, site, lab = rl
    with sync_replicated(lab, d, site, "dmrepl-test-rlcrash") as r:
        w, _targets = cut_off_under_writes(r, site, then=300)
        crash_primary(r)
        w.thread.join(300)
        trace(f"crash after {w.acked + 1} acknowledged writes ({w.error})")
        local = seqs_present(r, r.locals, BLOCKS)
        for seq in range(w.acked + 1):
            assert seq in local or any(s > seq for s in local), seq
        assert seqs_present(r, r.remotes, BLOCKS) != local, \
            "the remote got every write while cut off"
        site.restore()
        d.start()
        trace("daemon restarted")
        r.wait_converged(timeout=300)
        assert r.describe()["remote_leg"]["resynced_bytes"] > 0
        assert seqs_present(r, r.remotes, BLOCKS) == local
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)
        w2 = Writer([(r.mapper(), 0)])
        w2.run()
        assert w2.error is None


def test_a_restart_with_the_remote_down_serves_the_local_device_then_rebuilds_the_remote(
        rl: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """The primary crashes and comes back while the site is still cut off: the
    device is there at once (on the local device), and the remote is copied
    whole once it answers."""
    d, site, lab = rl
    with sync_replicated(lab, d, site, "dmrepl-test-rldown") as r:
        w = Writer([(r.mapper(), (i * 7919) % BLOCKS) for i in range(300)])
        w.run()
        assert w.error is None
        site.cut()
        crash_primary(r)
        d.start()
        trace("daemon restarted, the site still cut off")
        leg = r.describe()["remote_leg"]
        assert leg["failed"], leg
        w2 = Writer([(r.mapper(), (i * 7919 + 1) % BLOCKS) for i in range(300, 900)])
        w2.run()   # local only: no site round trip
        assert w2.error is None
        assert seqs_present(r, r.remotes, BLOCKS) != seqs_present(r, r.locals, BLOCKS)
        site.restore()
        trace("site restored")
        wait_leg(r, "the remote rebuilt", lambda leg: leg["in_sync"], timeout=300)
        r.wait_converged(timeout=300)
        assert digest(r.remotes[0], SIZE_MB * MB) == digest(r.locals[0], SIZE_MB * MB)


def test_a_remote_that_is_a_block_device_is_the_raid1s_leg_as_it_is(
        rl: tuple[DaemonProcess, RemoteSite, KernelLab]) -> None:
    """A remote the host reaches as a block device (here a loop device; in use an
    NVMe/TCP namespace): no nbd device, the raid1 writes it directly; a restarted
    daemon adopts the device."""
    d, _site, lab = rl
    name = "dmrepl-test-rlblk"
    log, local, remote = (lab.disk(f"{name}-{what}", SIZE_MB) for what in ("log", "l", "r"))
    rep, dev = f"{name}-rep", f"{name}-0"

    def check(proc: subprocess.CompletedProcess[str]) -> str:
        assert proc.returncode == 0, f"{proc.args}: {proc.stderr}\n{d.log()[-4000:]}"
        return proc.stdout
    check(d.cli("create", rep, "--table",
                f"0 1 replicator ringbuffer 4 {log} 0 auto {(SIZE_MB << 20) // 512 - 8} "
                "blockdev 2 0 sync blockdev 2 1 sync"))
    check(d.cli("create", dev, "--table",
                f"0 {(SIZE_MB << 20) // 512} replicator-dev {rep} 0 0 1 {local} nolog 0 "
                f"1 1 {remote} core 2 1024 nosync"))
    try:
        desc = json.loads(check(d.cli("status", dev, "--json")))[0]
        assert desc["structure"] == "raid1" and desc["remote_leg"]["device"] == remote, desc
        w = Writer([(f"/dev/mapper/{dev}", (i * 7919) % BLOCKS) for i in range(2000)])
        w.run()
        assert w.error is None
        assert digest(remote, SIZE_MB * MB) == digest(local, SIZE_MB * MB)
        d.kill()
        d.start()
        desc = json.loads(check(d.cli("status", dev, "--json")))[0]
        assert desc["remote_leg"]["device"] == remote and desc["remote_leg"]["in_sync"], desc
    finally:
        for obj in (dev, rep):
            d.cli("remove", obj, "--wait", "30")
