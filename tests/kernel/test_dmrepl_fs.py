"""A filesystem and fio --verify on /dev/mapper/NAME, replicated to a remote site."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from dmrepl.daemon.testing import DaemonProcess, KernelLab

ENGINE = os.environ.get("DMREPL_ENGINE", "auto")
MB = 1 << 20


def sh(*argv: str, timeout: float = 300) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture
def replicated() -> Iterator[tuple[DaemonProcess, KernelLab, str, str]]:
    with KernelLab("fs") as lab, tempfile.TemporaryDirectory() as work:
        log = lab.disk("dmrepl-test-fs-log", 64)
        local = lab.disk("dmrepl-test-fs-local", 128)
        remote = lab.disk("dmrepl-test-fs-remote", 128)
        site = lab.site(remote, delay_ms=20)
        d = DaemonProcess(work, engine=ENGINE).start()
        try:
            r = d.cli("create", "dmrepl-test-fs-rep", "--table",
                      f"0 1 replicator ringbuffer 4 {log} 0 auto {63 * MB // 512} "
                      "blockdev 2 0 sync blockdev 4 1 async ios 10000")
            assert r.returncode == 0, r.stderr + d.log()
            r = d.cli("create", "dmrepl-test-fs", "--table",
                      f"0 {128 * MB // 512} replicator-dev dmrepl-test-fs-rep 0 "
                      f"0 1 {local} nolog 0 1 1 {site.url} core 2 1024 sync")
            assert r.returncode == 0, r.stderr + d.log()
            assert r.stdout.startswith("dmrepl-test-fs: /dev/mapper/dmrepl-test-fs (over /dev/nbd")
            yield d, lab, local, remote
        finally:
            d.cli("remove", "dmrepl-test-fs")
            d.cli("remove", "dmrepl-test-fs-rep")
            assert d.stop() == 0, d.log()


def test_mkfs_files_and_fio_verify(replicated: tuple[DaemonProcess, KernelLab, str, str],
                                   tmp_path) -> None:  # type: ignore[no-untyped-def]
    d, _, _, _ = replicated
    dev = "/dev/mapper/dmrepl-test-fs"
    assert os.path.exists(dev)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", dev, str(mnt))
    try:
        payload = os.urandom(3 * MB)
        for i in range(5):
            (mnt / f"file{i}").write_bytes(payload[i:] + payload[:i])
        os.sync()
    finally:
        sh("umount", str(mnt))
    sh("fsck.ext4", "-n", "-f", dev)
    sh("mount", dev, str(mnt))
    try:
        for i in range(5):
            assert (mnt / f"file{i}").read_bytes() == payload[i:] + payload[:i]
    finally:
        sh("umount", str(mnt))
    out = sh("fio", "--name=verify", f"--filename={dev}", "--rw=randwrite", "--bs=4k",
             "--size=24M", "--offset=96M", "--direct=1", "--ioengine=libaio", "--iodepth=16",
             "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output-format=terse",
             timeout=400)
    assert out.strip(), "fio printed nothing"
    status = d.cli("status", "dmrepl-test-fs")
    assert status.returncode == 0 and "replicator-dev" in status.stdout
