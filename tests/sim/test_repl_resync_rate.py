"""Per-site-link resync rate limit (``resync_rate``, like DRBD's resync-rate).

The limiter runs on the replicator's clock; the test freezes it, so what the limit
lets through is counted (no timing): at a frozen clock only one region is copied,
each advance of the clock by one region's worth of time lets exactly one more
through, and lifting the limit finishes the resync.
"""

from __future__ import annotations

import random
import time

import pytest

from dmrepl.replicator import Replicator
from dmrepl.replicator.errors import MessageError, TableError
from dmrepl.replicator.table import parse_replicator
from dmrepl_testing.replicator import FakeStore, StoreSet

DEV = 64 << 10
REGION = 4096  # "core 2 8": 8 sectors


def _wait(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def make(slink1: str, now: list[float]):
    stores = StoreSet()
    stores.add(FakeStore((4096 + 64) * 512, name="log"))
    local = stores.add(FakeStore(DEV, name="l0", data=random.Random(1).randbytes(DEV)))
    remote = stores.add(FakeStore(DEV, name="r0"))
    rep = Replicator.from_table(
        f"0 1 replicator ringbuffer 4 log 0 create 4096 blockdev 2 0 async {slink1}",
        opener=stores.open, clock=lambda: now[0], retry_interval=0.01,
        persist_interval=0.01)
    rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                   "1 1 r0 core 2 8 sync")  # "sync": every region needs the initial sync
    return rep, local, remote


def resynced(rep: Replicator) -> int:
    return rep.status_dict()["devices"][0]["legs"][1]["resynced"]


def throttled(rep: Replicator) -> bool:
    return rep.status_dict()["slinks"][1]["resync_throttled"]


def test_resync_rate_from_the_table_holds_the_resync_back() -> None:
    now = [100.0]
    rep, local, remote = make("blockdev 4 1 async resync_rate 4k", now)  # 1 region/s
    assert "resync_rate 4k" in rep.status("table")
    assert "1:up" in rep.status() and ":rate=4k" in rep.status()
    assert rep.status_dict()["slinks"][1]["resync_rate"] == 4096
    rep.start()
    _wait(lambda: resynced(rep) >= 1 and throttled(rep), "the first region, then the limit")
    assert resynced(rep) == 1
    now[0] += 1.0  # one region's worth of time
    _wait(lambda: resynced(rep) >= 2 and throttled(rep), "one more region")
    assert resynced(rep) == 2
    now[0] += 3.0
    _wait(lambda: resynced(rep) >= 3 and throttled(rep), "one more region")
    assert resynced(rep) == 3  # unused time is not saved up for a burst
    rep.message(["slink", "message", "1", "resync_rate", "0"])
    assert ":rate=" not in rep.status() and "resync_rate" not in rep.status("table")
    assert rep.wait_drained(20), rep.status_dict()
    assert resynced(rep) == DEV // REGION
    assert remote.snapshot() == local.snapshot()
    assert rep.status_dict()["slinks"][1]["resync_bytes"] == DEV
    rep.close()


def test_resync_rate_by_message_and_writes_are_not_limited() -> None:
    now = [0.0]
    rep, local, remote = make("blockdev 2 1 async", now)
    rep.message(["slink", "message", "1", "resync_rate", "8k"])  # 2 regions/s
    assert rep.status_dict()["slinks"][1]["resync_rate"] == 8192
    assert "blockdev 4 1 async resync_rate 8k" in rep.status("table")
    rep.start()
    _wait(lambda: resynced(rep) >= 1 and throttled(rep), "the limit")
    assert resynced(rep) == 1
    # new writes still reach the remote while the resync waits for the limiter
    dev = rep.devices[0]
    dev.write(0, b"\x5a" * 512)
    _wait(lambda: rep.status_dict()["slinks"][1]["applied_seq"] >= 1, "the copy")
    assert resynced(rep) == 1
    now[0] += 0.5  # 4 KiB at 8 KiB/s
    _wait(lambda: resynced(rep) >= 2 and throttled(rep), "one more region")
    assert resynced(rep) == 2
    rep.message(["slink", "message", "1", "resync_rate", "1g"])
    assert rep.status_dict()["slinks"][1]["resync_rate"] == 1 << 30
    now[0] += 1.0  # a frozen clock still lets one region through per advance
    _wait(lambda: resynced(rep) >= 3 and throttled(rep), "one more region")
    assert resynced(rep) == 3
    rep.message(["slink", "message", "1", "resync_rate", "0"])
    assert rep.wait_drained(20), rep.status_dict()
    assert remote.snapshot() == local.snapshot()
    rep.close()


@pytest.mark.parametrize("bad", ["x", "10q", "-1", "1.5m", ""])
def test_resync_rate_rejects_bad_values(bad: str) -> None:
    now = [0.0]
    rep, _l, _r = make("blockdev 2 1 async", now)
    with pytest.raises(MessageError):
        rep.message(["slink", "message", "1", "resync_rate", bad])
    assert rep.status_dict()["slinks"][1]["resync_rate"] == 0
    rep.close()


def test_resync_rate_table_grammar() -> None:
    cfg = parse_replicator("ringbuffer 4 log 0 create 4096 blockdev 2 0 async "
                           "blockdev 6 1 async ios 10 resync_rate 2048 "
                           "blockdev 3 2 resync_rate 3m")
    assert cfg.slinks[1].resync_rate == 2 << 20 and cfg.slinks[1].fallbehind.value == 10
    assert cfg.slinks[2].resync_rate == 3 << 20
    assert parse_replicator(cfg.params()) == cfg
    assert "resync_rate 2m" in cfg.params() and "resync_rate 3m" in cfg.params()
    for bad in ("blockdev 4 1 resync_rate 1m async", "blockdev 3 1 async resync_rate"):
        with pytest.raises(TableError, match=r"resync_rate|rate"):
            parse_replicator("ringbuffer 4 log 0 create 4096 blockdev 2 0 async " + bad)
