"""The engine the daemon drives: the real one or a clear failure, never the sim
in its place; both engines are what the daemon's protocols declare."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from dmrepl.cli._exit import ExitCode
from dmrepl.daemon._engine import EngineDevice, EngineReplicator
from dmrepl.replicator import Replicator
from dmrepl_testing.replicator import FakeStore, StoreSet
from dmrepl_testing.simengine import SimReplicator

# Run in a fresh interpreter: the real engine (the dmrepl.replicator package and
# everything under it) cannot be imported, as in a broken installation.
NO_ENGINE = """
import sys
from importlib.abc import MetaPathFinder

class NoEngine(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "dmrepl.replicator" or fullname.startswith("dmrepl.replicator."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

sys.meta_path.insert(0, NoEngine())
from dmrepl.cli.main import main
main(sys.argv[1:])
"""


def dmrepl_without_engine(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", NO_ENGINE, *argv], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def daemon_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--socket", str(tmp_path / "control.sock"), "daemon",
            "--state-dir", str(tmp_path / "state"), "--no-kernel-devices", *extra]


def test_engine_auto_without_the_real_engine_is_one_clear_error(tmp_path: Path) -> None:
    for engine in ("auto", "replicator"):
        proc = dmrepl_without_engine(*daemon_args(tmp_path, "--engine", engine))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.ERROR, (proc.returncode, err)
        assert err.count("\n") == 1 and err.startswith("dmrepl: error: "), err
        assert "cannot be imported" in err and "'dmrepl.replicator'" in err, err
        assert "--engine sim" in err and "does not replicate" in err, err
        assert out == ""
        # refused before anything was claimed or created
        assert not (tmp_path / "state").exists() and not (tmp_path / "control.sock").exists()


def test_engine_sim_runs_without_the_real_engine(tmp_path: Path) -> None:
    """The daemon itself needs no engine module: the explicit test-only choice works."""
    ready = tmp_path / "ready"
    proc = dmrepl_without_engine(*daemon_args(tmp_path, "--engine", "sim",
                                              "--ready-file", str(ready)))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sim daemon did not get ready"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_both_engines_have_the_surface_the_daemon_drives(tmp_path: Path) -> None:
    """mypy checks the signatures (load_engine returns both as an Engine); this
    checks the members at run time."""
    stores = StoreSet()
    for name, size in (("log", 8 << 20), ("l0", 1 << 20), ("r1", 1 << 20)):
        stores.add(FakeStore(size, name=name))
    real = Replicator.from_table("0 1 replicator ringbuffer 4 log 0 create 8192 "
                                 "blockdev 2 0 async blockdev 2 1 async", opener=stores.open)
    try:
        dev = real.add_device("0 2048 replicator-dev rep 0 0 1 l0 nolog 0 1 1 r1 core 2 8 nosync")
        assert isinstance(real, EngineReplicator) and isinstance(dev, EngineDevice)
    finally:
        real.close()
    files = []
    for name in ("log", "local"):
        (tmp_path / name).write_bytes(bytes(1 << 20))
        files.append(tmp_path / name)
    sim = SimReplicator.from_table(f"0 1 replicator ringbuffer 4 {files[0]} 0 auto 64 "
                                   "blockdev 2 0 sync")
    try:
        dev = sim.add_device(f"0 2048 replicator-dev r 0 0 1 {files[1]} nolog 0")
        assert isinstance(sim, EngineReplicator) and isinstance(dev, EngineDevice)
    finally:
        sim.close()
