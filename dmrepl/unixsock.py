"""The root-only unix control sockets of the daemons (ulogd, dmrepl daemon)."""

from __future__ import annotations

import errno
import logging
import os
import socket

from dmrepl.ownership import claim_socket_path

log = logging.getLogger(__name__)

#: accept() failures that mean "out of a resource for now" (file descriptors, socket
#: buffers, memory): the pending connection stays queued; wait, then accept again.
ACCEPT_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() failures that concern only the one connection (it went before we took it).
ACCEPT_CONNECTION_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR})
ACCEPT_BACKOFF_FIRST = 0.05   # seconds: the first wait after a shortage
ACCEPT_BACKOFF_MAX = 1.0      # seconds: the longest (doubling from the first)


class AcceptBackoff:
    """What an accept loop does after ``accept()`` failed: never spin.

    :meth:`failed` returns the seconds to wait before the next ``accept()``:
    0 for a connection that went away before it was taken, else doubling up to
    :data:`ACCEPT_BACKOFF_MAX` while the failures last (a shortage; an error not
    known to pass is logged as such and waited on too: the server must outlive
    it).  :meth:`succeeded` ends it.  The first failure and the end are logged.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.delay = 0.0

    def failed(self, err: OSError) -> float:
        if err.errno in ACCEPT_CONNECTION_GONE:
            return 0.0
        if err.errno not in ACCEPT_SHORTAGES:
            log.error("%s: accept failed: %s; retrying with backoff", self.what, err)
        elif not self.delay:
            log.warning("%s: cannot accept connections: %s; retrying with backoff",
                        self.what, os.strerror(err.errno or 0))
        self.delay = min(ACCEPT_BACKOFF_MAX, self.delay * 2 or ACCEPT_BACKOFF_FIRST)
        return self.delay

    def succeeded(self) -> None:
        if self.delay:
            log.warning("%s: accepting connections again", self.what)
        self.delay = 0.0


def listen_root_only(path: str, backlog: int, dir_mode: int = 0o777) -> socket.socket:
    """A listening stream socket at ``path`` that only its owner (root) can use.

    A stale socket left by a killed daemon is replaced; one a live server answers
    on is refused (:class:`~dmrepl.errors.InUse`) and left alone.  The umask is
    set around bind so the node never exists with wider permissions, not even
    for a moment.
    """
    os.makedirs(os.path.dirname(path) or ".", mode=dir_mode, exist_ok=True)
    claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock
