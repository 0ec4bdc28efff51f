"""A remote site reached over NBD (our own server as the far end), on the host.

The link is "cut" by suspending the remote export: requests hang, the daemon's
NBD client times out, the site link goes down; resuming it is the restore.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl.nbd import Export, FileBackend, NbdServer
from dmrepl_testing.daemon import DaemonProcess

MB = 1 << 20
pytestmark = pytest.mark.skipif(not shutil.which("nbdcopy"), reason="nbdcopy not installed")


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          ) -> Iterator[tuple[DaemonProcess, Export, list[Path]]]:
    paths = [tmp_path / n for n in ("log", "local", "remote")]
    for p, size in zip(paths, (4 * MB, 16 * MB, 16 * MB), strict=True):
        with open(p, "wb") as f:
            f.truncate(size)
    sock = str(tmp_path / "site.sock")
    backend = FileBackend(str(paths[2]))
    monkeypatch.setenv("DMREPL_NBD_TIMEOUT", "1")
    with NbdServer(sock) as site:
        export = Export("remote", backend)
        site.add_export(export)
        d = DaemonProcess(tmp_path / "d", kernel_devices=False,
                          tuning={"retry_interval": 0.3}).start()
        try:
            def ok(*argv: str) -> None:
                r = d.cli(*argv)
                assert r.returncode == 0, r.stderr + d.log()
            ok("create", "rep", "--table",
               f"0 1 replicator ringbuffer 4 {paths[0]} 0 auto {4 * MB // 512 - 8} "
               "blockdev 2 0 sync blockdev 4 1 async ios 100000")
            ok("create", "vol", "--table",
               f"0 {16 * MB // 512} replicator-dev rep 0 0 1 {paths[1]} nolog 0 "
               f"1 1 nbd+unix:///remote?socket={sock} core 2 256 nosync")
            yield d, export, paths
        finally:
            export.resume()
            assert d.stop() == 0, d.log()
            backend.close()


def slink(d: DaemonProcess) -> dict:  # type: ignore[type-arg]
    r = d.cli("status", "rep", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]["detail"]["slinks"]["1"]  # type: ignore[no-any-return]


def wait_slink(d: DaemonProcess, what: str, pred, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while not pred(s := slink(d)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {s}"
        time.sleep(0.1)
    return s


def copy_in(d: DaemonProcess, offset: int, size: int, chunk: int = 256 * 1024) -> None:
    """Patterned writes of ``chunk`` bytes from ``offset`` (qemu-io, one connection)."""
    url = f"nbd+unix:///vol?socket={d.nbd_socket}"
    cmds = []
    for i, pos in enumerate(range(offset, offset + size, chunk)):
        cmds += ["-c", f"write -P {(pos // chunk * 37 + i) % 251 + 1} {pos} {chunk}"]
    r = subprocess.run(["qemu-io", "-f", "raw", *cmds, "-c", "flush", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def converged(s: dict) -> bool:  # type: ignore[type-arg]
    return bool(s["state"] == "up" and s["lag_ios"] == 0 and s["consistent"]
                and not s["resyncing"])


def test_cut_link_dirty_regions_resync(setup: tuple[DaemonProcess, Export, list[Path]],
                                       tmp_path: Path) -> None:
    d, export, (_, local, remote) = setup
    copy_in(d, 0, 1 * MB)
    wait_slink(d, "first copy", converged)
    assert local.read_bytes() == remote.read_bytes()
    export.suspend()                                   # the link is cut
    copy_in(d, 1 * MB, 10 * MB)             # more than the 4 MiB log holds
    s = wait_slink(d, "site down with dirty regions",
                   lambda s: s["state"] == "down" and s["regions_out_of_sync"] > 0)
    assert not s["consistent"]
    assert local.read_bytes() != remote.read_bytes()
    export.resume()                                    # restored
    wait_slink(d, "resync", converged, timeout=120)
    assert local.read_bytes() == remote.read_bytes()


def test_remove_is_busy_while_writes_are_not_at_the_remote_then_succeeds(
        setup: tuple[DaemonProcess, Export, list[Path]]) -> None:
    d, export, (_, local, remote) = setup
    copy_in(d, 0, 1 * MB)
    wait_slink(d, "first copy", converged)
    export.suspend()                                   # the link is cut
    copy_in(d, 1 * MB, 1 * MB)              # held in the 4 MiB log for the remote
    for argv in (["remove", "vol"], ["remove", "vol", "--wait", "0.5"]):
        r = d.cli(*argv)
        assert r.returncode == ExitCode.BUSY, (argv, r.returncode, r.stderr, d.log())
        assert r.stderr.startswith("dmrepl: error: cannot remove vol yet: ")
        assert r.stderr.count("\n") == 1 and "not yet copied" in r.stderr, r.stderr
    # the device is untouched: listed, and it reads and writes through its export
    assert "vol\treplicator-dev" in d.cli("ls").stdout
    copy_in(d, 2 * MB, 256 * 1024)
    url = f"nbd+unix:///vol?socket={d.nbd_socket}"
    back = subprocess.run(["qemu-io", "-f", "raw", "-c",
                           f"read -P {(2 * MB // (256 * 1024) * 37) % 251 + 1} "
                           f"{2 * MB} {256 * 1024}", url],
                          capture_output=True, text=True, timeout=120)
    assert back.returncode == 0 and "error" not in back.stdout.lower() \
        and "fail" not in back.stdout.lower(), back.stdout + back.stderr
    export.resume()                                    # restored: the log drains
    r = d.cli("remove", "vol", "--wait", "120")
    assert r.returncode == 0, r.stderr + d.log()
    assert local.read_bytes() == remote.read_bytes()
    assert d.cli("remove", "rep").returncode == 0
    assert d.cli("ls").stdout.strip() == "No devices found"


def test_remove_force_gives_up_the_writes_of_a_down_site(
        setup: tuple[DaemonProcess, Export, list[Path]]) -> None:
    d, export, (_, local, remote) = setup
    copy_in(d, 0, 1 * MB)
    wait_slink(d, "first copy", converged)
    export.suspend()                                   # the site is down for good
    copy_in(d, 1 * MB, 1 * MB)              # held in the log for the remote
    assert d.cli("remove", "vol").returncode == ExitCode.BUSY
    r = d.cli("remove", "vol", "--force")
    assert r.returncode == 0, r.stderr + d.log()
    assert "vol" not in d.cli("ls").stdout
    # the local device has every write; the remote lacks those given up
    assert local.read_bytes()[MB:2 * MB] != remote.read_bytes()[MB:2 * MB]
    assert local.read_bytes()[MB:2 * MB] != bytes(MB)
    # nothing is left pending for the remote: the replicator goes too
    r = d.cli("remove", "rep")
    assert r.returncode == 0, r.stderr + d.log()
    export.resume()


def test_remove_help_says_what_force_gives_up() -> None:
    r = subprocess.run([sys.executable, "-m", "dmrepl.cli.main", "remove", "--help"],
                       capture_output=True, text=True, timeout=60)
    text = " ".join(r.stdout.split())
    assert "--force" in text and "gives up the remote copies of those writes" in text
    assert "full resync" in text and "slink del" in text and "device del" in text
