"""Status that says how far, how fast and how long (issue 13 point 1): per site
link lag in writes, bytes and age; in-sync percent, a measured resync rate and an
ETA; a device's line and typed dict that agree with its site link's queue.

The resync's clock is the replicator's (frozen here), so the measured rate is
exact and nothing is timed."""

from __future__ import annotations

import random
import time

from dmrepl.cli._status_text import human_bytes, human_duration, human_lines
from dmrepl.replicator import Replicator
from dmrepl.replicator.slink.link import RateMeter
from dmrepl_testing.replicator import FakeStore, StoreSet

DEV = 64 << 10
REGION = 4096  # "core 2 8": 8 sectors
REGIONS = DEV // REGION


def _wait(cond, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def make(slink1: str, now: list[float], dlog: str = "sync"):  # type: ignore[no-untyped-def]
    stores = StoreSet()
    stores.add(FakeStore((4096 + 64) * 512, name="log"))
    local = stores.add(FakeStore(DEV, name="l0", data=random.Random(1).randbytes(DEV)))
    remote = stores.add(FakeStore(DEV, name="r0"))
    rep = Replicator.from_table(
        f"0 1 replicator ringbuffer 4 log 0 create 4096 blockdev 2 0 async {slink1}",
        opener=stores.open, clock=lambda: now[0], retry_interval=0.01,
        persist_interval=0.01)
    rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                   f"1 1 r0 core 2 8 {dlog}")
    return rep, local, remote


def test_rate_meter_no_rate_until_measured_then_weighted() -> None:
    m = RateMeter(halflife=1.0, min_interval=0.5)
    m.update(0, 10.0)
    assert m.rate is None
    m.update(100, 10.2)  # too short an interval to measure
    assert m.rate is None
    m.update(1000, 11.0)
    assert m.rate == 1000.0
    m.update(1000, 12.0)  # a stalled second: half-life 1 s halves the rate
    assert m.rate == 500.0
    m.restart(1000, 12.0)
    assert m.rate is None


def test_resync_progress_rate_and_eta_from_the_resync_clock() -> None:
    now = [100.0]
    rep, _l, _r = make("blockdev 4 1 async resync_rate 4k", now)  # 1 region/s
    rep.start()
    _wait(lambda: rep.status_dict()["slinks"][1]["resync_throttled"], "the first region")
    s = rep.status_dict()["slinks"][1]
    assert s["resyncing"] and s["regions"] == REGIONS and s["regions_in_sync"] == 1
    assert s["in_sync_percent"] == round(100 / REGIONS, 1)
    # one region copied at one instant: no rate yet, so no ETA
    assert s["resync_rate_bps"] is None and s["resync_eta_seconds"] is None
    assert "ETA \u2014" in human_lines({"type": "replicator", "detail": s and
                                       {"slinks": {"1": s}}})[0]
    for k in range(2, 5):
        now[0] += 1.0
        _wait(lambda k=k: rep.status_dict()["slinks"][1]["regions_in_sync"] >= k
              and rep.status_dict()["slinks"][1]["resync_throttled"], "one more region")
    s = rep.status_dict()["slinks"][1]
    assert s["regions_in_sync"] == 4 and s["bytes_out_of_sync"] == (REGIONS - 4) * REGION
    rate = s["resync_rate_bps"]
    assert rate is not None and REGION <= rate <= 2 * REGION
    assert s["resync_eta_seconds"] == s["bytes_out_of_sync"] / rate
    line = human_lines({"type": "replicator", "detail": {"slinks": {"1": s}}})[0]
    assert line.startswith("  slink 1: up, async; lag 0 writes, 0 B, 0.0 s; in sync 25.0%; "
                           "resync 25.0% (")
    assert f"ETA {human_duration(s['resync_eta_seconds'])})" in line
    rep.message(["slink", "message", "1", "resync_rate", "0"])
    assert rep.wait_drained(20)
    s = rep.status_dict()["slinks"][1]
    assert s["in_sync_percent"] == 100.0 and s["resync_eta_seconds"] is None
    rep.close()


