"""Socket I/O shared by the NBD server and client."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from dmrepl.blockio._range import Buffer

IOV_MAX = os.sysconf("SC_IOV_MAX")   # buffers one sendmsg takes


def sendmsg_all(sock: socket.socket, parts: Sequence[Buffer]) -> None:
    """Send ``parts`` in order with as few ``sendmsg`` calls as the kernel allows:
    one, unless it takes less or they are more than one call carries (nothing is
    joined or copied, a partial send included)."""
    rest = list(parts)
    while rest:
        sent = sock.sendmsg(rest[:IOV_MAX])
        whole = 0
        for b in rest:
            n = memoryview(b).nbytes if not isinstance(b, bytes) else len(b)
            if sent < n:
                break
            sent -= n
            whole += 1
        del rest[:whole]
        if sent:
            rest[0] = memoryview(rest[0]).cast("B")[sent:]
