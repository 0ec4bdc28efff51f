"""``dmrepl events``: the state changes of a daemon as JSON lines, on the host.

A remote site is our own NBD server; the link is "cut" by suspending its export
(requests hang, the daemon's NBD client times out, the site link goes down) and
restored by resuming it.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl.daemon.client import Client
from dmrepl.nbd import Export, FileBackend, NbdServer
from dmrepl_testing.daemon import DaemonProcess

MB = 1 << 20
#: Seconds to wait for an event before the test gives up (a hang guard only).
EVENT_DEADLINE = 120

needs_nbdcopy = pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-io not installed")


class EventReader:
    """``dmrepl events ARGV`` in a process; its lines parsed, in a queue."""

    def __init__(self, d: DaemonProcess, *argv: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dmrepl.cli.main", "--socket",
                                      d.socket, "events", *argv],
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self) -> dict[str, Any]:
        event = self.lines.get(timeout=EVENT_DEADLINE)
        assert event is not None, "the event stream ended"
        return event

    def until(self, pred: Any) -> list[dict[str, Any]]:
        """Every event up to and including the first that ``pred`` accepts."""
        seen = [self.next()]
        while not pred(seen[-1]):
            seen.append(self.next())
        return seen

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def make_files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / n for n in ("log", "local", "remote")]
    for p, size in zip(paths, (4 * MB, 16 * MB, 16 * MB), strict=True):
        with open(p, "wb") as f:
            f.truncate(size)
    return paths


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          ) -> Iterator[tuple[DaemonProcess, Export, list[Path]]]:
    paths = make_files(tmp_path)
    sock = str(tmp_path / "site.sock")
    backend = FileBackend(str(paths[2]))
    monkeypatch.setenv("DMREPL_NBD_TIMEOUT", "1")
    with NbdServer(sock) as site:
        export = Export("remote", backend)
        site.add_export(export)
        d = DaemonProcess(tmp_path / "d", kernel_devices=False,
                          tuning={"retry_interval": 0.3}).start()
        try:
            for argv in (
                ("create", "rep", "--table",
                 f"0 1 replicator ringbuffer 4 {paths[0]} 0 auto {4 * MB // 512 - 8} "
                 "blockdev 2 0 sync blockdev 4 1 async ios 100000"),
                ("create", "vol", "--table",
                 f"0 {16 * MB // 512} replicator-dev rep 0 0 1 {paths[1]} nolog 0 "
                 f"1 1 nbd+unix:///remote?socket={sock} core 2 256 nosync")):
                r = d.cli(*argv)
                assert r.returncode == 0, r.stderr + d.log()
            yield d, export, paths
        finally:
            export.resume()
            assert d.stop() == 0, d.log()
            backend.close()


def write(d: DaemonProcess, offset: int, size: int) -> None:
    url = f"nbd+unix:///vol?socket={d.nbd_socket}"
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 7 {offset} {size}",
                        "-c", "flush", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


@needs_nbdcopy
def test_now_then_link_down_up_and_resync_in_order(
        setup: tuple[DaemonProcess, Export, list[Path]]) -> None:
    d, export, _ = setup
    events = EventReader(d, "--now")
    try:
        current = events.until(lambda e: e["object"] == "-")
        assert all(e["kind"] == "exists" for e in current)
        assert {(e["object"], e["name"]) for e in current[:-1]} >= {
            ("replicator", "rep"), ("replicator-dev", "vol"), ("slink", "rep")}
        remote = [e for e in current if e["object"] == "slink" and e["slink"] == 1]
        assert remote and remote[0]["link"] == "up", current

        export.suspend()                                 # the link is cut
        write(d, 0, 8 * MB)                              # more than the 4 MiB log
        down = events.until(lambda e: e["event"] == "link-down")
        export.resume()                                  # restored
        after = events.until(lambda e: e["event"] == "resync-end")
        names = [e["event"] for e in down + after]
        assert names.index("link-down") < names.index("link-up") \
            < names.index("resync-start") < names.index("resync-end"), names
        assert [e["slink"] for e in down + after if e["event"].startswith("link-")] \
            == [1, 1]
        changes = down + after
        start, end = names.index("resync-start"), names.index("resync-end")
        progress = [e["percent"] for e in changes[start:end] if e["event"] == "resync-progress"]
        assert progress and progress == sorted(progress), names
        seqs = [e["seq"] for e in changes]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        times = [e["time"] for e in changes]   # ISO 8601 UTC: ordered as text
        assert times == sorted(times) and all(t.endswith("Z") for t in times), times
    finally:
        events.close()
    # and the daemon's log has each at its level (written by its own subscriber)
    wanted = ["WARNING dmrepl.events: link-down object=slink name=rep slink=1",
              "INFO dmrepl.events: link-up object=slink name=rep slink=1",
              "INFO dmrepl.events: resync-start object=slink name=rep slink=1",
              "INFO dmrepl.events: resync-end object=slink name=rep slink=1"]
    deadline = time.monotonic() + EVENT_DEADLINE     # a hang guard only
    while not all(w in d.log() for w in wanted):
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)


def test_changes_only_without_now_and_objects_come_and_go(
        setup: tuple[DaemonProcess, Export, list[Path]], tmp_path: Path) -> None:
    d, _, _ = setup
    stream = Client(d.socket, timeout=EVENT_DEADLINE).stream("events", idle=EVENT_DEADLINE)
    try:
        assert next(stream) is None      # subscribed: every change from here on comes
        local = tmp_path / "second"
        with open(local, "wb") as f:
            f.truncate(MB)
        r = d.cli("create", "vol2", "--table",
                  f"0 {MB // 512} replicator-dev rep 1 0 1 {local} nolog 0")
        assert r.returncode == 0, r.stderr
        assert d.cli("remove", "vol2").returncode == 0
        seen = []
        while not seen or seen[-1]["event"] != "object-remove":
            event = next(stream)
            assert event is not None, f"no event in {EVENT_DEADLINE}s after {seen}"
            seen.append(event)
        # no current state without --now: the changes only, in order
        assert [(e["kind"], e["event"], e["name"]) for e in seen] == [
            ("create", "device-add", "rep"), ("create", "object-create", "vol2"),
            ("destroy", "device-remove", "rep"), ("destroy", "object-remove", "vol2")], seen
        assert seen[0]["device"] == 1 and seen[2]["device"] == 1
    finally:
        stream.close()


def test_head_ends_the_stream_quietly(setup: tuple[DaemonProcess, Export, list[Path]]
                                      ) -> None:
    d, _, _ = setup
    r = subprocess.run(f"{sys.executable} -m dmrepl.cli.main --socket {d.socket} "
                       "events --now | head -2; echo \"${PIPESTATUS[0]}\"",
                       shell=True, executable="/bin/bash", capture_output=True, text=True,
                       timeout=EVENT_DEADLINE)
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(json.loads(x)["kind"] == "exists" for x in lines[:2])
    assert lines[2] == "0" and r.stderr == "", (lines, r.stderr)
    # the daemon still serves
    assert d.cli("ls").returncode == 0


def test_unknown_name_is_refused_before_streaming(
        setup: tuple[DaemonProcess, Export, list[Path]]) -> None:
    d, _, _ = setup
    r = d.cli("events", "nosuch")
    assert r.returncode != 0 and "no device named 'nosuch'" in r.stderr, r.stderr