def test_device_line_and_dict_count_writes_queued_for_a_down_site_link() -> None:
    now = [0.0]
    rep, _l, remote = make("blockdev 2 1 async", now, dlog="nosync")
    rep.start()
    dev = rep.devices[0]
    assert dev.status() == f"rep 0 A,- A,{REGIONS}/{REGIONS}"
    remote.fail_writes = True
    for i in range(3):  # regions 0 and 1: three writes
        dev.write(i * 2048, b"\x11" * 2048)
    _wait(lambda: rep.status_dict()["slinks"][1]["state"] == "down"
          and rep.status_dict()["slinks"][0]["lag_writes"] == 0,
          "the site link to fail and the local copies")
    s = rep.status_dict()["slinks"][1]
    assert s["lag_writes"] == 3 and s["lag_bytes"] == 3 * 2048 and s["lag_seconds"] >= 0
    assert s["regions_in_sync"] == REGIONS - 2
    # the device line no longer says every region is in sync
    assert dev.status() == f"rep 0 A,- W,{REGIONS - 2}/{REGIONS}"
    d = dev.status_dict()
    leg = d["slinks"][1]
    assert (leg["queued_writes"], leg["queued_bytes"]) == (3, 3 * 2048)
    assert (leg["regions"], leg["regions_in_sync"]) == (REGIONS, REGIONS - 2)
    assert d["slinks"][0]["queued_writes"] == 0
    lines = human_lines({"type": "replicator-dev",
                         "detail": [{"slinks": {str(k): v for k, v in d["slinks"].items()}}]})
    assert lines == [f"  slink 1: down (device error W); queued 3 writes, 6.0 KiB; in sync "
                     f"{100 * (REGIONS - 2) / REGIONS:.1f}% ({REGIONS - 2}/{REGIONS} regions)"]
    remote.fail_writes = False
    assert rep.wait_drained(20)
    assert dev.status() == f"rep 0 A,- A,{REGIONS}/{REGIONS}"
    rep.close()


def test_human_units() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(int(1.8 * 1024 * 1024)) == "1.8 MiB"
    assert human_duration(70) == "0:01:10" and human_duration(None) == "\u2014"


def test_what_a_device_has_queued_is_kept_as_writes_are_logged_applied_and_added() -> None:
    """The queue a status shows is kept as writes come and go, not walked at each
    status: it must match the writes not yet applied at every point, for every
    device, across a device added meanwhile."""
    now = [0.0]
    rep, _l, remote = make("blockdev 2 1 async", now, dlog="nosync")
    stores_l1 = FakeStore(DEV, name="l1")
    stores_r1 = FakeStore(DEV, name="r1")
    opener = rep.opener

    def open_more(path: str):  # type: ignore[no-untyped-def]
        return {"l1": stores_l1, "r1": stores_r1}.get(path) or opener(path)

    rep.opener = open_more
    rep.start()
    rng = random.Random(7)
    logged: list[tuple[int, int, int]] = []   # (device, offset, length) in log order

    def write(dev_nr: int) -> None:
        offset = rng.randrange(DEV // 512 - 8) * 512
        length = rng.choice((512, 2048, 4096))
        rep.devices[dev_nr].write(offset, rng.randbytes(length))
        logged.append((dev_nr, offset, length))

    def check() -> None:
        applied = rep.status_dict()["slinks"][1]["applied_seq"]
        for dev_nr, dev in rep.devices.items():
            mine = [(o, n) for d, o, n in logged[applied:] if d == dev_nr]
            regions = {r for o, n in mine for r in range(o // REGION, (o + n - 1) // REGION + 1)}
            leg = dev.status_dict()["slinks"][1]
            assert (leg["queued_writes"], leg["queued_bytes"]) == \
                (len(mine), sum(n for _o, n in mine)), (dev_nr, applied)
            assert leg["regions_in_sync"] == REGIONS - len(regions), (dev_nr, applied)

    check()                        # (counted from here on)
    remote.gate.clear()            # the site link's copies wait
    for _ in range(40):
        write(0)
    check()
    passed = [0]

    def let_some_through(_offset: int) -> None:
        passed[0] += 1
        if passed[0] == 25:
            remote.gate.clear()

    remote.before_write = let_some_through
    remote.gate.set()
    _wait(lambda: passed[0] >= 25 and remote.in_flight >= 1, "some copies, then a wait")
    check()
    rep.add_device(f"1 {DEV // 512} replicator-dev rep 1 0 1 l1 nolog 0 "
                   "1 1 r1 core 2 8 nosync")
    for i in range(30):
        write(i % 2)
    check()
    remote.before_write = None
    remote.gate.set()
    assert rep.wait_drained(20)
    check()
    rep.close()
