"""A filesystem and fio --verify on /dev/mapper/NAME, replicated to a remote site.

The daemon and the remote site are the session's (``dmrepl_session`` in conftest.py);
the device is this module's."""

from __future__ import annotations

import glob
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl_testing.daemon import DaemonProcess, KernelLab, trace

MB = 1 << 20
SIZE_MB = 16


def sh(*argv: str, timeout: float = 300) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def replicated(dmrepl_session: Any) -> Iterator[tuple[DaemonProcess, KernelLab, str, str]]:
    d, site = dmrepl_session
    if d.proc is None or d.proc.poll() is not None:
        d.start()
    site.reset(20)
    with KernelLab("fs") as lab:
        log = lab.disk("dmrepl-test-fs-log", 16)
        local = lab.disk("dmrepl-test-fs-local", SIZE_MB)
        (disk,) = site.take()
        remote = site.disks[disk]
        try:
            r = d.cli("create", "dmrepl-test-fs-rep", "--table",
                      f"0 1 replicator ringbuffer 4 {log} 0 auto {15 * MB // 512} "
                      "blockdev 2 0 sync blockdev 4 1 async ios 10000")
            assert r.returncode == 0, r.stderr + d.log()
            # (a mirror: its table switches are tested here; a kernel journal, what
            # the daemon would make of it, refuses them)
            r = d.cli("create", "dmrepl-test-fs", "--structure", "mirror", "--table",
                      f"0 {SIZE_MB * MB // 512} replicator-dev dmrepl-test-fs-rep 0 "
                      f"0 1 {local} nolog 0 1 1 {site.url_of(disk)} core 2 1024 sync")
            assert r.returncode == 0, r.stderr + d.log()
            assert r.stdout.startswith("dmrepl-test-fs: /dev/mapper/dmrepl-test-fs (mirror of "
                                       "the local device and the journal leg /dev/nbd")
            yield d, lab, local, remote
        finally:
            for name in ("dmrepl-test-fs", "dmrepl-test-fs-rep"):
                r = d.cli("remove", name, "--wait", "120")
                assert r.returncode == 0, r.stderr + d.log()


def test_mkfs_files_and_fio_verify(replicated: tuple[DaemonProcess, KernelLab, str, str],
                                   tmp_path) -> None:  # type: ignore[no-untyped-def]
    d, _, _, _ = replicated
    dev = "/dev/mapper/dmrepl-test-fs"
    assert os.path.exists(dev)
    trace("mkfs.ext4")
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", dev)
    trace("mount + files")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", dev, str(mnt))
    try:
        payload = os.urandom(1 * MB)
        for i in range(5):
            (mnt / f"file{i}").write_bytes(payload[i:] + payload[:i])
        os.sync()
    finally:
        sh("umount", str(mnt))
    trace("fsck")
    sh("fsck.ext4", "-n", "-f", dev)
    sh("mount", dev, str(mnt))
    try:
        for i in range(5):
            assert (mnt / f"file{i}").read_bytes() == payload[i:] + payload[:i]
    finally:
        sh("umount", str(mnt))
    trace("fio --verify")
    out = sh("fio", "--name=verify", f"--filename={dev}", "--rw=randwrite", "--bs=4k",
             "--size=2M", f"--offset={SIZE_MB - 2}M", "--direct=1", "--ioengine=libaio",
             "--iodepth=16",
             "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
             "--do_verify=1", "--output-format=terse",
             timeout=400)
    assert out.strip(), "fio printed nothing"
    status = d.cli("status", "dmrepl-test-fs")
    assert status.returncode == 0 and "replicator-dev" in status.stdout


