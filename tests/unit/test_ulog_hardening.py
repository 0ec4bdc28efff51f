"""ulogd refuses bad requests whole and stays bounded (issue 10, items 5 and 6).

* A MARK_REGION, CLEAR_REGION or FLUSH naming one region out of range is answered
  -EINVAL and changes no region, on the in-place fast path and the typed path.
* A CTR beyond the limits (regions a log, logs, bitmap memory) is refused with
  -ENOMEM and a log line naming the option, before anything is allocated.
"""

from __future__ import annotations

import errno
import struct
import tracemalloc
from collections.abc import Sequence
from typing import Any

import pytest

from dmrepl.dirtylog import MemoryStorage, open_dirty_log, parse_dirty_log_args
from dmrepl_testing.ulogd import s64
from ulogd import protocol as p
from ulogd.protocol import RequestType as RT
from ulogd.server import Dispatcher, LogLimits

U = b"HARDEN-UUID"


def memory_factory(type_name: str, args: Sequence[str], target_sectors: int) -> Any:
    """Real logs; disk logs on a memory device."""
    cfg = parse_dirty_log_args(type_name, args, target_sectors)
    storage = MemoryStorage(1 << 20) if cfg.type_name == "disk" else None
    return open_dirty_log(type_name, args, target_sectors, storage=storage)


class Client:
    """Requests through Dispatcher.handle_into (falling back to handle_batch), like
    the serving loop."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        self.seq = 0

    def request(self, luid: int, rtype: int, payload: bytes = b"", uuid: bytes = U) -> p.Reply:
        self.seq += 1
        data = p.encode_request(self.seq, luid, uuid, rtype, payload)
        buf = bytearray(data)
        n = self.d.handle_into(buf, len(data), 0)
        if n >= 0:
            return p.decode_reply(bytes(buf[:n]))
        [reply] = self.d.handle_batch([data])
        return p.decode_reply(reply)

    def regions(self, luid: int, rtype: int, regions: list[int]) -> p.Reply:
        return self.request(luid, rtype, struct.pack(f"={len(regions)}Q", *regions))

    def clean(self, luid: int, region: int) -> bool:
        reply = self.request(luid, RT.IS_CLEAN, p.encode_u64(region))
        assert reply.error == 0
        return bool(s64(reply.data))


LOG_TABLES = ["64 clustered-core 2", "64 clustered-disk mem 2 nosync", "64 core 2 nosync"]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "typed"])
@pytest.mark.parametrize("table", LOG_TABLES)
def test_region_list_with_one_bad_region_changes_nothing(fast_path: bool, table: str) -> None:
    c = Client(Dispatcher(memory_factory, fast_path=fast_path))
    assert c.request(1, RT.CTR, table.encode()).error == 0
    assert c.request(1, RT.RESUME).error == 0  # 32 regions, all clean
    for rtype in (RT.MARK_REGION, RT.FLUSH):
        assert c.regions(1, rtype, [1, 2, 32, 3]).error == -errno.EINVAL
        assert c.regions(1, rtype, [4, 1 << 63]).error == -errno.EINVAL
        assert all(c.clean(1, r) for r in range(32)), RT(rtype).name
    assert c.regions(1, RT.MARK_REGION, [5, 6]).error == 0
    assert c.request(1, RT.FLUSH).error == 0
    assert c.regions(1, RT.CLEAR_REGION, [5, 6, 40]).error == -errno.EINVAL
    assert not c.clean(1, 5) and not c.clean(1, 6)
    assert c.regions(1, RT.CLEAR_REGION, [5, 6]).error == 0
    assert c.clean(1, 5) and c.clean(1, 6)


@pytest.mark.parametrize("type_name, args", [("core", ["2"]), ("disk", ["mem", "2", "nosync"])])
def test_dirty_log_region_lists_are_all_or_nothing(type_name: str, args: list[str]) -> None:
    """The same rule for the replicator engine's use of the one dirty-log code."""
    log = memory_factory(type_name, args, 128)
    log.resume()
    with pytest.raises(IndexError):
        log.mark_regions([0, 1, 64])
    assert log.counts().clean_count == 64
    log.mark_regions(iter([0, 1]))
    with pytest.raises(IndexError):
        log.clear_regions(iter([0, -1]))
    assert log.counts().clean_count == 62


def test_huge_ctr_is_refused_clearly_without_allocating(caplog: pytest.LogCaptureFixture) -> None:
    """4 TiB in 2-sector regions (2**32 regions): before, 1.5 GiB and seconds."""
    c = Client(Dispatcher(memory_factory))
    tracemalloc.start()
    try:
        reply = c.request(1, RT.CTR, b"8589934592 clustered-core 2")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.error == -errno.ENOMEM
    assert peak < 1 << 20
    assert "--max-regions" in caplog.text and "4294967296 regions" in caplog.text
    assert c.request(1, RT.STATUS_INFO).error == -errno.ESRCH  # nothing was constructed


def test_log_count_and_bitmap_memory_limits(caplog: pytest.LogCaptureFixture) -> None:
    limits = LogLimits(max_logs=2, max_regions=1 << 20, max_bitmap_bytes=3 << 20)
    c = Client(Dispatcher(memory_factory, limits=limits))
    assert c.request(1, RT.CTR, b"1024 core 2").error == 0
    assert c.request(2, RT.CTR, b"1024 core 2").error == 0
    assert c.request(3, RT.CTR, b"1024 core 2").error == -errno.ENOMEM
    assert "--max-logs" in caplog.text
    assert c.request(2, RT.CTR, b"1024 core 2").error == 0  # replacing one is no new log
    assert c.request(2, RT.DTR).error == 0
    # 2**20 regions: 256 KiB of bitmaps; 2**21 regions would pass --max-regions no more
    assert c.request(3, RT.CTR, b"4194304 core 2").error == -errno.ENOMEM
    assert "--max-regions" in caplog.text
    assert c.request(3, RT.CTR, b"2097152 core 2").error == 0
    assert c.request(1, RT.DTR).error == 0 and c.request(3, RT.DTR).error == 0
    tight = Client(Dispatcher(memory_factory, limits=LogLimits(max_bitmap_bytes=300 << 10)))
    assert tight.request(1, RT.CTR, b"2097152 core 2").error == 0  # 256 KiB
    assert tight.request(2, RT.CTR, b"2097152 core 2").error == -errno.ENOMEM
    assert "--max-bitmap-memory" in caplog.text
    assert tight.request(1, RT.DTR).error == 0
    assert tight.request(2, RT.CTR, b"2097152 core 2").error == 0  # freed by the DTR
