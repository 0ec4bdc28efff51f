"""One owner per state: a second dmrepl daemon or ulogd refuses to start (exit code
IN_USE), touching nothing of the first, which serves on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl.cli.main import run
from dmrepl.errors import InUse
from dmrepl.nbd.client import NbdStore
from dmrepl.ownership import LOCK_FILE
from dmrepl.unixsock import listen_root_only
from dmrepl_testing.daemon import DaemonProcess
from dmrepl_testing.ulogd import FakeKernel
from ulogd import main as ulogd_main
from ulogd.control import query

MB = 1 << 20
SECTORS = 8 * MB // 512
ENGINE = os.environ.get("DMREPL_SIM_ENGINE", "auto")
REPO = Path(__file__).resolve().parents[2]


def files(tmp: Path, *names: str) -> list[str]:
    out = []
    for n in names:
        with open(tmp / n, "wb") as f:
            f.truncate(8 * MB)
        out.append(str(tmp / n))
    return out


def rep_table(log: str) -> str:
    return f"0 1 replicator ringbuffer 4 {log} 0 auto 16384 blockdev 2 0 sync"


def cli(d: DaemonProcess, *argv: str) -> int:
    return run()(["--socket", d.socket, *argv])


@pytest.fixture
def first(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path / "first", kernel_devices=False, engine=ENGINE)
    d.start()
    log, local = files(tmp_path, "log", "local")
    assert cli(d, "create", "rep", "--table", rep_table(log)) == 0
    assert cli(d, "create", "vol", "--table",
               f"0 {SECTORS} replicator-dev rep 0 0 1 {local} nolog 0") == 0
    try:
        yield d
    finally:
        d.stop()


def start_second(socket_path: str, state_dir: str) -> subprocess.CompletedProcess[str]:
    """``dmrepl daemon`` as a real process; it must exit at once (a timeout fails)."""
    return subprocess.run(
        [sys.executable, "-m", "dmrepl.cli.main", "--socket", socket_path, "daemon",
         "--state-dir", state_dir, "--no-kernel-devices", "--engine", ENGINE],
        capture_output=True, text=True, timeout=60, cwd=REPO)


def assert_serves(d: DaemonProcess) -> None:
    """Its control socket answers, and its export is the same device."""
    assert cli(d, "status") == 0
    store = NbdStore(f"nbd+unix:///vol?socket={d.nbd_socket}")
    try:
        block = b"still here".ljust(4096, b".")
        store.pwrite(0, block)
        assert store.pread(0, 4096) == block
    finally:
        store.close()


@pytest.mark.parametrize("same", ["state dir", "control socket"])
def test_second_daemon_refused_and_the_first_serves_on(
        first: DaemonProcess, tmp_path: Path, same: str) -> None:
    nbd_inode = os.stat(first.nbd_socket).st_ino
    if same == "state dir":
        second = start_second(str(tmp_path / "other.sock"), first.state_dir)
    else:
        second = start_second(first.socket, str(tmp_path / "other-state"))
    assert second.returncode == ExitCode.IN_USE, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmrepl: error:"), second.stderr
    assert "in use" in lines[0]
    assert os.stat(first.nbd_socket).st_ino == nbd_inode     # not unlinked, not rebound
    assert_serves(first)


def test_same_log_from_two_daemons_refused(first: DaemonProcess, tmp_path: Path) -> None:
    other = DaemonProcess(tmp_path / "other", kernel_devices=False, engine=ENGINE).start()
    try:
        log = str(tmp_path / "log")             # the first daemon's replication log
        code = cli(other, "create", "rep2", "--table", rep_table(log))
        assert code == ExitCode.BUSY
        assert cli(other, "ls") == 0 and cli(other, "status", "rep2") == ExitCode.NOT_FOUND
    finally:
        other.stop()
    assert_serves(first)


def test_socket_probe_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl" / "sock")
    live = listen_root_only(path, 4)
    try:
        with pytest.raises(InUse):
            listen_root_only(path, 4)
        with socket.socket(socket.AF_UNIX) as probe:   # the first still answers
            probe.connect(path)
    finally:
        live.close()                # killed: the node stays, nobody listens
    assert os.path.exists(path)
    again = listen_root_only(path, 4)
    with again, socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
    os.unlink(path)
    with open(path, "w") as f:      # not a socket: never removed
        f.write("x")
    with pytest.raises(FileExistsError):
        listen_root_only(path, 4)
    assert open(path).read() == "x"


# -- ulogd -----------------------------------------------------------------------

@pytest.fixture
def ulogd_first(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    kernel = FakeKernel()
    control, state, lock = (str(tmp_path / "u" / "control"), str(tmp_path / "u" / "state"),
                            str(tmp_path / "u" / "lock"))
    daemon = ulogd_main.Daemon(kernel.transport(), control_path=control, state_dir=state,
                               lock_file=lock)
    thread = threading.Thread(target=daemon.serve, daemon=True)
    thread.start()
    try:
        yield control, state, lock
    finally:
        daemon.request_stop()
        thread.join(10)
        kernel.close()


@pytest.mark.parametrize("same", ["lock file", "state dir", "control socket"])
def test_second_ulogd_run_refused_and_the_first_serves_on(
        ulogd_first: tuple[str, str, str], tmp_path: Path, same: str) -> None:
    control, state, lock = ulogd_first
    argv = {"--control": str(tmp_path / "c2"), "--state-dir": str(tmp_path / "s2"),
            "--lock-file": str(tmp_path / "l2")}
    argv[{"lock file": "--lock-file", "state dir": "--state-dir",
          "control socket": "--control"}[same]] = {
        "lock file": lock, "state dir": state, "control socket": control}[same]
    shared: dict[str, Any] = {"lock file": {"lock_file": lock}, "state dir": {"state_dir": state},
                              "control socket": {"control_path": control}}[same]
    kernel = FakeKernel()
    try:
        with pytest.raises(InUse):
            ulogd_main.Daemon(kernel.transport(), **{"control_path": None, **shared})
    finally:
        kernel.close()
    code = ulogd_main.main(["run", *[x for kv in argv.items() for x in kv]])
    assert code == ulogd_main.ExitCode.IN_USE
    assert query(control)["pid"] == os.getpid()     # the first answers on its socket
    assert os.path.exists(os.path.join(state, LOCK_FILE))
