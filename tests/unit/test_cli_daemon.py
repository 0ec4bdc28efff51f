"""The daemon's request handling in-process (sim engine, no kernel, no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrepl.daemon.daemon import ConcatBackend, Daemon
from dmrepl.daemon.simengine import SimReplicator
from dmrepl.nbd import MemoryBackend

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
