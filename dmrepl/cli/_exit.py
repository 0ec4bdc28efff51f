"""Exit codes of the dmrepl command; stable: scripts may rely on them."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0            # success
    ERROR = 1         # the operation failed in the daemon, engine or kernel
    USAGE = 2         # the command line is malformed (argparse)
    INVALID = 3       # a table, message or argument was rejected; nothing changed
    NOT_FOUND = 4     # no such device
    EXISTS = 5        # a device of that name already exists
    BUSY = 6          # the device is in use (open, or a replicator with devices)
    TIMEOUT = 7       # wait timed out / the daemon did not answer in time
    NO_DAEMON = 8     # no daemon on the control socket
    IN_USE = 9        # daemon: another process owns the state dir, socket or log; untouched
    PERMISSION = 10   # must be root (the control socket refused us; the daemon needs root)
    INTERNAL = 70     # a bug: please report it (rerun with --propagate)


KIND_CODES = {
    "user": ExitCode.INVALID, "notfound": ExitCode.NOT_FOUND, "exists": ExitCode.EXISTS,
    "busy": ExitCode.BUSY, "timeout": ExitCode.TIMEOUT, "runtime": ExitCode.ERROR,
    "internal": ExitCode.INTERNAL, "permission": ExitCode.PERMISSION,
}


def epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {int(c):>3}  {c.name}" for c in ExitCode)
