"""The guardian: what outlives the daemon, for the devices of its kernel journals.

A kernel journal whose site link is past its fall-behind limit holds the
device's writes by suspending /dev/mapper/NAME until the link is back under it
(:mod:`dmrepl.daemon.kjournal`).  A daemon killed meanwhile must not leave the
device suspended: its writers would hang until the next start.  So the daemon
tells a small process of its own which devices it holds, before it suspends one
and after it resumes one (a JSON line each on the guardian's standard input:
``{"hold": NAME}``, ``{"free": NAME}``).  When the daemon's end of that pipe
closes (it exited or was killed), the guardian resumes the devices still held;
their writes go on into their kernel journals, as in any outage of the daemon,
and the next daemon drains them.

It also flushes the kernel journals while the daemon is down.  ``log-writes``
logs a completed write only at the next flush (or as its target goes, at the
daemon's segment swaps): until then the kernel keeps a copy of it in memory.  A
writer that never flushes would make it keep every write of the outage, so the
daemon tells the guardian every log-writes device it runs and when one goes
(``{"journal": NAME, "dev": "MAJ:MIN"}``, ``{"unjournal": NAME}``), and once
the daemon is gone, the guardian sends each a flush every ``--flush-interval``
seconds (the daemon's ``journal_interval``: the kernel then holds what a device
writes in one interval, as while the daemon runs).  A device that is gone (or
whose number another device took) is forgotten; the guardian exits once none is
left, or when the next daemon stops it (:meth:`Guardian.stop_previous`, by the
pid file the daemon writes as it starts the guardian) before it takes the
journals over.

The guardian runs in a session of its own and ignores SIGINT and SIGTERM (a
signal to the daemon's process group or service must not take it first)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import dmrepl

log = logging.getLogger(__name__)

MODULE = "dmrepl.daemon.guardian"
#: The guardian's pid file, in the daemon's journal directory.
PIDFILE = "guardian.pid"
#: Seconds between the guardian's flushes of each journal while the daemon is
#: down, unless the daemon says (its ``journal_interval``).
FLUSH_INTERVAL = 0.5
#: Seconds a new daemon waits for an old guardian to go after killing it.
STOP_WAIT = 5.0


class Guardian:
    """The daemon's side: starts the guardian at its first need (and again if it
    died, telling it every device still held and every journal).

    ``pidfile``: where the guardian's pid is kept, so that the next daemon can
    stop it (:meth:`stop_previous`); None: nowhere (tests)."""

    def __init__(self, argv: list[str] | None = None, *, pidfile: str | None = None,
                 flush_interval: float = FLUSH_INTERVAL) -> None:
        self._pidfile = os.path.abspath(pidfile) if pidfile else None
        self._argv = argv or [sys.executable, "-m", MODULE,
                              "--flush-interval", repr(flush_interval),
                              *(["--pidfile", self._pidfile] if self._pidfile else [])]
        self._proc: subprocess.Popen[bytes] | None = None
        self._held: set[str] = set()
        #: the kernel journals' log-writes devices: name -> major:minor
        self._journals: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    @property
    def journals(self) -> dict[str, str]:
        return dict(self._journals)

    @property
    def pid(self) -> int | None:
        """The guardian process's pid (None: not started, or exited)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def hold(self, name: str) -> None:
        """NAME is about to be suspended by the daemon: resume it if the daemon
        dies.  Raises OSError if the guardian cannot be told (then do not hold)."""
        with self._lock:
            self._send({"hold": name})
            self._held.add(name)

    def free(self, name: str) -> None:
        """NAME is no longer the daemon's to resume."""
        with self._lock:
            self._held.discard(name)
            self._tell_if_started({"free": name})

    def journal(self, name: str, devno: str) -> None:
        """NAME (device ``devno``, major:minor) is a log-writes device the daemon
        drains: flush it while the daemon is down.  Raises OSError if the guardian
        cannot be told (the journal works on; an outage then holds its writes in
        kernel memory until a flush or the next daemon's first swap)."""
        with self._lock:
            self._send({"journal": name, "dev": devno})
            self._journals[name] = devno

    def unjournal(self, name: str) -> None:
        """NAME is no longer a kernel journal of the daemon's (removed, replaced)."""
        with self._lock:
            if self._journals.pop(name, None) is not None:
                self._tell_if_started({"unjournal": name})

    def close(self) -> None:
        """The daemon stops: the guardian resumes what is still held, and exits;
        with kernel journals still live (their devices could not be removed) it
        stays to flush them, and the daemon does not wait for it."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            assert proc.stdin is not None
            try:
                proc.stdin.close()
            except OSError:
                pass
            if self._journals:
                log.info("guardian (pid %d) flushes %s until the next start", proc.pid,
                         ", ".join(sorted(self._journals)))
                return
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("guardian (pid %d) did not exit", proc.pid)

    def stop_previous(self) -> None:
        """Stop the guardian a previous daemon left (flushing its journals), if
        the pid file names one: before this daemon takes the journals over (its
        flushes must not go on beside the new daemon, nor beside a new guardian,
        forever).  One blocked in a flush in the kernel (a device suspended)
        dies as the flush returns: it is waited for STOP_WAIT seconds at most."""
        if self._pidfile is None:
            return
        try:
            pid = _read_pid(self._pidfile)
        except (OSError, ValueError) as e:
            log.warning("guardian pid file %s unreadable (%s): no old guardian stopped",
                        self._pidfile, e)
            return
        if pid is None:
            return
        if _is_guardian(pid, self._pidfile):
            log.info("stopping the previous daemon's guardian (pid %d)", pid)
            try:
                os.kill(pid, signal.SIGKILL)   # (a flush is harmless to interrupt)
            except ProcessLookupError:
                pass
            except OSError as e:
                log.warning("the previous guardian (pid %d) cannot be stopped (%s): kill "
                            "it before the next start", pid, e)
                return
            deadline = time.monotonic() + STOP_WAIT
            while _alive(pid):
                if time.monotonic() > deadline:
                    log.warning("the previous guardian (pid %d) is still there (blocked "
                                "in the kernel): it exits as that returns", pid)
                    break
                time.sleep(0.01)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._pidfile)

    def _tell_if_started(self, msg: dict[str, str]) -> None:
        """Tell a running guardian what it no longer needs to do (a failure is
        logged: what it knows too much costs a resume or a flush of a device that
        is not the daemon's to act on, and is forgotten at its next start)."""
        if self._proc is not None:
            try:
                self._send(msg)
            except OSError as e:
                log.warning("guardian: %s", e)

    def _send(self, msg: dict[str, str]) -> None:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                log.warning("guardian (pid %d) exited (%s): starting another",
                            self._proc.pid, self._proc.returncode)
            # the daemon's own dmrepl, wherever the daemon found it
            root = os.path.dirname(os.path.dirname(os.path.abspath(dmrepl.__file__)))
            path = os.environ.get("PYTHONPATH")
            env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
            self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, env=env,
                                          start_new_session=True, close_fds=True)
            self._save_pid(self._proc)
            for name in sorted(self._held):
                self._write({"hold": name})
            for name, devno in sorted(self._journals.items()):
                self._write({"journal": name, "dev": devno})
        self._write(msg)

    def _save_pid(self, proc: subprocess.Popen[bytes]) -> None:
        """Write the new guardian's pid file before it is told anything (a
        guardian that knows a journal is always one the next daemon can stop);
        one that cannot be written ends the guardian, and raises OSError."""
        if self._pidfile is None:
            return
        tmp = self._pidfile + ".tmp"
        try:
            os.makedirs(os.path.dirname(self._pidfile) or ".", exist_ok=True)
            with open(tmp, "w") as f:
                f.write(f"{proc.pid}\n")
            os.replace(tmp, self._pidfile)
        except OSError as e:
            proc.kill()
            proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            self._proc = None
            raise OSError(f"the guardian's pid file {self._pidfile}: {e}") from e

    def _write(self, msg: dict[str, str]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise OSError(f"the guardian (pid {self._proc.pid}) cannot be told: {e}") from e


def _is_guardian(pid: int, pidfile: str) -> bool:
    """Is process ``pid`` the guardian that writes its pid to ``pidfile`` (not a
    process that got the number of one long gone)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:   # (gone)
        return False
    return MODULE.encode() in argv and pidfile.encode() in argv


def _alive(pid: int) -> bool:
    """Is process ``pid`` there and not a zombie (killed, its parent yet to reap it)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # (the state follows the command name, which may hold spaces and ")")
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# -- the guardian process ----------------------------------------------------------


@dataclass
class Told:
    """What the daemon told the guardian, as its end of the pipe closed."""

    held: set[str] = field(default_factory=set)
    #: log-writes device name -> major:minor
    journals: dict[str, str] = field(default_factory=dict)


def serve(lines: IO[str]) -> Told:
    """Read the daemon's lines until EOF; return what it left to the guardian."""
    told = Told()
    for line in lines:
        try:
            msg = json.loads(line)
            if "hold" in msg:
                told.held.add(str(msg["hold"]))
            elif "free" in msg:
                told.held.discard(str(msg["free"]))
            elif "journal" in msg:
                told.journals[str(msg["journal"])] = _checked_devno(msg["dev"])
            elif "unjournal" in msg:
                told.journals.pop(str(msg["unjournal"]), None)
            else:
                raise ValueError("neither hold, free, journal nor unjournal")
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            _say(f"a line it cannot read ({e}): {line!r}")
    return told


def _checked_devno(devno: object) -> str:
    major, minor = str(devno).split(":")
    return f"{int(major)}:{int(minor)}"


class DeviceGone(Exception):
    """The journal's device no longer exists (or its number is another device's)."""


def flush_device(name: str, devno: str) -> None:
    """Send a flush (REQ_PREFLUSH) to dm device ``name``, number ``devno``:
    open, fsync, close (never kept open: its removal must never find it busy for
    long).  Raises DeviceGone if it is gone, OSError if the flush failed.

    Found by its number, not by /dev/mapper/NAME, which udev may remove or
    replace at any time: its /sys entry says the dm name it has now, and the
    node is the one devtmpfs keeps for it (/dev/dm-N, made and removed by the
    kernel itself), else one of the guardian's own."""
    sysdir = f"/sys/dev/block/{devno}"
    try:
        with open(f"{sysdir}/dm/name") as f:
            now = f.read().strip()
        with open(f"{sysdir}/dm/suspended") as f:
            suspended = f.read().strip() == "1"
        kname = os.path.basename(os.readlink(sysdir))
    except FileNotFoundError as e:
        raise DeviceGone(f"no device {devno}") from e
    if now != name:
        raise DeviceGone(f"device {devno} is {now} now")
    if suspended:   # (a flush would wait for its resume: it is tried next time)
        return
    fd = _open_block(devno, f"/dev/{kname}")
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_block(devno: str, node: str) -> int:
    major, minor = (int(x) for x in devno.split(":"))
    rdev = os.makedev(major, minor)
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_rdev == rdev:
            return fd
        os.close(fd)
    except FileNotFoundError:
        pass
    # no devtmpfs node: one of its own, in /dev (often the one filesystem that is
    # not mounted nodev), gone again as soon as it is open
    own = f"/dev/.dmrepl-guardian-{os.getpid()}-{major}-{minor}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(own)
    os.mknod(own, 0o600 | stat.S_IFBLK, rdev)
    try:
        return os.open(own, os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.unlink(own)


def flush_journals(journals: dict[str, str], interval: float,
                   flush: Callable[[str, str], None] = flush_device,
                   wait: Callable[[float], object] = time.sleep) -> None:
    """Flush every journal every ``interval`` seconds until none is left: one
    that is gone is forgotten; any other failure is said once (and once more
    when it changes) and tried again next time.  ``journals`` (name ->
    major:minor) is emptied as they go."""
    failing: dict[str, str] = {}
    while journals:
        wait(interval)
        for name, devno in sorted(journals.items()):
            try:
                flush(name, devno)
            except DeviceGone as e:
                del journals[name]
                failing.pop(name, None)
                _say(f"{name} is gone ({e}): no longer flushed")
            except Exception as e:   # (one device's trouble: the others are flushed on)
                if failing.get(name) != str(e):
                    failing[name] = str(e)
                    _say(f"flushing {name} ({devno}): {e}: tried again every {interval}s")
            else:
                if failing.pop(name, None) is not None:
                    _say(f"{name} flushed again")


def _say(text: str) -> None:
    print(f"dmrepl guardian: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--flush-interval", type=float, default=FLUSH_INTERVAL)
    parser.add_argument("--pidfile", help="written by the daemon; removed at exit")
    args = parser.parse_args(argv)
    from dmrepl.dm import DmControl  # (before the daemon dies: nothing to import then)
    told = serve(sys.stdin)
    failed = 0
    for name in sorted(told.held):
        try:
            DmControl().resume(name)
            _say(f"the daemon is gone: resumed {name} (its writes were held for a site "
                 "link past its fall-behind limit)")
        except OSError as e:
            failed += 1
            _say(f"resuming {name}: {e}")
    if told.journals:
        _say(f"the daemon is gone: flushing {', '.join(sorted(told.journals))} every "
             f"{args.flush_interval}s until the next daemon (log-writes holds the writes "
             "not yet flushed in kernel memory)")
        flush_journals(told.journals, args.flush_interval)
    if args.pidfile is not None and _pid_is_mine(args.pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.pidfile)
    return 1 if failed else 0


def _pid_is_mine(pidfile: str) -> bool:
    try:
        return _read_pid(pidfile) == os.getpid()
    except (OSError, ValueError):
        return False


def _read_pid(pidfile: str) -> int | None:
    """The pid in ``pidfile`` (None: no such file); OSError or ValueError if it
    cannot be read."""
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
