"""The systemd units in contrib/ (checked by ``systemd-analyze verify``) and the
readiness they rely on: ``dmrepl daemon`` sends READY=1 on ``$NOTIFY_SOCKET`` only
once the devices of the last run are back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dmrepl_testing.daemon import DaemonProcess

REPO = Path(__file__).resolve().parents[2]
UNITS = ["dmrepl.service", "dmrepl-ulogd.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (tools/setup installs systemd)")
    # verify wants the ExecStart binary to exist: the venv's command stands in for
    # the /usr/local/bin one of an installation
    text = (REPO / "contrib" / unit).read_text()
    command = "dmrepl" if unit == "dmrepl.service" else "ulogd"
    assert f"ExecStart=/usr/local/bin/{command} " in text
    venv_bin = Path(sys.executable).parent
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/", f"{venv_bin}/"))
    r = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True,
                       text=True, timeout=120)
    # verify also reports on units it pulls in that this container lacks (none of ours)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if unit in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_no_unit_collides_with_netfilter_ulogd() -> None:
    assert not (REPO / "contrib" / "ulogd.service").exists()   # Debian's ulogd2 has it
    assert "contrib/ulogd.service" not in (REPO / "README.md").read_text()


def test_daemon_is_ready_only_after_the_devices_of_the_last_run_are_back(
        tmp_path: Path) -> None:
    log, local = tmp_path / "log", tmp_path / "local"
    for p in (log, local):
        with open(p, "wb") as f:
            f.truncate(4 << 20)
    first = DaemonProcess(tmp_path / "d", kernel_devices=False, engine="sim").start()
    try:
        for name, table in (("rep", f"0 1 replicator ringbuffer 4 {log} 0 auto 8184 "
                                    "blockdev 2 0 sync"),
                            ("vol", f"0 8192 replicator-dev rep 0 0 1 {local} nolog 0")):
            r = first.cli("create", name, "--table", table)
            assert r.returncode == 0, r.stderr + first.log()
    finally:
        assert first.stop() == 0, first.log()

    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(120)   # a bound on a hung daemon, not a timed assertion
        second = DaemonProcess(tmp_path / "d", kernel_devices=False, engine="sim")
        argv = [sys.executable, "-m", "dmrepl.cli.main", "--socket", second.socket,
                "daemon", "--state-dir", second.state_dir, "--ready-file",
                second.ready_file, "--engine", "sim", "--no-kernel-devices"]
        proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        second.proc = proc   # type: ignore[assignment]
        try:
            message = listener.recv(4096).decode()
            assert message == "READY=1"
            # at READY=1 the restore is done: the ready file (written after it) is
            # there and the devices are listed
            assert os.path.exists(second.ready_file)
            listing = second.cli("ls").stdout
            assert "rep\treplicator" in listing and "vol\treplicator-dev" in listing
        finally:
            assert second.stop() == 0, proc.stderr.read().decode() if proc.stderr else ""
