"""The root-only unix control sockets of the daemons (ulogd, dmrepl daemon)."""

from __future__ import annotations

import contextlib
import os
import socket


def listen_root_only(path: str, backlog: int, dir_mode: int = 0o777) -> socket.socket:
    """A listening stream socket at ``path`` that only its owner (root) can use.

    A stale socket left by a killed daemon is replaced.  The umask is set around
    bind so the node never exists with wider permissions, not even for a moment.
    """
    os.makedirs(os.path.dirname(path) or ".", mode=dir_mode, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock
