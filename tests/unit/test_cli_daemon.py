"""The daemon's request handling in-process (sim engine, no kernel, no sockets)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.daemon.daemon import ConcatBackend, Daemon, DeviceObj, ReplicatorObj
from dmrepl.daemon.guardian import MODULE, PIDFILE, Guardian
from dmrepl.errors import UserError
from dmrepl.nbd import MemoryBackend
from dmrepl.replicator.errors import DeviceBusy
from dmrepl_testing.simengine import SimReplicator

MB = 1 << 20


def test_concat_backend_splits_io() -> None:
    a, b = MemoryBackend(4096), MemoryBackend(8192)
    cat = ConcatBackend([(0, 4096, a), (4096, 8192, b)])
    assert cat.size_bytes == 12288
    cat.write(4000, b"x" * 200)
    assert a.data[4000:4096] == b"x" * 96 and b.data[:104] == b"x" * 104
    assert cat.read(3990, 220) == bytes(10) + b"x" * 200 + bytes(10)
    cat.flush()
    assert a.flushes == b.flushes == 1


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    d = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=SimReplicator)
    yield d  # type: ignore[misc]
    d.shutdown()


def files(tmp: Path, *names: str) -> list[str]:
    out = []
    for n in names:
        with open(tmp / n, "wb") as f:
            f.truncate(MB)
        out.append(str(tmp / n))
    return out


def test_handle_lifecycle_and_errors(daemon: Daemon, tmp_path: Path) -> None:
    log, local, remote = files(tmp_path, "log", "local", "remote")
    ok = daemon.handle({"op": "create", "name": "r", "table":
                        f"0 1 replicator ringbuffer 4 {log} 0 auto 64 blockdev 2 0 sync "
                        "blockdev 2 1 sync"})
    assert ok["ok"], ok
    ok = daemon.handle({"op": "create", "name": "v", "table":
                        f"0 2048 replicator-dev r 0 0 1 {local} nolog 0 1 1 {remote} core 2 "
                        "64 sync"})
    assert ok["ok"] and ok["result"]["size"] == MB
    assert daemon.handle({"op": "bogus"})["error"]["kind"] == "user"
    assert daemon.handle({"op": "create"})["error"]["kind"] == "user"   # missing args
    assert daemon.handle({"op": "remove", "name": "r"})["error"]["kind"] == "busy"
    assert daemon.handle({"op": "status", "name": "zz"})["error"]["kind"] == "notfound"
    assert daemon.handle({"op": "create", "name": "a/b", "table": "0 1 replicator x"}
                         )["error"]["kind"] == "user"
    st = daemon.handle({"op": "status"})["result"]
    assert [s["name"] for s in st] == ["r", "v"]
    assert daemon.handle({"op": "message", "name": "v", "sector": 0, "args": ["ping"]}
                         )["result"] == "pong"
    assert daemon.handle({"op": "remove", "name": "v"})["ok"]
    assert daemon.handle({"op": "remove", "name": "r"})["ok"]
    assert daemon.handle({"op": "ls"})["result"] == []


def test_state_is_persisted_and_restored(tmp_path: Path) -> None:
    log, local = files(tmp_path, "log", "local")
    d = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=SimReplicator)
    d.handle({"op": "create", "name": "r", "table":
              f"0 1 replicator ringbuffer 4 {log} 0 auto 64 blockdev 2 0 sync"})
    d.handle({"op": "create", "name": "v", "table":
              f"0 2048 replicator-dev r 0 0 1 {local} nolog 0"})
    d.shutdown()
    d2 = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=SimReplicator)
    try:
        d2.restore()
        assert [o["name"] for o in d2.handle({"op": "ls"})["result"]] == ["r", "v"]
        assert d2.restore_errors == []
    finally:
        d2.shutdown()


def test_a_new_daemon_stops_the_guardian_a_dead_one_left(tmp_path: Path) -> None:
    """A daemon killed leaves its guardian flushing the kernel journals; the next
    daemon on the same state directory stops it before it restores anything."""
    pidfile = tmp_path / "state" / "journal" / PIDFILE
    old = Guardian(pidfile=str(pidfile))
    old.journal("j", "4095:1048575")   # (its daemon's end still open: it stays)
    pid = old.pid
    assert pid is not None
    deadline = time.monotonic() + 30
    while MODULE.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():   # (exec'd)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    d = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=SimReplicator)
    try:
        assert old.pid is None and not pidfile.exists()
    finally:
        d.shutdown()


class PendingSim(SimReplicator):
    """The sim engine refusing, like the real one, to remove a device with writes
    not yet at every site link (``pending[dev_nr]`` of them); each refusal drains
    one, so a waiting remove gets through after a few attempts."""

    pending: dict[int, int] = {}
    refusals = 0
    unknown: set[int] = set()  # device numbers the engine says it does not have

    def remove_device(self, dev_nr: int, *, force: bool = False) -> None:
        if dev_nr in PendingSim.unknown:
            PendingSim.refusals += 1
            raise UserError(f"no device number {dev_nr}")
        n = PendingSim.pending.get(dev_nr, 0)
        if n:
            PendingSim.refusals += 1
            PendingSim.pending[dev_nr] = n - 1
            raise DeviceBusy(f"device {dev_nr} has {n} writes not yet copied to all its "
                             "site links; retry when they drained")
        super().remove_device(dev_nr, force=force)


@pytest.fixture
def pending_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, list[str]]]:
    PendingSim.pending, PendingSim.refusals, PendingSim.unknown = {}, 0, set()
    d = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=PendingSim)
    log, la, ra, lb, rb = files(tmp_path, "log", "la", "ra", "lb", "rb")
    assert d.handle({"op": "create", "name": "r", "table":
                     f"0 1 replicator ringbuffer 4 {log} 0 auto 64 blockdev 2 0 sync "
                     "blockdev 2 1 async"})["ok"]
    # two table lines: two engine devices behind one export
    table = (f"0 2048 replicator-dev r 0 0 1 {la} nolog 0 1 1 {ra} core 2 64 sync\n"
             f"2048 2048 replicator-dev r 1 0 1 {lb} nolog 0 1 1 {rb} core 2 64 sync")
    assert d.handle({"op": "create", "name": "v", "table": table})["ok"]
    yield d, [la, lb]
    d.shutdown()


def test_remove_with_pending_writes_is_busy_and_leaves_the_device_whole(
        pending_daemon: tuple[Daemon, list[str]]) -> None:
    d, (la, lb) = pending_daemon
    PendingSim.pending = {1: 1}          # the second engine device refuses
    reply = d.handle({"op": "remove", "name": "v"})
    assert reply["error"]["kind"] == "busy", reply
    message = reply["error"]["message"]
    assert "1 writes not yet copied" in message and "\n" not in message
    # nothing changed: both engine devices there (the first one added back), the
    # export serves I/O across both of them, the state file still lists v
    rep = d.objects["r"]
    assert isinstance(rep, ReplicatorObj) and sorted(rep.engine.devices) == [0, 1]
    assert [o["name"] for o in d.handle({"op": "ls"})["result"]] == ["r", "v"]
    export = d.nbd.exports["v"]
    assert not export.suspended
    with export.io() as backend:
        backend.write(MB - 512, b"a" * 1024)
        assert backend.read(MB - 512, 1024) == b"a" * 1024
    assert Path(la).read_bytes()[-512:] == b"a" * 512
    assert Path(lb).read_bytes()[:512] == b"a" * 512
    state = json.loads((Path(d.state_dir) / "state.json").read_text())
    assert [o["name"] for o in state["objects"]] == ["r", "v"]
    # drained: the same remove succeeds
    assert d.handle({"op": "remove", "name": "v"})["ok"]
    assert "v" not in d.nbd.exports and rep.engine.devices == {}
    assert d.handle({"op": "remove", "name": "r"})["ok"]


def test_remove_wait_retries_until_drained(pending_daemon: tuple[Daemon, list[str]]) -> None:
    d, _ = pending_daemon
    PendingSim.pending = {0: 3}
    assert d.handle({"op": "remove", "name": "v", "wait": 60})["ok"]
    assert PendingSim.refusals == 3 and "v" not in d.objects


def test_remove_refused_for_another_reason_is_not_busy_and_not_retried(
        pending_daemon: tuple[Daemon, list[str]]) -> None:
    """Only the engine's DeviceBusy means "retry later": any other refusal is
    reported as it is, once, even with --wait (no minute of futile retries)."""
    d, _ = pending_daemon
    PendingSim.unknown = {1}
    reply = d.handle({"op": "remove", "name": "v", "wait": 60})
    assert not reply["ok"] and reply["error"]["kind"] != "busy", reply
    assert "no device number 1" in reply["error"]["message"]
    assert PendingSim.refusals == 1
    rep = d.objects["r"]
    assert isinstance(rep, ReplicatorObj) and sorted(rep.engine.devices) == [0, 1]
    assert "v" in d.nbd.exports and not d.nbd.exports["v"].suspended


def test_resume_into_a_new_table_with_pending_writes_is_busy_and_keeps_serving(
        pending_daemon: tuple[Daemon, list[str]], tmp_path: Path) -> None:
    d, _ = pending_daemon
    lc, rc = files(tmp_path, "lc", "rc")
    new = f"0 4096 replicator-dev r 2 0 1 {lc} nolog 0 1 1 {rc} core 2 64 sync"
    assert d.handle({"op": "load", "name": "v", "table": new})["ok"]
    PendingSim.pending = {0: 1}
    reply = d.handle({"op": "resume", "name": "v"})
    assert reply["error"]["kind"] == "busy", reply
    obj = d.objects["v"]
    assert isinstance(obj, DeviceObj)
    assert not obj.suspended and not obj.export.suspended
    assert [dev.dev_nr for dev in obj.devs] == [0, 1] and obj.inactive is not None
    assert d.handle({"op": "resume", "name": "v"})["ok"]       # drained: switches
    assert [dev.dev_nr for dev in obj.devs] == [2] and obj.inactive is None