def test_bad_tables_and_messages_leave_running_devices_alone(
        replicated: tuple[DaemonProcess, KernelLab, str, str]) -> None:
    d, _, local, _ = replicated
    dev = "/dev/mapper/dmrepl-test-fs"
    before = d.cli("table").stdout
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)     # the device is in use meanwhile
    try:
        cases = [
            (["create", "dmrepl-test-bad", "--table", "0 8 replicator ringbuffer 4 /nonexistent "
              "0 auto 64 blockdev 2 0 sync"], 3),
            (["create", "dmrepl-test-bad", "--table", "0 8 replicator-dev dmrepl-test-fs-rep 0 "
              f"0 1 {local} nolog 0"], 3),                          # local already in use
            (["create", "dmrepl-test-bad", "--table", "0 x linear /dev/null 0"], 3),
            (["create", "dmrepl-test-bad", "--table", "0 8 replicator-dev nosuch 9 "
              "0 1 /dev/null nolog 0"], 4),
            (["message", "dmrepl-test-fs-rep", "0", "slink", "99", "policy", "sync"], 3),
            (["message", "dmrepl-test-fs", "0", "device", "del", "0"], 3),
            (["message", "dmrepl-test-fs", "0", "explode"], 3),
            (["remove", "dmrepl-test-fs"], 6),                      # open: busy
            (["remove", "dmrepl-test-fs-rep"], 6),                  # has a device
            (["load", "dmrepl-test-fs", "--table", "0 8 replicator-dev dmrepl-test-fs-rep 0 "
              f"0 1 {local} nolog 0"], 3),                          # size change
        ]
        for argv, code in cases:
            r = d.cli(*argv)
            assert r.returncode == code, (argv, r.returncode, r.stderr)
            assert r.stderr.startswith("dmrepl: error: ") and r.stderr.count("\n") == 1, r.stderr
        block = os.urandom(4096)
        import mmap
        buf = mmap.mmap(-1, 4096)
        buf[:] = block
        assert os.pwrite(fd, buf, 4096 * 100) == 4096
        trace('cli errors checked, device still writable')
        back = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [back], 4096 * 100) == 4096
        assert bytes(back) == block
    finally:
        os.close(fd)
    assert d.cli("table").stdout == before
    assert "dmrepl-test-bad" not in d.cli("ls").stdout


def _switch_table(d: DaemonProcess, table: str, timeout: float = 300) -> None:
    """dmrepl load, then resume until the switch is done (busy while writes are
    not yet at every site link)."""
    r = d.cli("load", "dmrepl-test-fs", "--table", table)
    assert r.returncode == 0, r.stderr + d.log()
    deadline = time.monotonic() + timeout
    while True:
        r = d.cli("resume", "dmrepl-test-fs")
        if r.returncode == 0:
            return
        assert r.returncode == ExitCode.BUSY and time.monotonic() < deadline, \
            r.stderr + d.log()
        time.sleep(1)


def _loops_over(path: str) -> list[str]:
    """The loop devices whose backing file is ``path`` (or was, deleted since)."""
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        with open(backing) as f:
            if f.read().strip().removesuffix(" (deleted)") == path:
                found.append(backing.split("/")[3])
    return found


def test_a_table_switch_that_moves_a_line_deletes_the_old_lines_mirror_log(
        replicated: tuple[DaemonProcess, KernelLab, str, str]) -> None:
    """One line -> two lines (a second line's log file is made) -> one line again:
    the second line's log file is deleted with the table that used it; the first
    line's, at the same start throughout, stays."""
    d, lab, _, _ = replicated
    r = d.cli("table", "dmrepl-test-fs")
    assert r.returncode == 0, r.stderr
    (one_line,) = r.stdout.splitlines()
    sectors = SIZE_MB * MB // 512
    half = sectors // 2
    assert one_line.startswith(f"0 {sectors} "), one_line
    local2 = lab.disk("dmrepl-test-fs-local2", SIZE_MB // 2)
    remote2 = lab.disk("dmrepl-test-fs-remote2", SIZE_MB // 2)
    two_lines = (f"0 {half} {one_line.removeprefix(f'0 {sectors} ')}\n"
                 f"{half} {half} replicator-dev dmrepl-test-fs-rep 1 0 1 {local2} nolog 0 "
                 f"1 1 {remote2} core 2 1024 sync")
    logs = os.path.join(d.state_dir, "mirror-logs")
    first_log = os.path.join(logs, "dmrepl-test-fs@0.log")
    moved_log = os.path.join(logs, f"dmrepl-test-fs@{half}.log")
    _switch_table(d, two_lines)
    trace("switched to two lines")
    assert os.path.exists(first_log) and os.path.exists(moved_log)
    assert _loops_over(moved_log)
    _switch_table(d, one_line)
    trace("switched back to one line")
    assert os.path.exists(first_log) and _loops_over(first_log)
    assert not os.path.exists(moved_log), os.listdir(logs)
    assert not _loops_over(moved_log)
