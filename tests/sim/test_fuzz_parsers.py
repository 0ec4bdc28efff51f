"""Slow tier: 100,000+ generated inputs for each parser (table lines, replication-log
images, dirty-log images).  Run with ``-m slow``; each run prints its seed and counts.

Invariants: only the documented error types escape (a bad table is a TableError /
UserError naming the argument; a damaged log is ReplogCorrupt); ``auto`` never
re-creates a log that ``open`` refuses as damaged; a dirty log loads any image.
"""

from __future__ import annotations

import errno

import pytest
from fuzzgen import Finding, Gen, run_cases

from dmrepl.dirtylog import MemoryStorage, open_dirty_log, parse_dirty_log_args
from dmrepl.dm.table import Table, TableError
from dmrepl.errors import UserError
from dmrepl.replicator import Replicator, ondisk
from dmrepl.replicator.errors import ReplogCorrupt
from dmrepl.replicator.errors import TableError as ReplicatorTableError
from dmrepl.replicator.ringlog import RingLog
from dmrepl.replicator.table import LOG_SIZE_MIN, parse_device, parse_replicator, parse_replog
from dmrepl_testing.replicator import FakeStore, StoreSet

pytestmark = pytest.mark.slow

CASES = int(__import__("os").environ.get("FUZZ_CASES", 100_000))

REPLICATOR_LINES = (
    "0 1 replicator ringbuffer 4 log 0 create 4096 blockdev 2 0 async "
    "blockdev 4 1 async ios 20 blockdev 2 2 sync",
    "0 1 replicator ringbuffer 2 /dev/log 0 blockdev 1 0 blockdev 3 1 async size 1m",
    "ringbuffer 3 253:4 8 auto blockdev 2 0 sync blockdev 6 1 async timeout 10s "
    "resync_rate 4m",
    "0 1 replicator ringbuffer 4 log 0 open 8192 blockdev 2 0 async",
)
DEVICE_LINES = (
    "0 128 replicator-dev rep 0 0 1 l0 nolog 0 1 1 r1_0 core 2 8 nosync "
    "2 1 r2_0 core 2 8 nosync",
    "0 2048 replicator-dev 253:1 3 0 1 /dev/sda nolog 0 1 1 /dev/sdb disk 3 253:9 64 sync",
    "rep 1 0 1 l1 nolog 0 1 1 r1_1 core 1 16",
)
MIRROR_LINES = (
    "0 2048 mirror core 2 64 nosync 2 /dev/a 0 /dev/b 0",
    "0 2048 mirror userspace 4 UUID-1 clustered-disk 253:3 64 2 253:1 0 253:2 0 1 "
    "handle_errors",
    "0 4096 mirror disk 3 /dev/log 128 sync 3 /dev/a 0 /dev/b 0 /dev/c 0",
)
LOG_ARGS = (("core", ["64"]), ("core", ["2", "nosync"]), ("disk", ["/dev/l", "64"]),
            ("disk", ["253:3", "128", "sync"]), ("clustered-core", ["8", "sync"]),
            ("clustered-disk", ["/dev/x", "1024", "nosync"]))


def _line(gen: Gen, samples: tuple[str, ...]) -> str:
    words = gen.choice(samples).split()
    if gen.random() < 0.9:
        words = gen.mutate_words(words)
    text = " ".join(words)
    if gen.random() < 0.1:  # character-level damage
        raw = gen.mutate_bytes(text.encode("utf-8", "surrogateescape"), 2)
        text = raw.decode("utf-8", "surrogateescape")  # as argv and files are decoded
    return text


def table_case(gen: Gen, i: int) -> None:
    kind = i % 4
    if kind == 0:
        text = _line(gen, REPLICATOR_LINES)
        gen.current = f"parse_replicator({text!r})"
        try:
            cfg = parse_replicator(text)
        except ReplicatorTableError:
            return
        # what was accepted reads back the same
        if parse_replicator(cfg.line()).params() != cfg.params():
            raise Finding("replicator line does not read back", cfg.line())
    elif kind == 1:
        text = _line(gen, DEVICE_LINES)
        gen.current = f"parse_device({text!r})"
        try:
            parse_device(text)
        except ReplicatorTableError:
            return
    elif kind == 2:
        text = "\n".join(_line(gen, MIRROR_LINES + REPLICATOR_LINES)
                         for _ in range(gen.randrange(1, 4)))
        gen.current = f"Table.parse({text!r})"
        try:
            table = Table.parse(text)
        except TableError:
            return
        if Table.parse(table.format()) != table:
            raise Finding("table does not read back", table.format())
    else:
        type_name, args = gen.choice(LOG_ARGS)
        if gen.random() < 0.2:
            type_name = gen.word()
        args = gen.mutate_words(args) if gen.random() < 0.9 else list(args)
        target = int(gen.choice(("1", "2048", "1", str(2**63), "0", "-5", "64")))
        gen.current = f"parse_dirty_log_args({type_name!r}, {args!r}, {target})"
        try:
            parse_dirty_log_args(type_name, args, target)
        except UserError:
            return


def test_fuzz_table_lines() -> None:
    run_cases("table lines", CASES, 1001, table_case)


# -- replication-log images ---------------------------------------------------

RING_SECTORS = LOG_SIZE_MIN
DEV = 64 << 10


