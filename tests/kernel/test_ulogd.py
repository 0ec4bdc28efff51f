"""ulogd serving real dm-mirror + dm-log-userspace (run in the VM by tools/vmtest).

dmsetup is the oracle for the mirrors; ulogd runs as a real process (``ulogd run``)
and is observed through ``ulogd status --json``.  Nothing sleeps and hopes: every
wait polls a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _util import run, wait_for

from ulogd import protocol as p
from ulogd.control import query
from ulogd.protocol import RequestType as RT

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
REGION = 1024  # sectors: 512 KiB


class Ulogd:
    """A `ulogd run` process; start() returns once it announced readiness."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.control = str(workdir / "control")
        self.proc: subprocess.Popen[str] | None = None
        self.generation = 0

    def start(self) -> None:
        self.generation += 1
        ready = self.workdir / f"ready.{self.generation}"
        self.log = open(self.workdir / f"ulogd.{self.generation}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ulogd.main", "run", "--log-level", "info",
             "--ready-file", str(ready), "--control", self.control,
             "--state-dir", str(self.workdir / "state")],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        proc = self.proc
        wait_for("ulogd readiness", lambda: ready.exists() or proc.poll() is not None, 120)
        assert proc.poll() is None, self.output()

    def output(self) -> str:
        return (self.workdir / f"ulogd.{self.generation}.log").read_text()

    def status(self) -> dict[str, Any]:
        return query(self.control)

    def status_cli(self) -> dict[str, Any]:
        out = run(sys.executable, "-m", "ulogd.main", "status", "--json", "--control",
                  self.control)
        result: dict[str, Any] = json.loads(out)
        return result

    def logs(self, uuid: str) -> list[dict[str, Any]]:
        return [lg for lg in self.status()["logs"] if lg["uuid"] == uuid]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                rc = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
            assert rc == 0, self.output()
        self.log.close()


