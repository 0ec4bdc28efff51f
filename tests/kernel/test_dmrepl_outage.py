"""The replicated device outlives its daemon, and the whole primary's crash.

/dev/mapper/NAME is a kernel mirror of the local device and the daemon's journal
leg: a dead daemon fails only the journal leg, so the filesystem on the device
keeps working, and what the remote site missed is in the mirror's dirty log.

The daemon and the remote site are the session's (``dmrepl`` in conftest.py)."""

from __future__ import annotations

import glob
import hashlib
import mmap
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dmrepl_testing.daemon import Replicated, trace
from tests.kernel.test_dmrepl_crash import BLOCK, Writer, read_blocks, seqs_present

MB = 1 << 20


def sh(*argv: str, timeout: float = 300) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def digest(dev: str, size: int) -> str:
    """sha256 of the device, read past the page cache (O_DIRECT): the kernel mirror
    writes the local device behind the cache of its /dev node."""
    h = hashlib.sha256()
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MB)
    try:
        pos = 0
        while pos < size:
            n = os.preadv(fd, [memoryview(buf)[:min(MB, size - pos)]], pos)
            assert n > 0, f"{dev}: short read at {pos}"
            h.update(memoryview(buf)[:n])
            pos += n
    finally:
        os.close(fd)
    return h.hexdigest()