def _ring_image() -> bytes:
    """A log holding live entries: the one remote fails, so nothing is released."""
    stores = StoreSet()
    log = stores.add(FakeStore((RING_SECTORS + 8) * 512, name="log"))
    stores.add(FakeStore(DEV, name="l0"))
    remote = stores.add(FakeStore(DEV, name="r0"))
    remote.fail_writes = True
    rep = Replicator.from_table(f"0 1 replicator ringbuffer 4 log 0 create {RING_SECTORS} "
                                "blockdev 2 0 async blockdev 4 1 async ios 1000",
                                opener=stores.open, retry_interval=3600)
    dev = rep.add_device(f"0 {DEV // 512} replicator-dev rep 0 0 1 l0 nolog 0 "
                         "1 1 r0 core 2 8 nosync")
    rep.start()
    for k in range(12):
        dev.write(k * 4096 % DEV, bytes([k + 1]) * (512 * (1 + k % 9)))
    image = log.snapshot()
    remote.fail_writes = False
    rep.close()
    return image


class SparseStore:
    """A log device of ``size`` bytes holding ``head`` and zeros after it: the fuzzed
    images differ only in their first bytes, and a full copy of a 2 MiB log per case
    would cost more than the case."""

    concurrent_writes = False

    def __init__(self, size: int, head: bytes) -> None:
        self.size = size
        self.data = bytearray(head[:size])

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"I/O at {offset}+{length} beyond {self.size}")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        chunk = bytes(self.data[offset:offset + length])
        return chunk + bytes(length - len(chunk))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        if offset + len(data) > len(self.data):
            self.data.extend(bytes(offset + len(data) - len(self.data)))
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def ring_case_factory() -> object:
    image = _ring_image()
    used = max(i for i in range(len(image)) if image[i]) + 1  # mutate what is written

    def case(gen: Gen, i: int) -> None:
        head = image[:used]
        if gen.random() < 0.7:
            # mostly the headers (first 12 KiB) and the first entries
            region = gen.choice((4096, 12288, used))
            head = gen.mutate_bytes(head[:region], gen.choice((1, 1, 2, 4))) + head[region:]
        else:
            head = gen.mutate_bytes(head, 8)
        size = gen.choice((len(head), ondisk.RING_OFFSET, len(image) // 2)) \
            if gen.random() < 0.1 else len(image)
        gen.current = (f"ring image of {size} bytes: the valid image with "
                       f"{_diff(image[:len(head)], head)}")
        outcomes = {}
        for mode in ("open", "auto"):
            ring = RingLog(SparseStore(size, head),  # type: ignore[arg-type]
                           parse_replog(["log", "0", mode, str(RING_SECTORS)]))
            try:
                ring.open()
            except (ReplogCorrupt, ReplicatorTableError) as e:
                outcomes[mode] = f"refused: {e}"
                continue
            outcomes[mode] = "created" if ring.created else f"opened {ring.replayed} entries"
            ring.close()
            if mode == "open":
                return  # auto opens what open opens
        if outcomes["auto"] == "created" and _signed(head):
            raise Finding("auto re-created a damaged log that open refused",
                          f"open {outcomes['open'][:200]}")

    return case


# our signatures, from the declarations: a device holding either holds a log of ours
SIGNATURES = (ondisk.LogHeaderBody.magic.subcon.value, ondisk.RingHeaderBody.magic.subcon.value)


def _signed(data: bytes) -> bool:
    return any(sig in data[:ondisk.RING_OFFSET] for sig in SIGNATURES)


def _diff(a: bytes, b: bytes, block: int = 256) -> str:
    """Where b differs from a (a short reproducer of a mutation): equal blocks are
    skipped whole, so a megabyte image costs microseconds."""
    out: list[str] = []
    n = min(len(a), len(b))
    for base in range(0, n, block):
        if a[base:base + block] == b[base:base + block]:
            continue
        for k in range(base, min(base + block, n)):
            if a[k] != b[k]:
                out.append(f"{k}:{a[k]:02x}->{b[k]:02x}")
        if len(out) >= 12:
            out[12:] = ["..."]
            break
    if len(a) != len(b):
        out.append(f"len {len(a)}->{len(b)}")
    return " ".join(out)


def test_fuzz_ring_images() -> None:
    run_cases("ring images", CASES, 1002, ring_case_factory())  # type: ignore[arg-type]


# -- dirty-log images -----------------------------------------------------------

REGIONS_ARGS = ("mem", "8")  # 8-sector regions
TARGET = 8 * 5000  # 5000 regions: a bitmap of two sectors


def _dirty_image() -> bytes:
    storage = MemoryStorage(64 << 10)
    dlog = open_dirty_log("disk", list(REGIONS_ARGS), TARGET, storage=storage)
    dlog.resume()
    for r in range(0, 5000, 37):
        dlog.set_region_sync(r, False)
    for r in range(0, 5000, 11):
        dlog.mark_region(r)
    dlog.flush()
    dlog.postsuspend()
    return bytes(storage.durable)


def dirty_case_factory() -> object:
    image = _dirty_image()
    used = 2048

    def case(gen: Gen, i: int) -> None:
        head = gen.mutate_bytes(image[:used], gen.choice((1, 2, 4, 8)))
        if gen.random() < 0.1:
            head = head[:gen.randrange(len(head) + 1)]  # a short device
            size = max(len(head), 512)
        else:
            size = len(image)
            head = head[:used] + image[len(head):] if len(head) <= used else head
        gen.current = f"dirty-log image, size {size}, diff {_diff(image[:len(head)], head)}"
        storage = MemoryStorage(size, data=head[:size])
        try:
            dlog = open_dirty_log("disk", list(REGIONS_ARGS), TARGET, storage=storage)
        except UserError:  # the device is too small for the log: refused
            return
        dlog.resume()
        count = dlog.get_sync_count()
        if not 0 <= count <= 5000:
            raise Finding("sync count out of range", str(count))
        dlog.mark_region(4999)
        dlog.flush()
        dlog.status_info()
        dlog.status_table()
        dlog.close()

    return case


def test_fuzz_dirty_log_images() -> None:
    run_cases("dirty-log images", CASES, 1003, dirty_case_factory())  # type: ignore[arg-type]
