"""The guardian process: what it resumes when the daemon's end of its pipe
closes, and how it flushes the kernel journals until the next daemon stops it
(the resume and the flushes themselves, on real devices:
tests/kernel/test_dmrepl_kjournal.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dmrepl.daemon.guardian import MODULE, DeviceGone, Guardian, flush_journals, serve

#: a device number no device has (the real guardian finds it gone at once)
NO_DEVICE = "4095:1048575"


def wait_for(what: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_serve_keeps_what_is_held_and_the_journals_at_the_end() -> None:
    lines = io.StringIO('{"hold": "a"}\n{"hold": "b b"}\n{"free": "a"}\nnot json\n'
                        '{"hold": "c"}\n{"what": "x"}\n{"free": "c"}\n'
                        '{"journal": "j1", "dev": "253:1"}\n{"journal": "j2", "dev": "253:2"}\n'
                        '{"journal": "bad", "dev": "sda"}\n{"journal": "nodev"}\n'
                        '{"unjournal": "j1"}\n{"unjournal": "never told"}\n')
    told = serve(lines)
    assert told.held == {"b b"}
    assert told.journals == {"j2": "253:2"}


def recorder(out: Path) -> list[str]:
    """A guardian that writes what it would resume instead of resuming it."""
    code = ("import json, sys\n"
            "from dmrepl.daemon.guardian import serve\n"
            f"open({str(out)!r}, 'a').write(json.dumps(sorted(serve(sys.stdin).held)) + '\\n')\n")
    return [sys.executable, "-c", code]


def test_the_guardian_is_told_before_and_after_and_sees_the_daemon_go(
        tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    g = Guardian(recorder(out))
    g.hold("a")
    g.hold("b")
    g.free("a")
    assert g.held == {"b"}
    g.close()                   # the daemon's end closes: it exits with what is held
    assert [json.loads(x) for x in out.read_text().splitlines()] == [["b"]]


def test_a_guardian_that_died_is_started_again_and_told_all_still_held(
        tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    g = Guardian(recorder(out))
    g.hold("a")
    first = g.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: g.pid is None)
    g.hold("b")                 # a new one, told of "a" too
    g.close()
    assert [json.loads(x) for x in out.read_text().splitlines()] == [["a", "b"]]


class Outage:
    """A fake clock and devices for :func:`flush_journals`: ``gone_at`` says
    in which round (1, 2...) a device vanishes; ``failing`` which rounds a
    device's flush fails in."""

    def __init__(self, gone_at: dict[str, int], failing: dict[str, set[int]] | None = None
                 ) -> None:
        self.gone_at = gone_at
        self.failing = failing or {}
        self.round = 0
        self.waits: list[float] = []
        self.flushed: list[tuple[int, str, str]] = []

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.round += 1
        assert self.round < 100, "the loop does not end"

    def flush(self, name: str, devno: str) -> None:
        if self.round >= self.gone_at[name]:
            raise DeviceGone(f"no device {devno}")
        if self.round in self.failing.get(name, set()):
            raise OSError(5, "Input/output error")
        self.flushed.append((self.round, name, devno))


def test_after_the_daemon_each_journal_is_flushed_every_interval_until_it_is_gone(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = Outage(gone_at={"a": 3, "b": 5}, failing={"b": {1, 2}})
    journals = {"a": "253:1", "b": "253:2"}
    flush_journals(journals, 0.5, flush=out.flush, wait=out.wait)
    # a wait of one interval before every round; "b" failing for two rounds is
    # flushed again after them; each is forgotten once gone; none left: it returns
    assert out.waits == [0.5] * 5
    assert out.flushed == [(1, "a", "253:1"), (2, "a", "253:1"),
                           (3, "b", "253:2"), (4, "b", "253:2")]
    assert journals == {}
    said = capsys.readouterr().err.splitlines()
    assert sum("flushing b" in line for line in said) == 1     # (said once, not each round)
    assert any("a is gone" in line for line in said) and any("b is gone" in line
                                                              for line in said)


def flusher(out: Path, rounds: int) -> list[str]:
    """A guardian whose flushes are written to ``out``; each device is gone
    after ``rounds`` of them."""
    code = ("import sys\n"
            "from dmrepl.daemon.guardian import DeviceGone, flush_journals, serve\n"
            "count = {}\n"
            "def flush(name, devno):\n"
            "    count[name] = count.get(name, 0) + 1\n"
            f"    if count[name] > {rounds}:\n"
            "        raise DeviceGone(devno)\n"
            f"    open({str(out)!r}, 'a').write(name + ' ' + devno + '\\n')\n"
            "flush_journals(serve(sys.stdin).journals, 0.01, flush=flush)\n")
    return [sys.executable, "-c", code]


def test_the_daemon_tells_its_journals_and_the_guardian_outlives_it_to_flush_them(
        tmp_path: Path) -> None:
    out = tmp_path / "flushed"
    g = Guardian(flusher(out, rounds=3))
    g.journal("a", "253:1")
    g.journal("b", "253:2")
    g.unjournal("b")            # (removed while the daemon ran: never flushed)
    pid = g.pid
    assert pid is not None and g.journals == {"a": "253:1"}
    assert out.exists() is False   # nothing flushed while the daemon is there
    g.close()                   # the daemon goes: it does not wait for the guardian,
    wait_for(lambda: not _alive(pid))   # which flushes "a" until it is gone, then exits
    assert out.read_text().splitlines() == ["a 253:1"] * 3


def test_a_guardian_that_died_is_told_the_journals_again(tmp_path: Path) -> None:
    out = tmp_path / "flushed"
    g = Guardian(flusher(out, rounds=1))
    g.journal("a", "253:1")
    first = g.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: g.pid is None)
    g.journal("b", "253:2")     # a new one, told of "a" too
    pid = g.pid
    assert pid is not None
    g.close()
    wait_for(lambda: not _alive(pid))
    assert sorted(out.read_text().splitlines()) == ["a 253:1", "b 253:2"]


def _alive(pid: int) -> bool:
    """Not exited (a child of ours the kernel keeps as a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_real_guardian_forgets_a_journal_that_is_gone_and_exits(tmp_path: Path) -> None:
    pidfile = tmp_path / "journal" / "guardian.pid"
    g = Guardian(pidfile=str(pidfile), flush_interval=0.01)
    g.journal("gone", NO_DEVICE)
    pid = g.pid
    assert pid is not None and pidfile.read_text().strip() == str(pid)
    g.close()
    wait_for(lambda: not _alive(pid))
    assert not pidfile.exists()     # (it removes its own pid file as it exits)


def test_a_new_daemon_stops_the_guardian_the_previous_one_left(tmp_path: Path) -> None:
    pidfile = tmp_path / "journal" / "guardian.pid"
    old = Guardian(pidfile=str(pidfile))
    old.journal("j", NO_DEVICE)   # (its daemon's end still open: it would wait forever)
    pid = old.pid
    assert pid is not None
    wait_for(lambda: MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes())  # (exec'd)
    Guardian(pidfile=str(pidfile)).stop_previous()
    assert not _alive(pid) and not pidfile.exists()
    assert old.pid is None


def test_a_pid_file_naming_another_process_stops_nothing(tmp_path: Path) -> None:
    pidfile = tmp_path / "guardian.pid"
    # the guardian's module in its argv, but not this pid file's guardian
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              MODULE, "--pidfile", str(tmp_path / "elsewhere.pid")])
    try:
        pidfile.write_text(f"{other.pid}\n")
        Guardian(pidfile=str(pidfile)).stop_previous()
        assert other.poll() is None and not pidfile.exists()
    finally:
        other.kill()
        other.wait()
