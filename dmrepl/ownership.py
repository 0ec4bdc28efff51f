"""One owner per state: exclusive claims a daemon takes before it touches anything.

A daemon claims its state directory (``flock`` on a lock file in it, held for the
process lifetime, released by the kernel when the process dies, so a crash never
leaves a stale claim), the devices it must own alone (``flock`` on a file, an
``O_EXCL`` open on a block device, as LVM and mkfs do), and the unix socket paths
it listens on (probed before a stale node is removed: a socket that answers
belongs to a live server and is left alone).  A claim held elsewhere is refused
with :class:`~dmrepl.errors.InUse` naming the path and, where known, the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat

from dmrepl.errors import InUse

LOCK_FILE = "lock"
#: How long a probe of an existing unix socket may wait for the listener to take it.
SOCKET_PROBE_TIMEOUT = 2.0


class Claim:
    """An exclusive claim held through an open file descriptor; :meth:`release`
    (or the process's death) gives it up."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _holder(fd: int) -> str:
    """`` (pid N)`` from a lock file its holder wrote its pid to, else ``""``."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).split()[0])
        return f" (pid {pid})"
    return ""


def claim_lock_file(path: str, what: str) -> Claim:
    """``flock`` ``path`` (created if missing) exclusively and write our pid in it.

    ``what`` names the thing the lock stands for in the refusal."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise InUse(f"{what} is in use by another process{holder}: stop it first, "
                    "or use another one") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return Claim(fd, path)


def claim_directory(path: str, what: str = "state directory") -> Claim:
    """Create ``path`` (mode 0700) if needed and lock it for this process's lifetime."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    return claim_lock_file(os.path.join(path, LOCK_FILE), f"{what} {path}")


def claim_device(fd: int, path: str, is_blockdev: bool) -> Claim | None:
    """Own the device or file open at ``fd`` alone.

    A block device is reopened with ``O_EXCL`` (the kernel's own exclusive claim:
    refused while another process, a mount or a dm table holds it); the returned
    claim holds that descriptor.  A regular file is ``flock``-ed through ``fd``
    itself (released when ``fd`` is closed), and ``None`` is returned."""
    if is_blockdev:
        try:
            excl = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            raise InUse(f"{path} is in use (opened exclusively by another process, "
                        "mounted, or held by a device-mapper table): stop its user "
                        "first") from None
        return Claim(excl, path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InUse(f"{path} is in use by another process: stop it first") from None
    return None


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a new listening unix socket.

    Nothing there: done.  A socket a server answers on: :class:`InUse` (it is
    left alone).  A socket nobody answers on (ECONNREFUSED: its server died):
    stale, removed.  Anything else at ``path`` (a file, a directory): refused
    with ``FileExistsError``, never removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket: remove it or "
                                            "choose another path", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(SOCKET_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass   # stale: its listener is gone
        except (TimeoutError, BlockingIOError):
            # a full backlog: a listener is there, only busy
            raise InUse(f"socket {path} is in use by a running server: stop it first, "
                        "or choose another path") from None
        else:
            raise InUse(f"socket {path} is in use by a running server: stop it first, "
                        "or choose another path")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
