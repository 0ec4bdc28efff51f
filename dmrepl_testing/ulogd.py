"""A fake kernel speaking the real dm-log-userspace bytes, for sim tests.

The daemon's socket and the fake kernel's are ``AF_UNIX`` datagram sockets
bound to unique abstract addresses; the daemon's :class:`~ulogd.transport.Transport`
is told which address is "the kernel", exactly as it trusts only port id 0 on
netlink.  A third socket (:meth:`FakeKernel.forger`) plays a userspace forger.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import time

from ulogd import protocol as p
from ulogd.transport import Transport

_counter = itertools.count()


def _abstract(tag: str) -> bytes:
    return f"\0ulogd-sim-{os.getpid()}-{next(_counter)}-{tag}".encode()


class FakeKernel:
    """Sends requests like dm-log-userspace (global seq, version 3) and reads replies."""

    def __init__(self) -> None:
        self.addr = _abstract("kernel")
        self.daemon_addr = _abstract("daemon")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.addr)
        self.daemon_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.daemon_sock.bind(self.daemon_addr)
        for s in (self.sock, self.daemon_sock):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.seq = 0

    def transport(self) -> Transport:
        return Transport(self.daemon_sock, kernel_address=self.addr)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.daemon_addr)

    def send(self, uuid: bytes, luid: int, rtype: int, payload: bytes = b"",
             version: int = 3) -> int:
        seq = self.seq
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.send_raw(p.encode_request(seq, luid, uuid, rtype, payload, version))
        return seq

    def recv(self, timeout: float = 5.0) -> p.Reply | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                return p.decode_reply(self.sock.recv(65536))

    def request(self, uuid: bytes, luid: int, rtype: int, payload: bytes = b"",
                version: int = 3, timeout: float = 5.0) -> p.Reply:
        seq = self.send(uuid, luid, rtype, payload, version)
        reply = self.recv(timeout)
        if reply is None:
            raise TimeoutError(f"no reply to request type {rtype} seq {seq}")
        assert reply.seq == seq, (reply, seq)
        return reply

    # conveniences ----------------------------------------------------------
    def ctr(self, uuid: bytes, luid: int, args: str, reconnect: bool = False) -> p.Reply:
        data = args.encode() + (b"\0" if reconnect else b"")
        return self.request(uuid, luid, p.RequestType.CTR, data)

    def simple(self, uuid: bytes, luid: int, rtype: int) -> p.Reply:
        return self.request(uuid, luid, rtype)

    def regions(self, uuid: bytes, luid: int, rtype: int, regions: list[int]) -> p.Reply:
        return self.request(uuid, luid, rtype, struct.pack(f"={len(regions)}Q", *regions))

    def region(self, uuid: bytes, luid: int, rtype: int, region: int) -> p.Reply:
        return self.request(uuid, luid, rtype, p.encode_u64(region))

    def forger(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(_abstract("forger"))
        return s

    def close(self) -> None:
        self.sock.close()
        self.daemon_sock.close()


def s64(data: bytes) -> int:
    return int(p.S64_S.unpack(data)[0])


def u64(data: bytes) -> int:
    return int(p.U64_S.unpack(data)[0])
