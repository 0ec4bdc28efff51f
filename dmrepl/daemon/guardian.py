"""The guardian: resumes the devices the daemon holds suspended, if the daemon dies.

A kernel journal whose site link is past its fall-behind limit holds the
device's writes by suspending /dev/mapper/NAME until the link is back under it
(:mod:`dmrepl.daemon.kjournal`).  A daemon killed meanwhile must not leave the
device suspended: its writers would hang until the next start.  So the daemon
tells a small process of its own which devices it holds, before it suspends one
and after it resumes one (a JSON line each on the guardian's standard input:
``{"hold": NAME}``, ``{"free": NAME}``).  When the daemon's end of that pipe
closes (it exited or was killed), the guardian resumes the devices still held
and exits; their writes go on into their kernel journals, as in any outage of
the daemon, and the next daemon drains them.

The guardian runs in a session of its own and ignores SIGINT and SIGTERM (a
signal to the daemon's process group or service must not take it first); it
exits when the daemon's end closes, at once when it holds nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import IO

import dmrepl

log = logging.getLogger(__name__)

MODULE = "dmrepl.daemon.guardian"


class Guardian:
    """The daemon's side: starts the guardian at its first hold (and again if it
    died, telling it every device still held)."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self._argv = argv or [sys.executable, "-m", MODULE]
        self._proc: subprocess.Popen[bytes] | None = None
        self._held: set[str] = set()
        self._lock = threading.Lock()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

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
            if self._proc is not None:
                try:
                    self._send({"free": name})
                except OSError as e:   # (it holds nothing it would resume wrongly)
                    log.warning("guardian: %s", e)

    def close(self) -> None:
        """The daemon stops: the guardian resumes what is still held, and exits."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            assert proc.stdin is not None
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("guardian (pid %d) did not exit", proc.pid)

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
            for name in sorted(self._held):
                self._write({"hold": name})
        self._write(msg)

    def _write(self, msg: dict[str, str]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise OSError(f"the guardian (pid {self._proc.pid}) cannot be told: {e}") from e


def serve(lines: IO[str]) -> set[str]:
    """Read the daemon's lines until EOF; return the devices held at the end."""
    held: set[str] = set()
    for line in lines:
        try:
            msg = json.loads(line)
            if "hold" in msg:
                held.add(str(msg["hold"]))
            elif "free" in msg:
                held.discard(str(msg["free"]))
            else:
                raise ValueError("neither hold nor free")
        except (ValueError, TypeError, AttributeError) as e:
            print(f"dmrepl guardian: a line it cannot read ({e}): {line!r}", file=sys.stderr)
    return held


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from dmrepl.dm import DmControl  # (before the daemon dies: nothing to import then)
    dm = DmControl()
    held = serve(sys.stdin)
    failed = 0
    for name in sorted(held):
        try:
            dm.resume(name)
            print(f"dmrepl guardian: the daemon is gone: resumed {name} (its writes "
                  "were held for a site link past its fall-behind limit)", file=sys.stderr)
        except OSError as e:
            failed += 1
            print(f"dmrepl guardian: resuming {name}: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
