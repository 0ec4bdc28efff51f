"""The kernel link: a NETLINK_CONNECTOR socket joined to group CN_IDX_DM.

Joining is ``bind((0, 0))`` then ``setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, 7)``.
``bind`` takes a *bitmask* of groups, so ``bind((0, 7))`` (what cmirrord and the
uapi header comment do) joins groups 1-3, not 7.

Only datagrams sent by the kernel (sender port id 0) are served: any other
process that can multicast on group 7 would otherwise be able to forge requests.
Those are dropped and counted, as are receive-buffer overflows (ENOBUFS), which
are logged and survived: the kernel saw ``-ESRCH`` for the lost requests and
will reconnect (CTR + RESUME) on its own.

Tests inject a socket (``sock=``): the fake kernel is an ``AF_UNIX`` datagram
socket speaking the real bytes, identified by its address (``kernel_address=``).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Any

from cdefs.connector import SOL_NETLINK, lib

log = logging.getLogger("ulogd.transport")

#: ~32 MiB: thousands of outstanding requests never overflow it.
DEFAULT_RCVBUF = 32 << 20
#: Larger than any connector message (CONNECTOR_MAX_MSG_SIZE + headers).
RECV_SIZE = int(lib.CONNECTOR_MAX_MSG_SIZE) + 64
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def open_connector_socket(rcvbuf: int = DEFAULT_RCVBUF) -> socket.socket:
    """A netlink connector socket subscribed to the dm userspace-log group."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, int(lib.NETLINK_CONNECTOR))
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, int(lib.NETLINK_ADD_MEMBERSHIP), int(lib.CN_IDX_DM))
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    except BaseException:
        sock.close()
        raise
    return sock


class Transport:
    """Receive kernel datagrams and send replies."""

    def __init__(self, sock: socket.socket | None = None, *, kernel_address: Any = None,
                 rcvbuf: int = DEFAULT_RCVBUF) -> None:
        self.sock = sock if sock is not None else open_connector_socket(rcvbuf)
        self.netlink = self.sock.family == socket.AF_NETLINK
        self._kernel_address = kernel_address
        self._reply_address: Any = (0, 0) if self.netlink else kernel_address
        self.sock.setblocking(False)
        self.enobufs = 0
        self.foreign_dropped = 0
        self.send_errors = 0
        self.received = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def portid(self) -> int:
        if self.netlink:
            return int(self.sock.getsockname()[0])
        return 0

    def _from_kernel(self, addr: Any) -> bool:
        if self.netlink:
            return bool(addr[0] == 0)
        return bool(addr == self._kernel_address)

    def use_blocking_receive(self, timeout: float) -> None:
        """Blocking receives that give up after ``timeout`` (SO_RCVTIMEO).

        The serving loop then costs one ``recvfrom_into`` and one ``sendto`` per request:
        no ``poll`` and no failing ``recvfrom`` (an exception in Python) to notice an
        empty queue.  The timeout bounds how long a stop request goes unnoticed.
        """
        self.sock.setblocking(True)
        sec = int(timeout)
        usec = int((timeout - sec) * 1e6)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("@ll", sec, usec))

    def recv_into(self, buf: bytearray) -> int:
        """Receive one kernel datagram into ``buf``: its size, or -1 (timeout, dropped
        foreign datagram, ENOBUFS).  ``buf`` must hold :data:`RECV_SIZE` bytes."""
        try:
            size, addr = self.sock.recvfrom_into(buf)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return -1
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.enobufs += 1
                log.warning("receive buffer overflowed (ENOBUFS #%d): the kernel will "
                            "reconnect the logs whose requests were lost", self.enobufs)
                return -1
            raise
        if not self._from_kernel(addr):
            self.foreign_dropped += 1
            log.warning("dropped a datagram from %r: not the kernel", addr)
            return -1
        self.received += 1
        return int(size)

    def send(self, data: bytes | memoryview) -> None:
        try:
            self.sock.sendto(data, self._reply_address)
        except OSError as e:
            # Nothing to do but count it: the kernel times out (15 s) and resends.
            self.send_errors += 1
            log.error("reply of %d bytes not sent: %s", len(data), e)

    def close(self) -> None:
        self.sock.close()