@pytest.fixture(scope="module")
def _ulogd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ulogd]:
    """One daemon for the module (starting Python in the VM is slow); each test
    uses its own uuids, and the daemon is torn down after every mirror."""
    daemon = Ulogd(tmp_path_factory.mktemp("ulogd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def ulogd(_ulogd_daemon: Ulogd) -> Ulogd:
    """The running daemon (restarted if a previous test left it dead)."""
    if _ulogd_daemon.proc is None or _ulogd_daemon.proc.poll() is not None:
        _ulogd_daemon.start()
    return _ulogd_daemon


def mirror_status(name: str) -> tuple[int, int, str, list[str]]:
    """(in-sync regions, regions, leg health like 'AA', log status words)."""
    words = run("dmsetup", "status", name).split()
    assert words[2] == "mirror", words
    nlegs = int(words[3])
    synced, total = words[4 + nlegs].split("/")
    health = words[6 + nlegs]
    return int(synced), int(total), health, words[7 + nlegs:]


def wait_in_sync(name: str, timeout: float = 120) -> tuple[int, int, str, list[str]]:
    def done() -> Any:
        st = mirror_status(name)
        return st if st[0] == st[1] else None

    result: tuple[int, int, str, list[str]] = wait_for(f"{name} in sync", done, timeout)
    return result


def dev(name: str) -> str:
    return f"/dev/mapper/{name}"


def sectors(device: str) -> int:
    return int(run("blockdev", "--getsz", device))


def write(path: str, mb: int, seek_mb: int = 0, src: str = "/dev/urandom") -> None:
    run("dd", f"if={src}", f"of={path}", "bs=1M", f"count={mb}", f"seek={seek_mb}",
        "oflag=direct", "conv=fsync,notrunc", "status=none")


def legs_identical(a: str, b: str) -> None:
    # drop the block devices' page cache: cmp must see what dm wrote underneath it
    run("blockdev", "--flushbufs", a, b)
    proc = subprocess.run(["cmp", a, b], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        diag = subprocess.run("dmsetup status; dmsetup table; dmesg | tail -40", shell=True,
                              capture_output=True, text=True, timeout=60).stdout
        raise AssertionError(f"legs differ: {proc.stdout}{proc.stderr}\n{diag}")


def holdable(dm_name: Any, device: str) -> str:
    """``device`` behind a dm linear device of that name, for :func:`held`."""
    name = dm_name("uheld")
    run("dmsetup", "create", name, "--table", f"0 {sectors(device)} linear {device} 0")
    return name


@contextlib.contextmanager
def held(name: str) -> Iterator[None]:
    """I/O to the dm device ``name`` waits (suspended --noflush) until the block
    ends: a resync onto it cannot finish while we look, however slow the VM is."""
    run("dmsetup", "suspend", "--noflush", name)
    try:
        yield
    finally:
        run("dmsetup", "resume", name)


def new_uuid() -> str:
    return f"ULOGD-TEST-{uuidlib.uuid4().hex[:12]}"


def userspace_table(n: int, uid: str, log: list[str], legs: list[str],
                    features: list[str] | None = None) -> str:
    args = [uid, *log]
    table = f"0 {n} mirror userspace {len(args)} {' '.join(args)} {len(legs)} " + \
        " ".join(f"{leg} 0" for leg in legs)
    if features:
        table += f" {len(features)} {' '.join(features)}"
    return table


# ---------------------------------------------------------------------------


def test_core_nosync_writes_and_status(ulogd: Ulogd, dm_name: Any, loop_device: Any) -> None:
    a, b = loop_device(16), loop_device(16)
    n = sectors(a)
    name, uid = dm_name("ucore"), new_uuid()
    run("dmsetup", "create", name, "--table",
        userspace_table(n, uid, ["clustered-core", str(REGION), "nosync"], [a, b]))
    synced, total, health, logst = mirror_status(name)
    assert (synced, total, health) == (n // REGION, n // REGION, "AA")
    assert logst[:2] == ["1", "clustered-core"], logst
    table = run("dmsetup", "table", name)
    assert f"userspace 4 {uid} clustered-core {REGION} nosync" in table, table
    write(dev(name), 8, seek_mb=3)
    legs_identical(a, b)
    [lg] = [lg for lg in ulogd.status_cli()["logs"] if lg["uuid"] == uid]
    assert lg["type"] == "clustered-core" and lg["regions"] == n // REGION
    assert lg["region_size"] == REGION and lg["in_sync"] == n // REGION
    assert lg["requests"].get("MARK_REGION", 0) + lg["requests"].get("FLUSH", 0) > 0
    assert lg["latency"]["p50_us"] > 0
    run("dmsetup", "remove", "--retry", name)
    assert ulogd.logs(uid) == []


def test_core_sync_resync_progress_to_completion(ulogd: Ulogd, dm_name: Any,
                                                 loop_device: Any) -> None:
    a, b = loop_device(16), loop_device(16)
    write(a, 16)  # leg A random, leg B zero: the resync must copy everything
    n = sectors(a)
    leg_b = holdable(dm_name, b)
    name, uid = dm_name("usync"), new_uuid()
    with held(leg_b):  # the resync starts, and cannot finish before we saw it
        run("dmsetup", "create", name, "--table",
            userspace_table(n, uid, ["clustered-core", "128", "sync"], [a, dev(leg_b)]))
        seen = [mirror_status(name)[0]]
    deadline = time.monotonic() + 180
    while True:
        synced, total, health, _ = mirror_status(name)
        seen.append(synced)
        if synced == total:
            break
        assert time.monotonic() < deadline, f"resync stuck at {synced}/{total}"
        time.sleep(0.2)
    assert total == n // 128 and health == "AA"
    assert min(seen) < total, "never saw the resync in progress"
    assert seen == sorted(seen), seen
    legs_identical(a, b)


def test_disk_log_names_device_and_keeps_legs_identical(ulogd: Ulogd, dm_name: Any,
                                                        loop_device: Any) -> None:
    a, b, lg = loop_device(32), loop_device(32), loop_device(4)
    n = sectors(a)
    name, uid = dm_name("udisk"), new_uuid()
    run("dmsetup", "create", name, "--table",
        userspace_table(n, uid, ["clustered-disk", lg, str(REGION)], [a, b]))
    wait_in_sync(name)
    major, minor = os.major(os.stat(lg).st_rdev), os.minor(os.stat(lg).st_rdev)
    deps = run("dmsetup", "deps", name)
    assert f"({major}, {minor})" in deps, deps  # CTR reply named the log device
    _, _, _health, logst = mirror_status(name)
    assert logst == ["3", "clustered-disk", f"{major}:{minor}", "A"], logst
    write(dev(name), 16, seek_mb=8)
    legs_identical(a, b)
    [entry] = ulogd.logs(uid)
    assert entry["type"] == "clustered-disk" and entry["dirty"] == 0


def test_leg_failure_shows_and_mirror_recovers_after_replacement(
        ulogd: Ulogd, dm_name: Any, loop_device: Any) -> None:
    a, b = loop_device(32), loop_device(32)
    n = sectors(a)
    legb, name, uid = dm_name("uleg"), dm_name("ufail"), new_uuid()
    run("dmsetup", "create", legb, "--table", f"0 {n} linear {b} 0")
    table = userspace_table(n, uid, ["clustered-core", str(REGION), "nosync"], [a, dev(legb)])
    run("dmsetup", "create", name, "--table", table)
    write(dev(name), 4)
    # the leg dies
    run("dmsetup", "suspend", legb)
    run("dmsetup", "load", legb, "--table", f"0 {n} error")
    run("dmsetup", "resume", legb)
    write(dev(name), 4, seek_mb=8)  # served by leg A: no error for the writer
    wait_for("leg B reported dead", lambda: mirror_status(name)[2] == "AD", 60)
    assert mirror_status(name)[0] < n // REGION  # the written regions are out of sync
    # the leg is replaced, the mirror reloaded: it resyncs and recovers
    run("dmsetup", "suspend", legb)
    run("dmsetup", "load", legb, "--table", f"0 {n} linear {b} 0")
    run("dmsetup", "resume", legb)
    run("dmsetup", "load", name, "--table",
        userspace_table(n, uid, ["clustered-core", str(REGION)], [a, dev(legb)]))
    run("dmsetup", "suspend", name)
    run("dmsetup", "resume", name)
    _, _, health, _ = wait_in_sync(name)
    assert health == "AA"
    legs_identical(a, b)


def test_table_reload_serves_both_luids(ulogd: Ulogd, dm_name: Any, loop_device: Any) -> None:
    a, b = loop_device(32), loop_device(32)
    n = sectors(a)
    name, uid = dm_name("ureload"), new_uuid()
    run("dmsetup", "create", name, "--table",
        userspace_table(n, uid, ["clustered-core", str(REGION), "nosync"], [a, b]))
    [live] = ulogd.logs(uid)
    run("dmsetup", "load", name, "--table",
        userspace_table(n, uid, ["clustered-core", str(REGION // 2), "nosync"], [a, b]))
    both = ulogd.logs(uid)
    assert len(both) == 2 and len({lg["luid"] for lg in both}) == 2
    write(dev(name), 4)  # the live table keeps being served while the new one waits
    run("dmsetup", "suspend", name)
    run("dmsetup", "resume", name)
    [new] = wait_for("old luid destroyed", lambda: (lambda ls: ls if len(ls) == 1 else None)(
        ulogd.logs(uid)), 30)
    assert new["luid"] != live["luid"] and new["region_size"] == REGION // 2
    assert new["resumed"]
    write(dev(name), 8, seek_mb=4)
    legs_identical(a, b)


def test_two_mirrors_at_once(ulogd: Ulogd, dm_name: Any, loop_device: Any) -> None:
    legs = [loop_device(32) for _ in range(4)]
    n = sectors(legs[0])
    names = [dm_name("utwo"), dm_name("utwo")]
    uids = [new_uuid(), new_uuid()]
    for i in range(2):
        run("dmsetup", "create", names[i], "--table",
            userspace_table(n, uids[i], ["clustered-core", str(REGION), "nosync"],
                            legs[2 * i:2 * i + 2]))
    writers = [subprocess.Popen(["dd", "if=/dev/urandom", f"of={dev(nm)}", "bs=1M", "count=16",
                                 "oflag=direct", "conv=fsync", "status=none"]) for nm in names]
    assert [w.wait(120) for w in writers] == [0, 0]
    legs_identical(legs[0], legs[1])
    legs_identical(legs[2], legs[3])
    for uid in uids:
        [lg] = ulogd.logs(uid)
        assert lg["requests"].get("FLUSH", 0) > 0


@pytest.mark.parametrize("logtype", ["clustered-core", "clustered-disk"])
def test_kill9_restart_during_writes(ulogd: Ulogd, dm_name: Any, loop_device: Any,
                                     logtype: str) -> None:
    a, b = loop_device(32), loop_device(32)
    n = sectors(a)
    logargs = [logtype, str(REGION)]
    if logtype == "clustered-disk":
        logargs.insert(1, loop_device(4))
    name, uid = dm_name("ukill"), new_uuid()
    run("dmsetup", "create", name, "--table", userspace_table(n, uid, logargs, [a, b]))
    wait_in_sync(name)
    total = n // REGION
    writer = subprocess.Popen(["dd", "if=/dev/urandom", f"of={dev(name)}", "bs=64K",
                               "count=384", "oflag=direct", "conv=fsync", "status=none"],
                              stderr=subprocess.PIPE, text=True)

    def writing() -> bool:
        [lg] = ulogd.logs(uid)
        return bool(lg["requests"].get("FLUSH", 0) >= 5)

    wait_for("the writer in progress", writing, 60)
    ulogd.kill9()
    assert writer.poll() is None, "the writer finished before the kill: nothing tested"
    ulogd.start()
    # the kernel finds no listener (-ESRCH), or we answer -ESRCH: either way it reconnects
    wait_for("the kernel reconnected", lambda: ulogd.logs(uid), 60)
    assert writer.wait(180) == 0, writer.stderr.read() if writer.stderr else ""
    # the sync state the kernel knew came back (it will not ask for resync work again)
    assert mirror_status(name)[:2] == (total, total)
    [lg] = ulogd.logs(uid)
    if logtype == "clustered-disk":
        assert lg["type"] == "clustered-disk"  # reopened from the log device
    wait_in_sync(name)
    legs_identical(a, b)
    log = run("dmesg")
    assert "Reconnected to userspace log server" in log


def test_forged_request_changes_nothing(ulogd: Ulogd, dm_name: Any, loop_device: Any) -> None:
    a, b = loop_device(16), loop_device(16)
    n = sectors(a)
    name, uid = dm_name("uforge"), new_uuid()
    run("dmsetup", "create", name, "--table",
        userspace_table(n, uid, ["clustered-core", str(REGION), "nosync"], [a, b]))
    [lg] = ulogd.logs(uid)
    before = ulogd.status()["foreign_dropped"]
    forged = [p.encode_request(1 << 30, lg["luid"], uid.encode(), RT.SET_REGION_SYNC,
                               struct.pack("=Qq", 0, 0)),
              p.encode_request((1 << 30) + 1, lg["luid"], uid.encode(), RT.DTR)]
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11) as s:
        s.bind((0, 0))
        for msg in forged:
            s.sendto(msg, (0, 1 << (p.CN_IDX_DM - 1)))  # multicast to group 7
    wait_for("forgeries dropped", lambda: ulogd.status()["foreign_dropped"] >= before + 2, 30)
    [after] = ulogd.logs(uid)
    assert after["luid"] == lg["luid"] and after["in_sync"] == n // REGION
    assert mirror_status(name)[:3] == (n // REGION, n // REGION, "AA")
    write(dev(name), 2)
    legs_identical(a, b)


def test_kernel_disk_log_and_ulogd_disk_log_read_each_other(
        ulogd: Ulogd, dm_name: Any, loop_device: Any) -> None:
    a, b = loop_device(32), loop_device(32)
    n = sectors(a)
    total = n // REGION
    for first, second in (("kernel", "ulogd"), ("ulogd", "kernel")):
        log = loop_device(4)  # fresh and zeroed: the first mirror must resync all

        def table(who: str, log: str = log) -> str:
            if who == "kernel":
                return f"0 {n} mirror disk 2 {log} {REGION} 2 {a} 0 {b} 0"
            return userspace_table(n, new_uuid(), ["clustered-disk", log, str(REGION)],
                                   [a, b])

        # leg A gets new data underneath: only a full resync makes the legs equal again,
        # so the first mirror's log must have started with every region out of sync
        write(a, n * 512 // MIB)
        name1 = dm_name("uxa")
        run("dmsetup", "create", name1, "--table", table(first))
        wait_in_sync(name1)
        legs_identical(a, b)
        write(dev(name1), 4)
        run("dmsetup", "remove", "--retry", name1)
        name2 = dm_name("uxb")
        run("dmsetup", "create", name2, "--table", table(second))
        synced, tot, _health, _ = mirror_status(name2)
        assert (synced, tot) == (total, total), f"{second} did not read {first}'s log"
        run("dmsetup", "remove", "--retry", name2)
    legs_identical(a, b)
