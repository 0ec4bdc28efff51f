"""``sendmsg_all``: every byte of every part, in order, whatever each ``sendmsg``
takes, and never more buffers per call than the kernel carries."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmrepl.nbd import _socket


class Stingy:
    """A socket whose ``sendmsg`` takes at most ``take`` bytes a call."""

    def __init__(self, take: int) -> None:
        self.take = take
        self.out = bytearray()
        self.calls: list[int] = []

    def sendmsg(self, bufs: Sequence[bytes | memoryview]) -> int:
        self.calls.append(len(bufs))
        joined = b"".join(bytes(b) for b in bufs)[:self.take]
        self.out += joined
        return len(joined)


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=30),
       st.integers(min_value=1, max_value=100))
def test_every_byte_in_order_whatever_each_call_takes(parts: list[bytes], take: int) -> None:
    sock = Stingy(take)
    mixed = [memoryview(p) if i % 2 else p for i, p in enumerate(parts)]
    _socket.sendmsg_all(sock, mixed)  # type: ignore[arg-type]
    assert bytes(sock.out) == b"".join(parts)


def test_no_call_carries_more_than_iov_max_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_socket, "IOV_MAX", 4)
    sock = Stingy(1 << 20)
    _socket.sendmsg_all(sock, [b"ab"] * 10)  # type: ignore[arg-type]
    assert bytes(sock.out) == b"ab" * 10 and max(sock.calls) == 4 and len(sock.calls) == 3
