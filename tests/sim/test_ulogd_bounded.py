"""A large log's CTR or RESUME does not hold up other logs' requests (issue 10, 6c).

The fake kernel sends a CTR whose construction (or a RESUME whose device read) the
test holds on an event, then a request for another log: that one must be answered
while the first is still under way, and the held request once it is released.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from dmrepl.dirtylog import open_dirty_log
from dmrepl_testing.ulogd import FakeKernel, s64
from ulogd import protocol as p
from ulogd.main import Daemon
from ulogd.protocol import RequestType as RT

SMALL, BIG = b"SMALL-LOG", b"BIG-LOG"
HELD_SECTORS = 1 << 20  # the target length whose construction the test holds


class HeldLogs:
    """A log factory whose log for HELD_SECTORS waits on ``release`` in its
    constructor (``where="ctr"``) or its resume (``where="resume"``)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.release.wait(30)

    def __call__(self, type_name: str, args: Sequence[str], target_sectors: int) -> Any:
        log = open_dirty_log(type_name, args, target_sectors)
        if target_sectors != HELD_SECTORS:
            return log
        if self.where == "ctr":
            self.hold()
        else:
            resume = log.resume

            def held_resume() -> None:
                self.hold()
                resume()

            log.resume = held_resume
        return log


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    k = FakeKernel()
    yield k
    k.close()


@pytest.mark.parametrize("where", ["ctr", "resume"])
def test_other_logs_answered_while_a_large_log_is_set_up(kernel: FakeKernel,
                                                          where: str) -> None:
    k = kernel
    factory = HeldLogs(where)
    daemon = Daemon(k.transport(), control_path=None, log_factory=factory)
    thread = threading.Thread(target=daemon.serve, daemon=True)
    thread.start()
    try:
        assert k.ctr(SMALL, 1, "8192 core 1024 nosync").error == 0
        assert k.simple(SMALL, 1, RT.RESUME).error == 0
        big_ctr = f"{HELD_SECTORS} core 8 nosync".encode()
        if where == "ctr":
            held = k.send(BIG, 2, RT.CTR, big_ctr)
        else:
            assert k.request(BIG, 2, RT.CTR, big_ctr).error == 0
            held = k.send(BIG, 2, RT.RESUME)
        assert factory.entered.wait(10)
        waiting = k.send(BIG, 2, RT.GET_REGION_SIZE)  # same log: answered after it
        other = k.send(SMALL, 1, RT.IN_SYNC, p.encode_u64(3))
        first = k.recv(timeout=5)
        assert first is not None, "the other log was not answered while the CTR was held"
        assert (first.seq, first.error, s64(first.data)) == (other, 0, 1)
        factory.release.set()
        replies = [k.recv(timeout=10), k.recv(timeout=10)]
        assert [(r.seq, r.error) for r in replies if r is not None] == [(held, 0), (waiting, 0)]
        assert s64(k.simple(BIG, 2, RT.GET_SYNC_COUNT).data) == HELD_SECTORS // 8
    finally:
        factory.release.set()
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive()
