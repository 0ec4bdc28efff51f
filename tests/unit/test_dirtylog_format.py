"""The kernel disk-log format: header round trip, golden bytes, resume fix-ups."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmrepl.dirtylog.format import (
    HEADER_SIZE,
    LOG_OFFSET,
    MIRROR_DISK_VERSION,
    MIRROR_MAGIC,
    HeaderProblem,
    LogHeader,
    SyncMode,
    area_size,
    bitset_size,
    build_header,
    fill_bits,
    load_area,
    load_failed,
    log_header_disk,
    parse_header,
    popcount,
)

# magic 0x4D695272 "MiRr" little-endian, version 2, nr_regions 130.
GOLDEN = bytes.fromhex("72 52 69 4d 02 00 00 00 82 00 00 00 00 00 00 00")


def test_golden_header() -> None:
    header = LogHeader(MIRROR_MAGIC, MIRROR_DISK_VERSION, 130)
    assert build_header(header) == GOLDEN
    assert parse_header(GOLDEN) == header
    assert GOLDEN[:4] == b"rRiM"  # "MiRr" as a LE u32
    assert log_header_disk.sizeof() == HEADER_SIZE == 16


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_header_round_trip(magic: int, version: int, nr: int) -> None:
    header = LogHeader(magic, version, nr)
    data = build_header(header)
    assert len(data) == HEADER_SIZE
    assert parse_header(data) == header
    assert build_header(parse_header(data)) == data


def test_short_header_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        parse_header(b"\0" * 15)


@pytest.mark.parametrize("regions,bitset,area512,area4k", [
    (1, 8, 1536, 4096), (64, 8, 1536, 4096), (65, 16, 1536, 4096),
    (130, 24, 1536, 4096), (2048, 256, 1536, 4096), (4096 * 8, 4096, 5120, 8192),
])
def test_sizes(regions: int, bitset: int, area512: int, area4k: int) -> None:
    assert bitset_size(regions) == bitset
    assert area_size(regions) == area512
    assert area_size(regions, 4096) == area4k


def naive_fill(buf: bytearray, offset: int, start: int, stop: int, value: bool) -> None:
    for i in range(start, stop):
        if value:
            buf[offset + i // 8] |= 1 << (i % 8)
        else:
            buf[offset + i // 8] &= ~(1 << (i % 8)) & 0xFF


@given(st.binary(min_size=1, max_size=40), st.integers(0, 320), st.integers(0, 320),
       st.booleans(), st.integers(0, 3))
def test_fill_bits_matches_per_bit_loop(data: bytes, a: int, b: int, value: bool,
                                        offset: int) -> None:
    nbits = len(data) * 8
    start, stop = sorted((a % (nbits + 1), b % (nbits + 1)))
    got = bytearray(bytes(offset) + data)
    want = bytearray(got)
    fill_bits(got, offset, start, stop, value)
    naive_fill(want, offset, start, stop, value)
    assert got == want


def area_with(header: bytes, bits: list[int], regions: int, gap: int = 0x00) -> bytearray:
    area = bytearray(area_size(regions))
    area[:LOG_OFFSET] = bytes([gap]) * LOG_OFFSET
    area[:len(header)] = header
    for region in bits:
        area[LOG_OFFSET + region // 8] |= 1 << (region % 8)
    return area


def clean_set(area: bytearray, regions: int) -> set[int]:
    return {r for r in range(bitset_size(regions) * 8)
            if area[LOG_OFFSET + r // 8] & (1 << (r % 8))}


def test_load_trusts_a_good_log() -> None:
    area = area_with(GOLDEN, [0, 5, 129], 130, gap=0xEE)
    result = load_area(area, 130, SyncMode.DEFAULT)
    assert result.problem is HeaderProblem.NONE and not result.device_failed
    assert result.trusted_regions == 130
    assert clean_set(area, 130) == {0, 5, 129}
    assert area[HEADER_SIZE:LOG_OFFSET] == b"\xee" * (LOG_OFFSET - HEADER_SIZE)  # preserved
    assert area[:HEADER_SIZE] == GOLDEN


def test_bad_magic_is_a_new_log_all_dirty() -> None:
    header = bytearray(GOLDEN)
    header[0] ^= 1
    area = area_with(bytes(header), list(range(130)), 130)
    result = load_area(area, 130, SyncMode.DEFAULT)
    assert result.problem is HeaderProblem.BAD_MAGIC and not result.device_failed
    assert clean_set(area, 130) == set()
    assert parse_header(area) == LogHeader(MIRROR_MAGIC, MIRROR_DISK_VERSION, 130)


def test_bad_magic_with_nosync_is_all_clean() -> None:
    area = area_with(b"\xff" * 16, [], 130)
    load_area(area, 130, SyncMode.NOSYNC)
    assert clean_set(area, 130) == set(range(130))  # and bits 130..191 stay clear


@pytest.mark.parametrize("sync,want", [(SyncMode.NOSYNC, set(range(130))),
                                       (SyncMode.FORCESYNC, set())])
def test_sync_modes_ignore_the_disk(sync: SyncMode, want: set[int]) -> None:
    area = area_with(GOLDEN, [1, 2, 3], 130)
    result = load_area(area, 130, sync)
    assert result.problem is HeaderProblem.FORCED and result.trusted_regions == 0
    assert clean_set(area, 130) == want


def test_unsupported_version_fails_the_device_and_trusts_nothing() -> None:
    header = build_header(LogHeader(MIRROR_MAGIC, 3, 130))
    area = area_with(header, list(range(130)), 130)
    result = load_area(area, 130, SyncMode.DEFAULT)
    assert result.problem is HeaderProblem.BAD_VERSION and result.device_failed
    assert clean_set(area, 130) == set()
    assert parse_header(area).version == MIRROR_DISK_VERSION


def test_version_1_is_read_as_2() -> None:
    header = build_header(LogHeader(MIRROR_MAGIC, 1, 130))
    area = area_with(header, [7], 130)
    result = load_area(area, 130, SyncMode.DEFAULT)
    assert result.problem is HeaderProblem.NONE
    assert clean_set(area, 130) == {7}
    assert parse_header(area).version == 2


def test_grown_device_new_regions_dirty() -> None:
    header = build_header(LogHeader(nr_regions=100))
    area = area_with(header, list(range(128)), 130)  # stale set bits past 100 too
    result = load_area(area, 130, SyncMode.DEFAULT)
    assert result.trusted_regions == 100
    assert clean_set(area, 130) == set(range(100))
    assert parse_header(area).nr_regions == 130


def test_shrunk_device_stale_bits_cleared() -> None:
    header = build_header(LogHeader(nr_regions=192))
    area = area_with(header, list(range(192)), 192)
    small = area[:area_size(70)]
    result = load_area(small, 70, SyncMode.DEFAULT)
    assert result.trusted_regions == 70
    assert clean_set(small, 70) == set(range(70))  # 70..127 cleared
    assert parse_header(small).nr_regions == 70


def test_absurd_nr_regions_is_bounded() -> None:
    header = build_header(LogHeader(nr_regions=2**64 - 1))
    area = area_with(header, [0], 130)
    assert load_area(area, 130, SyncMode.DEFAULT).trusted_regions == 130
    assert clean_set(area, 130) == {0}


@pytest.mark.parametrize("sync,want", [(SyncMode.DEFAULT, set()),
                                       (SyncMode.NOSYNC, set(range(130)))])
def test_read_failure(sync: SyncMode, want: set[int]) -> None:
    area = area_with(GOLDEN, [1], 130)
    result = load_failed(area, 130, sync)
    assert result.device_failed and result.problem is HeaderProblem.READ_FAILED
    assert clean_set(area, 130) == want


def test_popcount() -> None:
    assert popcount(b"") == 0
    assert popcount(b"\xff\x01\x80") == 10
