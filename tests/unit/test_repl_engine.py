"""The engine's state machines: ack policies, fall-behind, failures, messages, status."""

from __future__ import annotations

import functools
import re
import threading
import time

import pytest

from dmrepl.errors import UserError
from dmrepl.replicator import (
    DeviceBusy,
    LocalIOError,
    MessageError,
    Replicator,
    ReplicatorClosed,
    TableError,
    parse_replicator,
)
from dmrepl.replicator.engine import ReplicatedDevice
from dmrepl_testing.replicator import FakeStore, StoreSet, run_with_deadline, wait_for

DEV = 256 << 10


wait_for = functools.partial(wait_for, timeout=10.0)  # in-process engine: short


class Env:
    def __init__(self, slinks: str = "blockdev 2 0 async blockdev 2 1 async",
                 remotes: tuple[int, ...] = (1,), n_dev: int = 1, **tuning) -> None:
        self.stores = StoreSet()
        self.stores.add(FakeStore(8 << 20, name="log"))
        for d in range(4):
            self.stores.add(FakeStore(DEV, name=f"l{d}"))
            for nr in range(1, 4):
                self.stores.add(FakeStore(DEV, name=f"r{nr}_{d}"))
        self.stores.add(FakeStore(DEV // 2, name="small"))
        tuning.setdefault("retry_interval", 0.01)
        tuning.setdefault("persist_interval", 0.01)
        self.line = f"0 1 replicator ringbuffer 4 log 0 create 8192 {slinks}"
        self.rep = Replicator.from_table(self.line, opener=self.stores.open, **tuning)
        self.devs = [self.rep.add_device(self.dev_line(d, remotes)) for d in range(n_dev)]

    @staticmethod
    def dev_line(d: int, remotes: tuple[int, ...], dlog: str = "core 2 8 nosync") -> str:
        legs = " ".join(f"{nr} 1 r{nr}_{d} {dlog}" for nr in remotes)
        return f"0 {DEV // 512} replicator-dev rep {d} 0 1 l{d} nolog 0 {legs}".strip()

    def s(self, name: str) -> FakeStore:
        return self.stores.stores[name]

    def slink(self, nr: int) -> dict:
        return self.rep.status_dict()["slinks"][nr]


@pytest.fixture
def env():
    envs: list[Env] = []

    def make(*a, **kw) -> Env:
        e = Env(*a, **kw)
        envs.append(e)
        return e

    yield make
    for e in envs:
        e.rep.close()


def test_reads_return_newest_data_from_the_log_before_copies(env) -> None:
    e = env()
    dev = e.devs[0]
    dev.write(4096, b"A" * 8192)
    dev.write(8192, b"B" * 512)
    assert e.s("l0").snapshot()[4096:12288] == bytes(8192)  # not started: no copies
    assert dev.read(4096, 8192) == b"A" * 4096 + b"B" * 512 + b"A" * 3584
    assert dev.read(0, 4096) == bytes(4096)
    e.rep.start()
    assert e.rep.wait_drained(10)
    assert e.s("l0").snapshot()[4096:12288] == b"A" * 4096 + b"B" * 512 + b"A" * 3584
    assert e.s("r1_0").snapshot() == e.s("l0").snapshot()


def test_io_alignment_and_bounds(env) -> None:
    dev = env().devs[0]
    for off, n in ((1, 512), (0, 100), (DEV, 512), (DEV - 512, 1024)):
        with pytest.raises(UserError):
            dev.write(off, b"x" * n)
    with pytest.raises(UserError):
        dev.read(0, 3)


def test_trim_is_a_replicated_zero_write(env) -> None:
    e = env()
    dev = e.devs[0]
    e.rep.start()
    dev.write(0, b"x" * 65536)
    dev.trim(4096, 8192)
    assert dev.read(0, 16384) == b"x" * 4096 + bytes(8192) + b"x" * 4096
    assert e.rep.wait_drained(10)
    assert e.s("r1_0").snapshot()[:16384] == b"x" * 4096 + bytes(8192) + b"x" * 4096


def test_sync_slink_holds_the_ack_until_its_copy_is_durable(env) -> None:
    e = env("blockdev 2 0 async blockdev 2 1 sync")
    e.rep.start()
    remote = e.s("r1_0")
    remote.gate.clear()
    done = threading.Event()
    t = threading.Thread(target=lambda: (e.devs[0].write(0, b"s" * 4096), done.set()))
    t.start()
    wait_for(lambda: e.slink(0)["applied_seq"] >= 1, "local copy")
    assert not done.is_set()
    remote.gate.set()
    assert done.wait(10)
    assert e.slink(1)["durable_seq"] >= 1
    assert remote.snapshot()[:4096] == b"s" * 4096


def test_async_falls_behind_up_to_its_threshold_then_forced_sync(env) -> None:
    e = env("blockdev 2 0 async blockdev 4 1 async ios 2")
    events = e.rep.events.subscribe()
    e.rep.start()
    remote = e.s("r1_0")
    remote.gate.clear()
    dev = e.devs[0]
    dev.write(0, b"1" * 512)
    dev.write(512, b"2" * 512)  # 2 outstanding: still async
    assert e.rep.status().split()[1].startswith("A,")
    done = threading.Event()
    t = threading.Thread(target=lambda: (dev.write(1024, b"3" * 512), done.set()))
    t.start()
    wait_for(lambda: e.slink(1)["forced_sync"], "forced sync")
    assert e.rep.status().split()[1].startswith("S,3,")
    assert not done.is_set()
    ev = e.rep.event_nr
    remote.gate.set()
    assert done.wait(10)
    wait_for(lambda: not e.slink(1)["forced_sync"], "release of forced sync")
    assert e.rep.wait_event(ev, 1) > ev
    assert any("releasing fallbehind sync" in n for n in e.rep.status_dict()["notes"])
    changes = [(x["event"], x["slink"]) for x in events.read(0) or []
               if x["event"].startswith("forced-sync")]
    assert changes == [("forced-sync-on", 1), ("forced-sync-off", 1)]


def test_size_and_timeout_thresholds(env) -> None:
    e = env("blockdev 2 0 async blockdev 4 1 async size 1k")
    e.rep.start()
    e.s("r1_0").gate.clear()
    e.devs[0].write(0, b"a" * 1024)  # 2 sectors == threshold: async
    assert not e.slink(1)["forced_sync"]
    t = threading.Thread(target=e.devs[0].write, args=(1024, b"b" * 512))
    t.start()
    wait_for(lambda: e.slink(1)["forced_sync"], "size threshold")
    e.rep.message(["slink", "message", "1", "fallbehind", "timeout", "1s"])
    e.s("r1_0").gate.set()
    t.join(10)
    assert e.rep.status("table").endswith("blockdev 4 1 async timeout 1s")


def test_local_failure_fails_the_write_when_local_is_sync(env) -> None:
    e = env("blockdev 2 0 sync blockdev 2 1 async")
    e.rep.start()
    e.devs[0].write(0, b"ok" * 256)
    e.s("l0").fail_writes = e.s("l0").fail_reads = True
    with pytest.raises(LocalIOError):
        e.devs[0].write(512, b"x" * 512)
    with pytest.raises(LocalIOError):  # failed device: refused up front
        e.devs[0].write(1024, b"y" * 512)
    assert e.slink(0)["state"] == "down"
    e.s("l0").fail_writes = e.s("l0").fail_reads = False
    wait_for(lambda: e.slink(0)["state"] == "up", "local retry")
    e.devs[0].write(1024, b"z" * 512)
    assert e.rep.wait_drained(10)
    assert e.s("l0").snapshot()[512:1536] == b"x" * 512 + b"z" * 512


def test_remote_failure_takes_slink_down_and_it_comes_back(env) -> None:
    e = env(retry_interval=0.05)
    e.rep.start()
    e.s("r1_0").fail_writes = e.s("r1_0").fail_reads = True
    ev = e.rep.event_nr
    e.devs[0].write(0, b"q" * 4096)  # async: acknowledged although the remote fails
    wait_for(lambda: e.slink(1)["state"] == "down", "slink down")
    assert e.rep.wait_event(ev, 1) > ev
    assert re.search(r"\b1:down\b", e.rep.status())
    assert e.devs[0].status().split()[3].startswith("W,")
    e.s("r1_0").fail_writes = e.s("r1_0").fail_reads = False
    assert e.rep.wait_drained(10)
    assert e.s("r1_0").snapshot()[:4096] == b"q" * 4096
    assert e.slink(1)["failures"] >= 1


def test_status_formats(env) -> None:
    e = env("blockdev 2 0 async blockdev 4 1 async ios 100", n_dev=2)
    e.rep.start()
    e.devs[1].write(0, b"x" * 4096)
    assert e.rep.wait_drained(10)
    info = e.rep.status()
    assert re.fullmatch(r"[AS],\d+,\d+ [AS],\d+,\d+ \d+/\d+/8192 0:up 1:up", info), info
    e.rep.message(["statistics", "on"])
    assert re.match(r"v=\S+ r=\d+ w=1 rs=\d+ ws=1 nc=\d+ c=\d+ A,", e.rep.status())
    e.rep.message(["statistics", "reset"])
    assert " w=0 " in e.rep.status()
    e.rep.message(["statistics", "off"])
    assert not e.rep.status().startswith("v=")
    assert e.devs[1].status() == "rep 1 A,- A,64/64"
    assert e.devs[1].table() == "rep 1 0 1 l1 nolog 0 1 1 r1_1 core 2 8 nosync"
    assert e.devs[1].status("table") == e.devs[1].table()
    d = e.rep.status_dict()
    assert d["slinks"][1]["policy"] == "async" and d["slinks"][1]["consistent"]
    assert d["devices"][1]["legs"][1]["in_sync"] == 64
    with pytest.raises(UserError):
        e.rep.status("bogus")


def test_table_status_parses_back(env) -> None:
    e = env("blockdev 2 0 async blockdev 2 1 async+stall")
    e.rep.message(["slink", "add", "blockdev", "4", "2", "async", "timeout", "90s"])
    e.rep.message(["slink", "message", "1", "policy", "sync+stall"])
    table = e.rep.status("table")
    cfg = parse_replicator(table)
    mine = e.rep.table_config()
    assert (cfg.replog, cfg.slinks) == (mine.replog, mine.slinks)
    assert [s.policy for s in cfg.slinks] == ["async", "sync+stall", "async"]
    assert table.endswith("blockdev 4 2 async timeout 90s")


INVALID_MESSAGES = [
    [], ["bogus"], ["start", "now"], ["stop", "all", "x"], ["statistics"],
    ["statistics", "maybe"], ["slink"], ["slink", "add"], ["slink", "add", "blockdev", "1", "0"],
    ["slink", "add", "blockdev", "1", "1"], ["slink", "add", "blockdev", "2", "3", "fast"],
    ["slink", "del", "0"], ["slink", "del", "1"], ["slink", "del", "7"], ["slink", "del", "x"],
    ["slink", "message", "1", "policy", "sync+async"], ["slink", "message", "9", "policy", "sync"],
    ["slink", "message", "1", "fallbehind", "ios"], ["slink", "message", "1", "speed", "1"],
    ["slink", "frob", "1"], ["replog"], ["replog", "resize", "10"], ["replog", "resize", "x"],
    ["replog", "statistics", "maybe"],
]


@pytest.mark.parametrize("argv", INVALID_MESSAGES, ids=lambda a: " ".join(a) or "empty")
def test_invalid_replicator_messages_change_nothing(env, argv: list[str]) -> None:
    e = env("blockdev 2 0 async blockdev 4 1 async ios 5")
    before = (e.rep.status("table"), e.rep.running, e.devs[0].table())
    with pytest.raises(MessageError):
        e.rep.message(argv)
    assert (e.rep.status("table"), e.rep.running, e.devs[0].table()) == before


def test_replicator_messages(env) -> None:
    e = env("blockdev 2 0 async blockdev 2 1 async")
    e.rep.message(["start"])
    assert e.rep.running
    e.rep.message(["stop", "all"])
    assert not e.rep.running and not e.devs[0].running
    e.rep.message(["resume", "all"])
    assert e.rep.running and e.devs[0].running
    e.rep.message(["postsuspend"])
    e.rep.message(["start"])
    e.rep.message(["slink", "add", "blockdev", "2", "3", "sync"])
    assert 3 in e.rep.status_dict()["slinks"]
    e.rep.message(["slink", "message", "3", "policy", "async"])
    e.rep.message(["slink", "message", "3", "fallbehind", "ios=7"])
    assert "blockdev 4 3 async ios 7" in e.rep.status("table")
    e.rep.message(["slink", "del", "3"])
    assert 3 not in e.rep.status_dict()["slinks"]
    e.rep.message(["replog", "resize", "16000"])
    assert e.rep.status_dict()["ring"]["log_size_sectors"] == 16000
    assert "open 16000" in e.rep.status("table") or "create 16000" in e.rep.status("table")
    e.rep.message(["replog", "statistics", "on"])
    assert e.rep.status().startswith("v=")


def test_device_messages(env) -> None:
    e = env(slinks="blockdev 2 0 async blockdev 2 1 async blockdev 2 2 async")
    dev = e.devs[0]
    e.rep.start()
    dev.write(0, b"d" * 4096)
    dev.message(["device", "add", "rep", "0", "2", "1", "r2_0", "core", "2", "8", "sync"])
    assert "2 1 r2_0 core 2 8 sync" in dev.table()
    assert e.rep.wait_drained(10)
    assert e.s("r2_0").snapshot() == e.s("l0").snapshot()  # initial resync
    dev.message(["device", "del", "2"])
    assert "r2_0" not in dev.table()
    for bad in (["device"], ["device", "del", "0"], ["device", "del", "2"],
                ["device", "add", "rep", "5", "2", "1", "r2_0", "core", "1", "8"],
                ["device", "add", "rep", "0", "1", "1", "r1_1", "core", "1", "8"],
                ["device", "add", "rep", "0", "3", "1", "r3_0", "core", "1", "16"],
                ["device", "frob"], ["jump"], ["stop", "now"]):
        before = dev.table()
        with pytest.raises(MessageError):
            dev.message(bad)
        assert dev.table() == before
    dev.message(["stop"])
    blocked = threading.Event()
    t = threading.Thread(target=lambda: (dev.write(0, b"w" * 512), blocked.set()))
    t.start()
    assert not blocked.wait(0.05)  # a suspended device holds I/O
    dev.message(["resume"])
    assert blocked.wait(10)


BAD_DEVICES = [
    ("0 512 replicator-dev rep 1 1 1 r1_1 core 2 8 nosync", "local device"),
    ("0 512 replicator-dev rep 1 0 1 l1 nolog 0 5 1 r1_1 core 1 8", "site link 5 is not"),
    ("0 512 replicator-dev rep 1 0 1 l1 nolog 0 1 1 r1_1 core 1 16", "region size"),
    ("0 512 replicator-dev rep 1 0 1 l1 nolog 0 1 1 r1_0 core 1 8", "already used"),
    ("0 512 replicator-dev rep 0 0 1 l1 nolog 0", "already in use"),
    ("0 512 replicator-dev rep 1 0 1 l1 nolog 0 1 1 small core 1 8", "smaller"),
    ("0 512 replicator-dev rep 1 0 1 nodev nolog 0", "cannot open"),
    ("0 99999 replicator-dev rep 1 0 1 l1 nolog 0", "exceeds local device"),
]


@pytest.mark.parametrize(("line", "msg"), BAD_DEVICES)
def test_bad_devices_are_refused(env, line: str, msg: str) -> None:
    e = env()
    with pytest.raises(TableError) as ei:
        e.rep.add_device(line)
    assert msg in str(ei.value), str(ei.value)
    assert set(e.rep.status_dict()["devices"]) == {0}


def test_remove_device_and_closed_errors(env) -> None:
    e = env(n_dev=2)
    e.devs[1].write(0, b"r" * 512)
    with pytest.raises(DeviceBusy, match="not yet copied"):
        e.rep.remove_device(1)
    e.rep.start()
    assert e.rep.wait_drained(10)
    e.rep.remove_device(1)
    with pytest.raises(ReplicatorClosed):
        e.devs[1].write(0, b"x" * 512)
    with pytest.raises(UserError):
        e.rep.remove_device(1)
    e.rep.close()
    with pytest.raises(ReplicatorClosed):
        e.rep.message(["start"])


def test_log_in_use_and_reopen_replays(env) -> None:
    e = env()
    with pytest.raises(TableError, match="already active"):
        Replicator.from_table(e.line, opener=e.stores.open)
    e.devs[0].write(0, b"p" * 4096)  # never copied: not started
    e.rep.close()
    rep2 = Replicator.from_table(e.line.replace("create", "open"), opener=e.stores.open)
    try:
        assert rep2.status_dict()["ring"]["replayed_at_open"] == 1
        dev = rep2.add_device(Env.dev_line(0, (1,)))
        assert dev.read(0, 4096) == b"p" * 4096
        rep2.start()
        assert rep2.wait_drained(10)
        assert e.s("r1_0").snapshot()[:4096] == b"p" * 4096
    finally:
        rep2.close()


def test_write_cache_mode_and_flush(env) -> None:
    e = env(durable_acks=False)
    e.rep.start()
    e.devs[0].write(0, b"c" * 4096)
    e.devs[0].flush()
    assert e.rep.status_dict()["ring"]["durable_seq"] >= 1
    assert e.rep.wait_drained(10)
    assert e.s("r1_0").snapshot()[:4096] == b"c" * 4096


def test_concurrent_writers_all_land(env) -> None:
    e = env(n_dev=2)
    e.rep.start()

    def writer(k: int) -> None:
        for i in range(40):
            e.devs[k % 2].write(((k * 40 + i) % 512) * 512, bytes([k]) * 512)

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert e.rep.wait_drained(10)
    for d in range(2):
        assert e.devs[d].read(0, DEV) == e.s(f"l{d}").snapshot() == e.s(f"r1_{d}").snapshot()


def _smallest_ring() -> tuple[StoreSet, Replicator, ReplicatedDevice]:
    """A started replicator on the smallest ring (4096 sectors), one device with a
    local and a remote leg (stores "l" and "r"); the caller closes it."""
    stores = StoreSet()
    for name, size in (("log", 3 << 20), ("l", 4 << 20), ("r", 4 << 20)):
        stores.add(FakeStore(size, name=name))
    rep = Replicator.from_table("ringbuffer 4 log 0 create 4096 blockdev 2 0 async "
                                "blockdev 2 1 async", opener=stores.open)
    try:
        dev = rep.add_device("rep 0 0 1 l nolog 0 1 1 r core 2 2048 nosync")
        rep.start()
    except BaseException:
        rep.close()
        raise
    return stores, rep, dev


def test_write_larger_than_the_log_is_split_and_lands() -> None:
    stores, rep, dev = _smallest_ring()
    try:
        data = bytes(range(256)) * (12 << 10)  # 3 MiB through a 2 MiB log
        dev.write(512, data)
        assert dev.read(512, len(data)) == data
        assert rep.wait_drained(10)
        assert stores.stores["r"].snapshot()[512:512 + len(data)] == data
    finally:
        rep.close()


def test_writes_split_exactly_past_a_quarter_of_the_smallest_ring() -> None:
    """Writes up to a quarter of the smallest ring skip the split computation
    (ringbuffer._NEVER_SPLIT): one entry; a sector more is two entries."""
    from dmrepl.replicator.replog import ringbuffer as engine_mod
    _stores, rep, dev = _smallest_ring()
    try:
        most = engine_mod._NEVER_SPLIT
        before = rep.ring.next_seq
        dev.write(0, b"a" * most)
        assert rep.ring.next_seq == before + 1
        dev.write(0, b"b" * (most + 512))
        assert rep.ring.next_seq == before + 3
        assert dev.read(0, most + 512) == b"b" * (most + 512)
        assert rep.wait_drained(10)
    finally:
        rep.close()


def test_reads_across_index_buckets_before_and_after_copies() -> None:
    import random as _random
    stores = StoreSet()
    for name, size in (("log", 72 << 20), ("l", 4 << 20), ("r", 4 << 20)):
        stores.add(FakeStore(size, name=name))
    rep = Replicator.from_table("ringbuffer 4 log 0 create 140000 blockdev 2 0 async "
                                "blockdev 2 1 async", opener=stores.open)
    try:
        dev = rep.add_device("rep 0 0 1 l nolog 0 1 1 r core 2 2048 nosync")
        model = bytearray(4 << 20)
        rng = _random.Random(8)
        for i in range(40):  # fits the log: no copies before start()
            n = rng.choice([1, 8, 300, 3000, 5000]) * 512
            off = rng.randrange(0, (4 << 20) - n + 1) // 512 * 512
            data = bytes([i + 1]) * n
            dev.write(off, data)
            model[off:off + n] = data
            lo = rng.randrange(0, 4 << 20, 512)
            k = min(rng.choice([512, 1 << 20, 3 << 20]), (4 << 20) - lo)
            assert dev.read(lo, k) == model[lo:lo + k]
        assert dev.read(0, 4 << 20) == model
        rep.start()
        assert rep.wait_drained(10)
        assert dev.read(0, 4 << 20) == model == stores.stores["r"].snapshot()
        assert rep.replog.pending.count(0) == 0
    finally:
        rep.close()


# -- copy coalescing: async copiers that caught up pause; nobody waits for them ------

def test_async_copier_that_caught_up_pauses_before_its_next_batch(env) -> None:
    e = env(coalesce_delay=30.0)
    e.rep.start()
    dev = e.devs[0]
    dev.write(0, b"1" * 512)
    wait_for(lambda: e.rep.slinks[1].applied == 1, "the first copy")
    for i in range(3):
        dev.write(4096 * (i + 1), b"2" * 512)
    # the copier caught up after its first batch and pauses: the new entries wait
    assert not e.rep.wait_drained(0.3)
    assert e.rep.slinks[1].applied == 1
    run_with_deadline(e.rep.close, "close", 20.0)  # the pause ends at once on close


def test_sync_site_link_is_never_held_by_coalescing(env) -> None:
    e = env("blockdev 2 0 async blockdev 2 1 sync", coalesce_delay=30.0)
    e.rep.start()
    dev = e.devs[0]

    def writes() -> None:
        for i in range(20):
            dev.write(512 * i, bytes([i]) * 512)

    run_with_deadline(writes, "writes", 20.0)
    assert e.s("r1_0").snapshot()[:512 * 20] == b"".join(bytes([i]) * 512 for i in range(20))


def test_ring_full_ends_a_coalescing_pause(env) -> None:
    """The writers fill the 4 MiB ring while the copiers would pause for 30 s: the
    space wanted wakes them (no write waits out the pause)."""
    e = env(coalesce_delay=30.0, full_grace=60.0)
    e.rep.start()
    dev = e.devs[0]
    dev.write(0, b"0" * 4096)
    wait_for(lambda: e.rep.slinks[1].applied == 1, "the first copy")

    def writes() -> None:
        for i in range(2048):  # 2048 x (4 KiB + header) > the ring
            dev.write(4096 * (i % 64), bytes([i % 251]) * 4096)

    run_with_deadline(writes, "writes", 20.0)  # < the pause: only the wake-up does it
    assert e.rep.slinks[1].drops == 0  # copied, not dropped: the pause ended


def test_behind_limit_counts_writes_not_yet_in_the_log(env) -> None:
    """What a kernel journal asks before holding its device: would a site link be
    past its limit with the journal's writes not yet logged counted too?"""
    e = env("blockdev 2 0 async blockdev 4 1 async ios 2")
    e.rep.start()
    e.s("r1_0").gate.clear()
    dev = e.devs[0]
    dev.write(0, b"1" * 512)                   # 1 outstanding
    assert not dev.behind_limit()
    assert not dev.behind_limit(ios=1)         # 2: at the limit, not past it
    assert dev.behind_limit(ios=2)
    e.rep.message(["slink", "message", "1", "fallbehind", "size", "1k"])
    assert not dev.behind_limit(nbytes=512) and dev.behind_limit(nbytes=1024)
    e.rep.message(["slink", "message", "1", "fallbehind", "timeout", "30s"])
    assert not dev.behind_limit(since=time.monotonic())
    assert dev.behind_limit(since=time.monotonic() - 60)
    e.rep.message(["slink", "message", "1", "fallbehind", "ios", "0"])
    assert not dev.behind_limit(ios=10 ** 6)   # no limit: never behind
    e.s("r1_0").gate.set()
