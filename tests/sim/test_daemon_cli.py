"""Daemon + CLI end to end on the host: file-backed devices, NBD exports only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl.cli.main import run
from dmrepl_testing.daemon import DaemonProcess

MB = 1 << 20
SECTORS = 8 * MB // 512
ENGINE = os.environ.get("DMREPL_SIM_ENGINE", "auto")


def files(tmp: Path, *names: str, size: int = 8 * MB) -> list[str]:
    out = []
    for n in names:
        path = tmp / n
        with open(path, "wb") as f:
            f.truncate(size)
        out.append(str(path))
    return out


def rep_table(log: str) -> str:
    return (f"0 1 replicator ringbuffer 4 {log} 0 auto 16384 "
            "blockdev 2 0 sync blockdev 2 1 sync")


def dev_table(rep: str, nr: int, local: str, remote: str, start: int = 0,
              sectors: int = SECTORS) -> str:
    return (f"{start} {sectors} replicator-dev {rep} {nr} 0 1 {local} nolog 0 "
            f"1 1 {remote} core 2 1024 sync")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path / "d", kernel_devices=False, engine=ENGINE)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def cli(d: DaemonProcess, *argv: str) -> int:
    return run()(["--socket", d.socket, *argv])


def nbd_url(d: DaemonProcess, name: str) -> str:
    return f"nbd+unix:///{name}?socket={d.nbd_socket}"


@pytest.fixture
def replicated(daemon: DaemonProcess, tmp_path: Path) -> tuple[DaemonProcess, list[str]]:
    log, local, remote = files(tmp_path, "log", "local", "remote")
    assert cli(daemon, "create", "rep", "--table", rep_table(log)) == 0
    assert cli(daemon, "create", "vol", "--table", dev_table("rep", 0, local, remote)) == 0
    return daemon, [log, local, remote]


def wait_equal(a: str, b: str, d: DaemonProcess) -> None:
    """Converge: for an async engine, a flush + status poll; sim engine is sync."""
    # the export flush makes everything acknowledged durable locally; replicas may
    # lag: wait on the replicator's events until they match, with a deadline
    deadline = time.monotonic() + 60
    while Path(a).read_bytes() != Path(b).read_bytes():
        if time.monotonic() > deadline:
            pytest.fail(f"{b} did not converge to {a}")
        cli(d, "wait", "rep", "--timeout", "1")


@pytest.mark.skipif(not shutil.which("nbdcopy"), reason="nbdcopy not installed")
def test_write_through_export_reaches_local_and_remote(
        replicated: tuple[DaemonProcess, list[str]], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    d, (_, local, remote) = replicated
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * MB))
    cp = subprocess.run(["nbdcopy", "--flush", str(src), nbd_url(d, "vol")],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert Path(local).read_bytes() == src.read_bytes()
    wait_equal(local, remote, d)
    out = subprocess.run(["qemu-img", "convert", "-O", "raw", nbd_url(d, "vol"),
                          str(tmp_path / "back")], capture_output=True, timeout=120)
    assert out.returncode == 0
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


def test_ls_table_status(replicated: tuple[DaemonProcess, list[str]], capsys) -> None:  # type: ignore[no-untyped-def]
    d, _ = replicated
    capsys.readouterr()
    assert cli(d, "ls") == 0
    out = capsys.readouterr().out
    assert "rep\treplicator" in out and "vol\treplicator-dev" in out
    assert cli(d, "table", "vol") == 0
    assert capsys.readouterr().out.startswith(f"0 {SECTORS} replicator-dev rep 0 ")
    assert cli(d, "table") == 0
    assert capsys.readouterr().out.count("\n") == 2
    assert cli(d, "status") == 0
    # the dmsetup-style lines; the indented ones under them are for humans
    lines = [line for line in capsys.readouterr().out.splitlines()
             if not line.startswith("  ")]
    assert lines[0].startswith("rep: 0 1 replicator ")
    assert lines[1].startswith(f"vol: 0 {SECTORS} replicator-dev ")
    assert cli(d, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in status] == ["rep", "vol"]
    assert status[1]["size"] == 8 * MB and status[1]["mapper"] is None


def test_errors_are_one_line_with_stable_codes_and_devices_unaffected(
        replicated: tuple[DaemonProcess, list[str]], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    d, (log, local, remote) = replicated
    local3, remote3 = files(tmp_path, "local3", "remote3")
    capsys.readouterr()
    cases = [
        (["create", "bad", "--table", "0 8 replicator ringbuffer 4 /x 0 auto 8 wat 1 0"],
         ExitCode.INVALID),
        (["create", "bad", "--table", "0 8 linear /dev/sda 0"], ExitCode.INVALID),
        (["create", "bad", "--table", "garbage"], ExitCode.INVALID),
        (["create", "bad", "--table", dev_table("nosuch", 5, local, remote)],
         ExitCode.NOT_FOUND),
        (["create", "bad", "--table", dev_table("rep", 0, local, remote)], ExitCode.INVALID),
        (["create", "vol", "--table", dev_table("rep", 7, local, remote)], ExitCode.EXISTS),
        (["create", "bad2", "--table",
          dev_table("rep", 3, str(tmp_path / "nonexistent"), remote)], ExitCode.INVALID),
        (["message", "rep", "0", "frobnicate", "now"], ExitCode.INVALID),
        (["message", "vol", "0", "frobnicate"], ExitCode.INVALID),
        (["message", "vol", str(SECTORS + 5), "frobnicate"], ExitCode.INVALID),
        (["message", "ghost", "0", "x"], ExitCode.NOT_FOUND),
        (["remove", "rep"], ExitCode.BUSY),
        (["load", "vol", "--table", dev_table("rep", 0, local, remote, sectors=8)],
         ExitCode.INVALID),
        (["load", "rep", "--table", rep_table(log)], ExitCode.INVALID),
        (["wait", "rep", "100000", "--timeout", "0.2"], ExitCode.TIMEOUT),
        # a structure the device cannot have (no kernel devices here), or a
        # replicator given one
        (["create", "bad3", "--structure", "mirror", "--table",
          dev_table("rep", 3, local3, remote3)], ExitCode.INVALID),
        (["create", "bad3", "--structure", "log-writes", "--table",
          dev_table("rep", 3, local3, remote3)], ExitCode.INVALID),
        (["create", "bad3", "--structure", "raid1", "--table",
          dev_table("rep", 3, local3, remote3)], ExitCode.INVALID),
        (["create", "bad4", "--structure", "mirror", "--table", rep_table(log)],
         ExitCode.INVALID),
    ]
    for argv, code in cases:
        got = cli(d, *argv)
        err = capsys.readouterr().err
        assert got == code, (argv, got, err)
        assert err.startswith("dmrepl: error: ") and err.count("\n") == 1, (argv, err)
        if "--structure" in argv:
            assert "cannot be a" in err or "has no structure" in err, err
    assert cli(d, "ls") == 0
    out = capsys.readouterr().out
    assert "bad" not in out and out.count("\n") == 2
    # (the refused device's number is free: nothing of it stayed in the engine)
    assert cli(d, "create", "vol3", "--table", dev_table("rep", 3, local3, remote3)) == 0
    # the running device still serves I/O
    r = subprocess.run(["nbdinfo", nbd_url(d, "vol")], capture_output=True, text=True)
    assert r.returncode == 0 and str(8 * MB) in r.stdout


def test_suspend_resume_load_swap_remove(
        replicated: tuple[DaemonProcess, list[str]], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    d, _ = replicated
    la, ra, lb, rb = files(tmp_path, "la", "ra", "lb", "rb", size=4 * MB)
    half = SECTORS // 2
    two_lines = (dev_table("rep", 1, la, ra, 0, half) + "\n"
                 + dev_table("rep", 2, lb, rb, half, half))
    table_file = tmp_path / "t"
    table_file.write_text(two_lines)
    assert cli(d, "suspend", "vol") == 0
    assert cli(d, "load", "vol", str(table_file)) == 0
    assert cli(d, "resume", "vol") == 0
    capsys.readouterr()
    assert cli(d, "table", "vol") == 0
    assert capsys.readouterr().out.count("replicator-dev") == 2
    assert cli(d, "remove", "vol") == 0
    assert cli(d, "remove", "rep") == 0
    assert cli(d, "ls") == 0
    assert "No devices" in capsys.readouterr().out


def test_wait_returns_on_event(replicated: tuple[DaemonProcess, list[str]],
                               tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    d, _ = replicated
    capsys.readouterr()
    assert cli(d, "status", "--json") == 0
    before = json.loads(capsys.readouterr().out)[0]["event_nr"]
    local2, remote2 = files(tmp_path, "l2", "r2")
    proc = subprocess.Popen([sys.executable, "-m", "dmrepl.cli.main", "--socket", d.socket,
                             "wait", "rep", str(before), "--timeout", "30"],
                            stdout=subprocess.PIPE, text=True)
    assert cli(d, "create", "vol2", "--table", dev_table("rep", 4, local2, remote2)) == 0
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and int(out) > before


def test_restart_after_kill_recreates_objects(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    log, local, remote = files(tmp_path, "log", "local", "remote")
    d = DaemonProcess(tmp_path / "d", kernel_devices=False, engine=ENGINE).start()
    try:
        assert cli(d, "create", "rep", "--table", rep_table(log)) == 0
        assert cli(d, "create", "vol", "--table", dev_table("rep", 0, local, remote)) == 0
        d.kill()
        d.start()
        capsys.readouterr()
        assert cli(d, "table") == 0
        out = capsys.readouterr().out
        assert out.startswith("rep: 0 1 replicator") and "vol: 0 " in out
        r = subprocess.run(["nbdinfo", nbd_url(d, "vol")], capture_output=True, text=True)
        assert r.returncode == 0
    finally:
        assert d.stop() == 0
    assert not os.path.exists(d.socket)
