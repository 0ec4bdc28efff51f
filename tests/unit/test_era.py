"""The era target's metadata: the construct declarations agree with the C ones,
and the blocks written since an era are read from metadata the kernel wrote
(tests/unit/data/README.md says how it was made); damage is refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from cdefs import era as c
from dmrepl.dm import era

DATA = Path(__file__).parent / "data"


def image(name: str) -> bytearray:
    return bytearray(gzip.decompress((DATA / f"era-{name}.meta.gz").read_bytes()))


def reader(data: bytes | bytearray) -> era.ReadBlock:
    return lambda n: bytes(data[n * era.BLOCK_SIZE:(n + 1) * era.BLOCK_SIZE])


def test_the_declarations_agree_with_the_c_structs() -> None:
    for struct, decl in (("struct superblock_disk", era.SUPERBLOCK),
                         ("struct writeset_disk", era.WRITESET_DISK),
                         ("struct node_header", era.NODE_HEADER),
                         ("struct array_block", era.ARRAY_BLOCK)):
        offset = 0
        for sub in decl.subcons:
            assert c.ffi.offsetof(struct, sub.name) == offset, (struct, sub.name)
            offset += sub.sizeof()
        assert c.ffi.sizeof(struct) == decl.sizeof()
    lib = c.ffi.dlopen(None)
    assert (lib.SUPERBLOCK_MAGIC, lib.SUPERBLOCK_CSUM_XOR, lib.BTREE_CSUM_XOR,
            lib.CSUM_XOR) == (era.MAGIC, era.SUPERBLOCK_CSUM_XOR, era.BTREE_CSUM_XOR,
                              era.ARRAY_CSUM_XOR)
    assert (lib.INTERNAL_NODE, lib.LEAF_NODE, lib.DM_ERA_METADATA_BLOCK_SIZE) == (
        era.INTERNAL_NODE, era.LEAF_NODE, era.BLOCK_SIZE)


@pytest.mark.parametrize(("since", "blocks"), [
    (1, {3, 500, 7, 1000, 1001}), (2, {7, 1000, 1001}), (3, {1000, 1001}), (4, set())])
def test_the_blocks_written_since_an_era_in_committed_metadata(
        since: int, blocks: set[int]) -> None:
    assert era.written_since(reader(image("live")), since) == (128, blocks)


def test_a_held_snapshot_is_read_without_what_came_after_it() -> None:
    data = image("snap")
    assert era.read_superblock(reader(data)).metadata_snap != era.SUPERBLOCK_LOCATION
    assert era.written_since(reader(data), 2, snapshot=True) == (128, {7, 1000, 1001})
    with pytest.raises(era.EraFormatError, match="no era metadata snapshot"):
        era.written_since(reader(image("live")), 2, snapshot=True)


def test_the_blocks_as_byte_ranges_merge_neighbours_and_stop_at_the_end() -> None:
    assert era.ranges({7, 3, 4, 9}, 128, 10 * 128 - 1) == [(384, 256), (896, 128), (1152, 127)]
    assert era.ranges({20}, 128, 1000) == []


def test_damaged_metadata_is_refused() -> None:
    sb = era.read_superblock(reader(image("live")))
    for block in (0, sb.writeset_tree_root, sb.era_array_root, sb.current_writeset):
        data = image("live")
        data[block * era.BLOCK_SIZE + 100] ^= 0xFF
        with pytest.raises(era.EraFormatError, match="checksum"):
            era.written_since(reader(data), 1)
    with pytest.raises(era.EraFormatError, match="short read"):
        era.written_since(lambda n: b"", 1)
    with pytest.raises(era.EraFormatError):   # zeros: never formatted
        era.written_since(reader(bytes(1 << 16)), 1)


def test_the_status_line() -> None:
    assert era.parse_status("8 10/1024 3 -") == era.EraStatus(3, None)
    assert era.parse_status("8 13/1024 4 56") == era.EraStatus(4, 56)
    with pytest.raises(era.EraFormatError):
        era.parse_status("8 10/1024")