def mount_options(mnt: Path) -> list[str]:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mnt):
                return fields[3].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def write_and_fsync(path: Path, data: bytes, timeout: float) -> None:
    """Write a file and fsync it in a thread; fail if that takes over ``timeout``."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:   # reported by the test below
            error.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"writing {path} hung for {timeout}s"
    assert not error, f"writing {path} failed: {error[0]}"


def fio_verify(path: Path, loops: int) -> subprocess.Popen[str]:
    """fio writing 4 KiB random blocks (QD4, O_DIRECT) to the file ``path``,
    verifying each (crc32c), ``loops`` times over 8 MiB."""
    return subprocess.Popen(
        ["fio", "--name=outage", f"--filename={path}", "--size=8M", "--bs=4k",
         "--rw=randwrite", "--direct=1", "--ioengine=libaio", "--iodepth=4",
         "--verify=crc32c", "--verify_fatal=1", f"--loops={loops}", "--randrepeat=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("structure", ["mirror", "log-writes"])
def test_kill_9_under_ext4_and_fio_verify(dmrepl: Any, tmp_path: Path, structure: str) -> None:
    """The mirror (its journal leg fails, the local leg goes on) and the kernel
    journal (the kernel journals on, the next daemon drains it)."""
    d, site, lab = dmrepl
    size_mb = 16   # the session site's disks
    with Replicated(lab, d, "dmrepl-test-outage", size_mb=size_mb, log_mb=32,
                    structure=structure, remote_policy="async ios 100000", delay_ms=10,
                    site=site, site_disks=site.take()) as r:
        assert r.describe()["structure"] == structure
        dev = r.mapper()
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
           dev)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        sh("mount", dev, str(mnt))
        try:
            fio = fio_verify(mnt / "fio.dat", loops=3)
            before = r.status()["ring"]["next_seq"]
            r.wait_for("fio writing", lambda st: st["ring"]["next_seq"] > before + 300,
                       timeout=180)
            d.kill()
            trace("daemon killed under fio")
            # the filesystem takes (durable) writes while the daemon is down
            write_and_fsync(mnt / "during-outage", b"x" * 65536, timeout=120)
            assert "rw" in mount_options(mnt)
            assert fio.poll() is None or fio.returncode == 0, fio.communicate()[0]
            trace("a file written and fsynced during the outage")
            d.start()
            trace("daemon restarted")
            out, _ = fio.communicate(timeout=900)
            assert fio.returncode == 0, f"fio failed:\n{out}"
            assert "verify" not in out.lower() or "err= 0" in out, out
            assert "rw" in mount_options(mnt)
            write_and_fsync(mnt / "after-outage", b"y" * 65536, timeout=120)
        finally:
            sh("umount", str(mnt))
        sh("fsck.ext4", "-n", "-f", dev)
        r.wait_converged(timeout=600)
        size = size_mb * MB
        assert digest(r.remotes[0], size) == digest(r.locals[0], size), \
            "the remote differs from the local device after convergence"


def _mirror_log_loops(state_dir: str) -> list[str]:
    loops = []
    for path in glob.glob(os.path.join(state_dir, "mirror-logs", "*.log")):
        out = subprocess.run(["losetup", "-j", path, "-n", "-O", "NAME"],
                             capture_output=True, text=True).stdout.split()
        loops += out
    return loops


def test_whole_primary_crash(dmrepl: Any) -> None:
    """Every process killed and every device torn down without a flush, then all
    started again from what is on disk: the writes around the crash reach the
    remote site, and it equals the local devices."""
    d, site, lab = dmrepl
    with Replicated(lab, d, "dmrepl-test-primary", size_mb=8, log_mb=16, ndev=2,
                    structure="mirror", remote_policy="async ios 100000", delay_ms=20,
                    site=site, site_disks=site.take(2)) as r:
        per_dev = (8 << 20) // BLOCK
        targets = [(r.mapper(i % 2), (i * 7919) % per_dev) for i in range(2 * per_dev)]
        w = Writer(targets).start()
        w.wait_acked(300)
        # the crash: the daemon, then the kernel's devices, with writes in flight
        d.kill()
        for name in r.devs:
            subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True)
        w.thread.join(300)
        assert not w.thread.is_alive()
        acked = w.acked
        trace(f"crash after {acked + 1} acknowledged writes ({w.error})")
        for name in r.devs:   # (gone already unless an opener held it)
            if subprocess.run(["dmsetup", "info", name], capture_output=True).returncode == 0:
                sh("dmsetup", "remove", "--retry", name)
        for loop in _mirror_log_loops(d.state_dir):
            sh("losetup", "-d", loop)
        # every acknowledged write is on the local devices (or a later one in its place)
        on_local: dict[tuple[str, int], int] = {}
        for i, path in enumerate(r.locals):
            for block, seq in enumerate(read_blocks(path, per_dev)):
                if seq is not None:
                    assert targets[seq] == (r.mapper(i), block), f"write {seq} misplaced"
                    on_local[(r.mapper(i), block)] = seq
        for seq in range(acked + 1):
            assert on_local.get(targets[seq], -1) >= seq, \
                f"acknowledged write {seq} is not on the local device"
        local_seqs = set(on_local.values())
        # the restart, from the persistent state only
        d.start()
        trace("daemon restarted")
        r.wait_converged(timeout=600)
        for local, remote in zip(r.locals, r.remotes, strict=True):
            assert digest(remote, 8 * MB) == digest(local, 8 * MB), \
                f"remote {remote} differs from local {local}"
        assert seqs_present(r, r.remotes, per_dev) == local_seqs
        # and the devices take writes again
        w2 = Writer([(r.mapper(0), 0)])
        w2.run()
        assert w2.error is None


def test_a_journal_leg_that_fails_under_a_live_daemon_is_replaced(dmrepl: Any) -> None:
    """The kernel gives up the journal leg (here: its nbd device is disconnected
    under writes) while the daemon runs: the daemon attaches a new one, the writes
    never fail, and the remote converges."""
    d, site, lab = dmrepl
    with Replicated(lab, d, "dmrepl-test-rejoin", size_mb=8, log_mb=16,
                    structure="mirror", remote_policy="async ios 100000", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        blocks = (8 << 20) // BLOCK
        # (QD1 O_DSYNC writes through the journal leg, one remote round trip each:
        # enough to outlast the rejoin, not the kernel tier's time)
        w = Writer([(r.mapper(), i % blocks) for i in range(blocks)]).start()
        w.wait_acked(100)
        old = r.describe()["nbd"]
        sh("nbd-client", "-d", old)          # the journal leg fails under the writer
        trace(f"{old} disconnected under writes")
        deadline = time.monotonic() + 120
        while r.describe()["nbd"] == old:
            assert time.monotonic() < deadline, "the daemon did not replace the journal leg"
            assert w.thread.is_alive() or w.error is None, f"writer failed: {w.error}"
            time.sleep(0.2)
        trace(f"journal leg now {r.describe()['nbd']}")
        w.thread.join(600)
        assert w.error is None, f"the writer saw {w.error}"
        assert w.acked == blocks - 1
        r.wait_converged(timeout=600)
        assert not r.describe()["journal"]["failed"]
        assert digest(r.remotes[0], 8 * MB) == digest(r.locals[0], 8 * MB)
