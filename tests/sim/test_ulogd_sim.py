"""ulogd against a fake kernel speaking real bytes over a socket (no root, no dm)."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.ownership import LOCK_FILE
from dmrepl_testing.ulogd import FakeKernel, s64, u64
from ulogd import protocol as p
from ulogd.control import query
from ulogd.main import Daemon
from ulogd.protocol import RequestType as RT

REPO = Path(__file__).resolve().parents[2]
U = b"SIM-UUID-0001"


class Running:
    def __init__(self, kernel: FakeKernel, control: str, state_dir: str | None = None) -> None:
        self.kernel = kernel
        self.control = control
        self.daemon = Daemon(kernel.transport(), control_path=control, state_dir=state_dir)
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    k = FakeKernel()
    yield k
    k.close()


@pytest.fixture
def ulogd(kernel: FakeKernel, tmp_path: Path) -> Iterator[Running]:
    r = Running(kernel, str(tmp_path / "ctl" / "control"))
    yield r
    r.stop()


def construct(k: FakeKernel, uuid: bytes, luid: int, args: str) -> p.Reply:
    reply = k.ctr(uuid, luid, args)
    assert reply.error == 0, reply
    rs = k.simple(uuid, luid, RT.GET_REGION_SIZE)
    assert rs.error == 0
    assert k.simple(uuid, luid, RT.RESUME).error == 0
    return reply


def test_core_log_lifecycle(kernel: FakeKernel, ulogd: Running) -> None:
    k = kernel
    reply = k.ctr(U, 1, "8192 clustered-core 1024 nosync")
    assert reply.error == 0 and reply.data == b""  # core: no device to name
    assert u64(k.simple(U, 1, RT.GET_REGION_SIZE).data) == 1024
    assert k.simple(U, 1, RT.RESUME).error == 0
    assert u64(k.simple(U, 1, RT.GET_SYNC_COUNT).data) == 8
    assert s64(k.region(U, 1, RT.IN_SYNC, 3).data) == 1
    assert s64(k.region(U, 1, RT.IS_CLEAN, 3).data) == 1
    assert k.regions(U, 1, RT.MARK_REGION, [3, 4]).error == 0
    assert k.simple(U, 1, RT.FLUSH).error == 0
    assert s64(k.region(U, 1, RT.IS_CLEAN, 3).data) == 0
    assert k.regions(U, 1, RT.CLEAR_REGION, [3]).error == 0
    assert k.regions(U, 1, RT.FLUSH, [5]).error == 0  # integrated flush: marks 5
    assert s64(k.region(U, 1, RT.IS_CLEAN, 3).data) == 1
    assert s64(k.region(U, 1, RT.IS_CLEAN, 5).data) == 0
    rr = k.region(U, 1, RT.IS_REMOTE_RECOVERING, 2)
    assert rr.error == 0 and struct.unpack("=qQ", rr.data) == (0, 8)
    info = k.simple(U, 1, RT.STATUS_INFO)
    assert info.error == 0 and info.data.endswith(b"\0") and b"core" in info.data
    assert k.region(U, 1, RT.IN_SYNC, 8).error == -errno.EINVAL  # out of range
    snap = query(ulogd.control)
    [lg] = snap["logs"]
    assert (lg["uuid"], lg["luid"], lg["regions"], lg["region_size"]) == ("SIM-UUID-0001", 1,
                                                                         8, 1024)
    assert lg["in_sync"] == 8 and lg["dirty"] == 2  # 4 and 5
    assert lg["requests"]["MARK_REGION"] == 1 and lg["latency"]["p99_us"] > 0
    assert k.simple(U, 1, RT.PRESUSPEND).error == 0
    assert k.simple(U, 1, RT.POSTSUSPEND).error == 0
    assert k.simple(U, 1, RT.DTR).error == 0
    assert query(ulogd.control)["logs"] == []


def test_resync_walks_every_region(kernel: FakeKernel, ulogd: Running) -> None:
    k = kernel
    construct(k, U, 7, "1000 core 64")  # 16 regions, the last one partial
    assert u64(k.simple(U, 7, RT.GET_SYNC_COUNT).data) == 0
    rr = k.region(U, 7, RT.IS_REMOTE_RECOVERING, 0)
    assert struct.unpack("=qQ", rr.data) == (0, 0)
    seen = []
    for _ in range(100):
        i, r = struct.unpack("=qQ", k.simple(U, 7, RT.GET_RESYNC_WORK).data)
        if not i:
            break
        seen.append(r)
        assert k.request(U, 7, RT.SET_REGION_SYNC, struct.pack("=Qq", r, 1)).error == 0
    assert sorted(seen) == list(range(16))
    assert u64(k.simple(U, 7, RT.GET_SYNC_COUNT).data) == 16
    rr = k.region(U, 7, RT.IS_REMOTE_RECOVERING, 0)
    assert struct.unpack("=qQ", rr.data) == (0, 16)


def test_unknown_log_gets_esrch_and_reconnect_restores(kernel: FakeKernel,
                                                       ulogd: Running) -> None:
    k = kernel
    assert k.region(U, 9, RT.IN_SYNC, 0).error == -errno.ESRCH
    assert k.simple(U, 9, RT.DTR).error == 0  # nothing to free
    # the kernel's reconnect: CTR with the trailing NUL, then RESUME, then the request
    reply = k.ctr(U, 9, "2048 core 64", reconnect=True)
    assert reply.error == 0 and reply.data == b""
    assert k.simple(U, 9, RT.RESUME).error == 0
    assert k.region(U, 9, RT.IN_SYNC, 0).error == 0
    assert query(ulogd.control)["unknown_log_requests"] == 1


def test_unknown_and_malformed_requests_are_answered(kernel: FakeKernel, ulogd: Running) -> None:
    k = kernel
    construct(k, U, 1, "2048 core 64")
    assert k.request(U, 1, 0).error == -errno.EINVAL
    assert k.request(U, 1, 18).error == -errno.EINVAL
    assert k.request(U, 1, 200, b"junk").error == -errno.EINVAL
    assert k.request(U, 1, RT.IN_SYNC, b"\0" * 3).error == -errno.EINVAL
    assert k.ctr(U, 2, "2048 core 3").error == -errno.EINVAL  # not a power of two
    assert k.ctr(U, 3, "2048 core 4096").error == -errno.EINVAL  # above the device
    assert k.ctr(U, 4, "2048 bogus 64").error == -errno.EINVAL
    assert k.ctr(U, 5, "core").error == -errno.EINVAL
    k.send_raw(b"\xff" * 7)  # undecodable: dropped, counted
    assert k.region(U, 1, RT.IN_SYNC, 0).error == 0  # still serving
    snap = query(ulogd.control)
    assert sum(snap["dropped"].values()) == 1
    assert [lg["luid"] for lg in snap["logs"]] == [1]


def test_forged_request_from_another_sender_is_dropped(kernel: FakeKernel,
                                                       ulogd: Running) -> None:
    k = kernel
    construct(k, U, 1, "2048 core 64 nosync")
    forger = k.forger()
    forger.sendto(p.encode_request(999, 1, U, RT.DTR), k.daemon_addr)
    forger.sendto(p.encode_request(1000, 1, U, RT.SET_REGION_SYNC, struct.pack("=Qq", 0, 0)),
                  k.daemon_addr)
    assert s64(k.region(U, 1, RT.IN_SYNC, 0).data) == 1  # served after the forgeries
    snap = query(ulogd.control)
    assert snap["foreign_dropped"] == 2 and len(snap["logs"]) == 1
    forger.close()


def test_reload_two_luids_and_orphan_replacement(kernel: FakeKernel, ulogd: Running) -> None:
    k = kernel
    construct(k, U, 1, "2048 core 64 nosync")
    assert k.regions(U, 1, RT.MARK_REGION, [1]).error == 0
    # reload: CTR of the new table, suspend old, resume new, DTR old
    assert k.ctr(U, 2, "4096 core 64").error == 0
    assert k.simple(U, 2, RT.GET_REGION_SIZE).error == 0
    assert k.simple(U, 1, RT.PRESUSPEND).error == 0
    assert k.simple(U, 1, RT.POSTSUSPEND).error == 0
    assert k.simple(U, 2, RT.RESUME).error == 0
    assert {lg["luid"] for lg in query(ulogd.control)["logs"]} == {1, 2}
    assert k.simple(U, 1, RT.DTR).error == 0
    [lg] = query(ulogd.control)["logs"]
    assert lg["luid"] == 2 and lg["regions"] == 64
    # a failed constructor left luid 3 orphaned; the kernel reuses the luid
    assert k.ctr(U, 3, "2048 core 64").error == 0
    assert k.ctr(U, 3, "8192 core 64 nosync").error == 0
    assert k.simple(U, 3, RT.RESUME).error == 0
    assert u64(k.simple(U, 3, RT.GET_SYNC_COUNT).data) == 128
    # a reconnect CTR for a known log keeps its state
    assert k.regions(U, 3, RT.MARK_REGION, [5]).error == 0
    assert k.ctr(U, 3, "8192 core 64 nosync", reconnect=True).data == b""
    assert s64(k.region(U, 3, RT.IS_CLEAN, 5).data) == 0


def test_disk_log_names_device_and_survives_restart(kernel: FakeKernel, tmp_path: Path) -> None:
    dev = tmp_path / "logdev"
    dev.write_bytes(b"\0" * (1 << 20))
    args = f"65536 clustered-disk {dev} 64"
    control = str(tmp_path / "control")
    first = Running(kernel, control)
    try:
        reply = construct(kernel, U, 1, args)
        assert reply.data == str(dev).encode() + b"\0"
        # version 1 requests predate the device name in the CTR reply
        assert kernel.ctr(U, 2, args).data != b""
        assert kernel.request(U, 4, RT.CTR, args.encode(), version=1).data == b""
        # a fresh log starts all dirty: clean 0..15, then mark 7 and 9
        assert kernel.regions(U, 1, RT.CLEAR_REGION, list(range(16))).error == 0
        assert kernel.simple(U, 1, RT.FLUSH).error == 0
        assert kernel.regions(U, 1, RT.MARK_REGION, [7, 9]).error == 0  # durable at once
        info = kernel.simple(U, 1, RT.STATUS_INFO).data
        assert b"disk" in info
    finally:
        # a kill -9 as far as the log is concerned: nothing after the MARK reply
        first.daemon.dispatcher.logs.clear()
        first.stop()
    kernel2 = FakeKernel()
    second = Running(kernel2, control)
    try:
        assert kernel2.region(U, 1, RT.IN_SYNC, 0).error == -errno.ESRCH
        assert kernel2.ctr(U, 1, args, reconnect=True).data == b""  # capacity 0
        assert kernel2.simple(U, 1, RT.RESUME).error == 0
        assert s64(kernel2.region(U, 1, RT.IS_CLEAN, 7).data) == 0
        assert s64(kernel2.region(U, 1, RT.IS_CLEAN, 9).data) == 0
        assert s64(kernel2.region(U, 1, RT.IS_CLEAN, 8).data) == 1
    finally:
        second.stop()
        kernel2.close()


def test_several_requests_in_one_datagram(kernel: FakeKernel, ulogd: Running) -> None:
    k = kernel
    construct(k, U, 1, "2048 core 64 nosync")
    batch = b"".join(p.encode_request(100 + i, 1, U, RT.IN_SYNC, p.encode_u64(i))
                     for i in range(5))
    k.send_raw(batch)
    seqs = []
    for _ in range(5):
        r = k.recv()
        assert r is not None and r.error == 0
        seqs.append(r.seq)
    assert sorted(seqs) == list(range(100, 105))


def test_daemon_process_ready_status_and_sigterm(tmp_path: Path) -> None:
    """The real `ulogd run` (netlink socket on the host), readiness, status, SIGTERM."""
    ready = tmp_path / "ready"
    control = tmp_path / "control"
    proc = subprocess.Popen([sys.executable, "-m", "ulogd.main", "run", "--ready-file",
                             str(ready), "--control", str(control), "--log-level", "debug"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "ulogd never became ready"
            time.sleep(0.05)
        assert ready.read_text().strip() == str(proc.pid)
        assert os.stat(control).st_mode & 0o777 == 0o600
        out = subprocess.run([sys.executable, "-m", "ulogd.main", "status", "--json",
                              "--control", str(control)], cwd=REPO, capture_output=True,
                             text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert '"logs": []' in out.stdout
        proc.terminate()
        assert proc.wait(20) == 0
        assert not control.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def resync_all(k: FakeKernel, uuid: bytes, luid: int) -> int:
    done = 0
    while True:
        i, r = struct.unpack("=qQ", k.simple(uuid, luid, RT.GET_RESYNC_WORK).data)
        if not i:
            return done
        assert k.request(uuid, luid, RT.SET_REGION_SYNC, struct.pack("=Qq", r, 1)).error == 0
        done += 1


def test_restart_restores_the_sync_state_the_kernel_knows(tmp_path: Path) -> None:
    """After a restart the kernel reconnects but never re-asks for resync work if it had
    seen the mirror in sync; the restored log must agree with what the kernel saw."""
    state = str(tmp_path / "state")
    args = "2048 clustered-core 64"  # 32 regions, default sync: all need resync
    k1 = FakeKernel()
    first = Running(k1, str(tmp_path / "c1"), state)
    try:
        construct(k1, U, 5, args)
        assert resync_all(k1, U, 5) == 32
        assert k1.request(U, 5, RT.SET_REGION_SYNC, struct.pack("=Qq", 3, 0)).error == 0
        assert u64(k1.simple(U, 5, RT.GET_SYNC_COUNT).data) == 31
    finally:
        first.daemon.dispatcher.logs.clear()  # killed: no DTR, no close
        first.stop()
        k1.close()
    k2 = FakeKernel()
    second = Running(k2, str(tmp_path / "c2"), state)
    try:
        assert k2.region(U, 5, RT.IN_SYNC, 0).error == -errno.ESRCH
        assert k2.ctr(U, 5, args, reconnect=True).error == 0
        assert k2.simple(U, 5, RT.RESUME).error == 0
        assert u64(k2.simple(U, 5, RT.GET_SYNC_COUNT).data) == 31
        assert s64(k2.region(U, 5, RT.IN_SYNC, 3).data) == 0
        assert s64(k2.region(U, 5, RT.IN_SYNC, 4).data) == 1
        # a new table (initial CTR) for the same key starts afresh
        assert k2.simple(U, 5, RT.DTR).error == 0
        construct(k2, U, 5, args)
        assert u64(k2.simple(U, 5, RT.GET_SYNC_COUNT).data) == 0
        assert os.listdir(state) != []
        assert k2.simple(U, 5, RT.DTR).error == 0
        assert os.listdir(state) == [LOCK_FILE]   # the daemon's claim on its state dir
    finally:
        second.stop()
        k2.close()
