"""A mirrored device's dirty-log files (STATE_DIR/mirror-logs/NAME@START.log)
across a table switch: a line at a new start gets a new file; the files no line of
the new table uses are deleted once it is live, never before, never on a failure.

The daemon runs in-process on the sim engine; the kernel side (device-mapper
tables, nbd and loop devices) is a fake that keeps the tables it was given, so the
test sees which log files a live or loaded table still holds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.daemon import _kernel
from dmrepl.daemon.daemon import Daemon, DeviceObj
from dmrepl_testing.simengine import SimReplicator
from tests.unit.test_cli_daemon import files


class FakeKernel:
    """device-mapper tables by name (live, inactive) of mirror parts; a log file
    is attached while either table holds it, and may not be deleted then."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: dict[str, list[_kernel.MirrorPart]] = {}
        self.inactive: dict[str, list[_kernel.MirrorPart]] = {}
        self.loop_files: dict[str, str] = {}     # loop device -> its log file
        self.fail_load = False
        self.fail_resume = False
        for name in ("is_block_device", "attach_nbd", "detach_nbd", "create_mirror",
                     "load_mirror", "suspend_mapper", "resume_mapper", "remove_mapper",
                     "mapper_open_count", "attach_mirror_log", "detach_mirror_log"):
            monkeypatch.setattr(_kernel, name, getattr(self, name))

    def held_files(self) -> set[str]:
        tables = [*self.live.values(), *self.inactive.values()]
        return {self.loop_files[part.log] for parts in tables for part in parts}

    @staticmethod
    def is_block_device(path: str) -> bool:
        return True

    @staticmethod
    def attach_nbd(socket_path: str, export: str, size: int, avoid: set[int],
                   request_timeout: float | None = None) -> str:
        return f"/dev/nbd{min(set(range(len(avoid) + 1)) - avoid)}"

    @staticmethod
    def detach_nbd(path: str) -> None:
        pass

    def create_mirror(self, name: str, parts: list[_kernel.MirrorPart], nbd: str,
                      uuid: str | None = None) -> str:
        self.live[name] = parts
        return f"/dev/mapper/{name}"

    def load_mirror(self, name: str, parts: list[_kernel.MirrorPart], nbd: str) -> None:
        if self.fail_load:
            raise _kernel.KernelDeviceError(f"device-mapper {name}: refused")
        self.inactive[name] = parts

    @staticmethod
    def suspend_mapper(name: str) -> None:
        pass

    def resume_mapper(self, name: str) -> None:
        if self.fail_resume:
            raise _kernel.KernelDeviceError(f"device-mapper {name}: refused")
        if name in self.inactive:
            self.live[name] = self.inactive.pop(name)

    def remove_mapper(self, name: str) -> None:
        self.live.pop(name, None)
        self.inactive.pop(name, None)

    @staticmethod
    def mapper_open_count(name: str) -> int:
        return 0

    def attach_mirror_log(self, path: str, sectors: int) -> tuple[str, bool]:
        made = not os.path.exists(path)
        if made:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).write_bytes(bytes(_kernel.mirror_log_size(sectors)))
        for loop, file in self.loop_files.items():
            if file == path:
                return loop, made
        loop = f"/dev/loop{len(self.loop_files)}"
        self.loop_files[loop] = path
        return loop, made

    def detach_mirror_log(self, path: str, *, delete: bool) -> None:
        assert path not in self.held_files(), f"{path} detached while a table holds it"
        if delete:
            os.unlink(path)




def dev_line(start: int, length: int, dev_nr: int, local: str, remote: str) -> str:
    return (f"{start} {length} replicator-dev r {dev_nr} 0 1 {local} nolog 0 "
            f"1 1 {remote} core 2 64 sync")


@pytest.fixture
def mirrored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[tuple[Daemon, FakeKernel, list[str]]]:
    """Device v: a mirror of two lines (starts 0 and 1024); device w: one line.
    Yields the daemon, the kernel, and four local/remote device pairs' paths."""
    kernel = FakeKernel(monkeypatch)
    d = Daemon(str(tmp_path / "state"), kernel_devices=True, engine=SimReplicator)
    paths = files(tmp_path, "log", "la", "ra", "lb", "rb", "lc", "rc", "lw", "rw")
    log, la, ra, lb, rb, _lc, _rc, lw, rw = paths
    assert d.handle({"op": "create", "name": "r", "table":
                     f"0 1 replicator ringbuffer 4 {log} 0 auto 64 blockdev 2 0 sync "
                     "blockdev 2 1 async"})["ok"]
    created = d.handle({"op": "create", "name": "v", "table":
                        dev_line(0, 1024, 0, la, ra) + "\n" + dev_line(1024, 1024, 1, lb, rb)})
    assert created["ok"], created
    assert d.handle({"op": "create", "name": "w", "table":
                     dev_line(0, 1024, 3, lw, rw)})["ok"]
    v = d.objects["v"]
    assert isinstance(v, DeviceObj) and v.mirrored
    yield d, kernel, paths[1:]
    d.shutdown()


def logs(d: Daemon) -> list[str]:
    return sorted(os.listdir(os.path.join(d.state_dir, "mirror-logs")))


def test_a_switch_that_moves_a_line_deletes_the_old_lines_log_once_live(
        mirrored: tuple[Daemon, FakeKernel, list[str]]) -> None:
    d, kernel, (la, ra, _lb, _rb, lc, rc, _lw, _rw) = mirrored
    assert logs(d) == ["v@0.log", "v@1024.log", "w@0.log"]
    moved = dev_line(0, 512, 0, la, ra) + "\n" + dev_line(512, 1536, 2, lc, rc)
    assert d.handle({"op": "load", "name": "v", "table": moved})["ok"]
    assert logs(d) == ["v@0.log", "v@1024.log", "w@0.log"]   # loaded: nothing live yet
    reply = d.handle({"op": "resume", "name": "v"})
    assert reply["ok"], reply
    # the line at 0 keeps its file; 1024's (the old table's only) is gone; w's stays
    assert logs(d) == ["v@0.log", "v@512.log", "w@0.log"]
    assert kernel.held_files() == {os.path.join(d.state_dir, "mirror-logs", name)
                                   for name in ("v@0.log", "v@512.log", "w@0.log")}


@pytest.mark.parametrize("failure", ["fail_load", "fail_resume"])
def test_a_failed_switch_deletes_no_log(
        mirrored: tuple[Daemon, FakeKernel, list[str]], failure: str) -> None:
    d, kernel, (la, ra, _lb, _rb, lc, rc, _lw, _rw) = mirrored
    moved = dev_line(0, 512, 0, la, ra) + "\n" + dev_line(512, 1536, 2, lc, rc)
    assert d.handle({"op": "load", "name": "v", "table": moved})["ok"]
    setattr(kernel, failure, True)
    assert not d.handle({"op": "resume", "name": "v"})["ok"]
    assert {"v@0.log", "v@1024.log", "w@0.log"} <= set(logs(d))
