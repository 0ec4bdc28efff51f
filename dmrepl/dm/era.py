"""The kernel's ``era`` target: its table, its status, and which blocks its
metadata says were written since a given era.

``era <metadata dev> <origin dev> <block sectors>`` (drivers/md/dm-era-target.c)
passes every bio to the origin; before the first write to a block in the
current *era* goes down, it sets the block's bit in the era's *writeset* and
commits the metadata.  ``checkpoint`` (a message) starts a new era: the old
writeset is archived in a btree keyed by era, and later *digested* into the era
array (for each block, the era of its last archived write).  So after a crash
the committed metadata still names every block written since any era: the
kernel journal (``dmrepl.daemon.kjournal``) uses it to resynchronise only those
blocks when its log lost writes.

Metadata (4 KiB blocks, little-endian, all structs ``__packed``)::

    block 0            struct superblock_disk: current era, current writeset
                       (a bitset), the writeset tree's root, the era array's root
    btree node         struct node_header, then keys (le64) [max_entries], then
                       values (value_size bytes each) [max_entries]; an internal
                       node's values are child block numbers (le64)
    array              a btree from array-block index to the block of a struct
                       array_block, followed by its values (value_size each)
    bitset             an array of le64 words, bit b of the set in word b // 64

Declared once here (construct) and as C in :mod:`cdefs.era`;
``tests/unit/test_era.py`` checks that they agree.  Sans-I/O: the readers take a
``read_block(number) -> bytes`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from construct import Bytes, Int32ul, Int64ul, Struct

from dmrepl.crc import crc32c
from dmrepl.errors import DmreplError

#: ``DM_ERA_METADATA_BLOCK_SIZE``.
BLOCK_SIZE = 4096
#: ``SUPERBLOCK_MAGIC``; the checksum XORs of the superblock, btree nodes and
#: array blocks (``SUPERBLOCK_CSUM_XOR``, ``BTREE_CSUM_XOR``, dm-array's ``CSUM_XOR``).
MAGIC = 2126579579
SUPERBLOCK_CSUM_XOR = 146538381
BTREE_CSUM_XOR = 121107
ARRAY_CSUM_XOR = 595846735
#: A btree node's flags.
INTERNAL_NODE = 1
LEAF_NODE = 2
#: The superblock's location; as ``metadata_snap``: no snapshot held.
SUPERBLOCK_LOCATION = 0

#: ``struct writeset_disk``.
WRITESET_DISK = Struct(
    "nr_bits" / Int32ul,
    "root" / Int64ul,
)

#: ``struct superblock_disk``.
SUPERBLOCK = Struct(
    "csum" / Int32ul,
    "flags" / Int32ul,
    "blocknr" / Int64ul,
    "uuid" / Bytes(16),
    "magic" / Int64ul,
    "version" / Int32ul,
    "metadata_space_map_root" / Bytes(128),
    "data_block_size" / Int32ul,       # sectors per era block
    "metadata_block_size" / Int32ul,   # sectors
    "nr_blocks" / Int32ul,
    "current_era" / Int32ul,
    "current_writeset" / WRITESET_DISK,
    "writeset_tree_root" / Int64ul,
    "era_array_root" / Int64ul,
    "metadata_snap" / Int64ul,
)

#: ``struct node_header`` (btree-internal.h).
NODE_HEADER = Struct(
    "csum" / Int32ul,
    "flags" / Int32ul,
    "blocknr" / Int64ul,
    "nr_entries" / Int32ul,
    "max_entries" / Int32ul,
    "value_size" / Int32ul,
    "padding" / Int32ul,
)

#: ``struct array_block`` (dm-array.c).
ARRAY_BLOCK = Struct(
    "csum" / Int32ul,
    "max_entries" / Int32ul,
    "nr_entries" / Int32ul,
    "value_size" / Int32ul,
    "blocknr" / Int64ul,
)

#: A btree deeper than this is corrupt (4 KiB nodes of >= 126 entries).
MAX_DEPTH = 8


class EraFormatError(DmreplError):
    """The era metadata cannot be read; the message says what is wrong."""


ReadBlock = Callable[[int], bytes]


def checksum(block: bytes, xor: int) -> int:
    """``dm_bm_checksum`` of a block's bytes after its checksum field: the
    kernel's crc32c seeded with ~0 and not inverted at the end, XORed."""
    return crc32c(block[4:]) ^ 0xFFFFFFFF ^ xor


def _block(read_block: ReadBlock, number: int, xor: int, what: str,
           blocknr_at: int = 8) -> bytes:
    """Block ``number``, checked: its checksum, and its own record of where it is
    (at byte ``blocknr_at``)."""
    block = read_block(number)
    if len(block) != BLOCK_SIZE:
        raise EraFormatError(f"{what} at block {number}: short read ({len(block)} bytes)")
    if checksum(block, xor) != int.from_bytes(block[:4], "little"):
        raise EraFormatError(f"{what} at block {number}: bad checksum")
    if int.from_bytes(block[blocknr_at:blocknr_at + 8], "little") != number:
        raise EraFormatError(f"{what} at block {number}: it says it is elsewhere")
    return block


@dataclass(frozen=True)
class Superblock:
    block_sectors: int
    nr_blocks: int
    current_era: int
    #: the current writeset's bitset root (SUPERBLOCK_LOCATION: none)
    current_writeset: int
    writeset_tree_root: int
    era_array_root: int
    metadata_snap: int


def read_superblock(read_block: ReadBlock, location: int = SUPERBLOCK_LOCATION) -> Superblock:
    """The superblock at ``location`` (0, or a held metadata snapshot's)."""
    block = _block(read_block, location, SUPERBLOCK_CSUM_XOR, "era superblock")
    sb = SUPERBLOCK.parse(block)
    if sb.magic != MAGIC:
        raise EraFormatError(f"era superblock at block {location}: bad magic")
    if sb.version != 1:
        raise EraFormatError(f"era metadata version {sb.version} (this reads 1)")
    return Superblock(sb.data_block_size, sb.nr_blocks, sb.current_era,
                      sb.current_writeset.root, sb.writeset_tree_root, sb.era_array_root,
                      sb.metadata_snap)


def btree_items(read_block: ReadBlock, root: int, depth: int = 0) -> Iterator[tuple[int, bytes]]:
    """(key, value bytes) of every leaf entry of the one-level btree at ``root``,
    in key order."""
    if depth > MAX_DEPTH:
        raise EraFormatError(f"btree deeper than {MAX_DEPTH} at block {root}")
    block = _block(read_block, root, BTREE_CSUM_XOR, "btree node")
    header = NODE_HEADER.parse(block)
    n, cap, size = header.nr_entries, header.max_entries, header.value_size
    keys_at = NODE_HEADER.sizeof()
    values_at = keys_at + 8 * cap
    if n > cap or size == 0 or values_at + size * cap > BLOCK_SIZE:
        raise EraFormatError(f"btree node at block {root}: {n} of {cap} entries of "
                             f"{size} bytes do not fit a block")
    for i in range(n):
        key = int.from_bytes(block[keys_at + 8 * i:keys_at + 8 * i + 8], "little")
        value = block[values_at + size * i:values_at + size * (i + 1)]
        if header.flags & INTERNAL_NODE:
            yield from btree_items(read_block, int.from_bytes(value, "little"), depth + 1)
        elif header.flags & LEAF_NODE:
            yield key, value
        else:
            raise EraFormatError(f"btree node at block {root}: flags {header.flags:#x}")


def array_values(read_block: ReadBlock, root: int, value_size: int) -> Iterator[tuple[int, bytes]]:
    """(index, value bytes) of every entry of the dm array at ``root``."""
    for nr, location in btree_items(read_block, root):
        block = _block(read_block, int.from_bytes(location, "little"), ARRAY_CSUM_XOR,
                       "array block", blocknr_at=ARRAY_BLOCK.sizeof() - 8)
        header = ARRAY_BLOCK.parse(block)
        at = ARRAY_BLOCK.sizeof()
        if (header.value_size != value_size or header.nr_entries > header.max_entries
                or at + value_size * header.max_entries > BLOCK_SIZE):
            raise EraFormatError(f"array block {nr}: {header.nr_entries} of "
                                 f"{header.max_entries} values of {header.value_size} bytes")
        first = nr * header.max_entries
        for i in range(header.nr_entries):
            yield first + i, block[at + value_size * i:at + value_size * (i + 1)]


def bitset_bits(read_block: ReadBlock, root: int, nr_bits: int) -> Iterator[int]:
    """The set bits (below ``nr_bits``) of the dm bitset at ``root``."""
    for word_nr, word in array_values(read_block, root, 8):
        value = int.from_bytes(word, "little")
        while value:
            low = value & -value
            bit = word_nr * 64 + low.bit_length() - 1
            if bit < nr_bits:
                yield bit
            value ^= low


def written_since(read_block: ReadBlock, era: int, *,
                  snapshot: bool = False) -> tuple[int, set[int]]:
    """(sectors per block, the blocks written in era ``era`` or later) by the
    committed metadata; ``snapshot``: by the metadata snapshot the live target
    holds (``take_metadata_snap``) instead, which is consistent while it runs."""
    sb = read_superblock(read_block)
    if snapshot:
        if sb.metadata_snap == SUPERBLOCK_LOCATION:
            raise EraFormatError("no era metadata snapshot is held")
        sb = read_superblock(read_block, sb.metadata_snap)
    blocks: set[int] = set()
    # the era array: the era of each block's last write, as far as digested
    for nr, value in array_values(read_block, sb.era_array_root, 4):
        if int.from_bytes(value, "little") >= era and nr < sb.nr_blocks:
            blocks.add(nr)
    # the archived writesets not yet (all) digested into it
    for key, value in btree_items(read_block, sb.writeset_tree_root):
        if key >= era:
            ws = WRITESET_DISK.parse(value)
            blocks.update(bitset_bits(read_block, ws.root, min(ws.nr_bits, sb.nr_blocks)))
    # the current era's (in a snapshot it was archived when the snapshot was taken)
    if not snapshot and sb.current_era >= era and sb.current_writeset != SUPERBLOCK_LOCATION:
        blocks.update(bitset_bits(read_block, sb.current_writeset, sb.nr_blocks))
    return sb.block_sectors, blocks


def ranges(blocks: set[int], block_sectors: int, sectors: int) -> list[tuple[int, int]]:
    """The blocks as (first sector, sectors) runs, within a device of ``sectors``."""
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        start = b * block_sectors
        if start >= sectors:
            break
        length = min(block_sectors, sectors - start)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


# -- the target ----------------------------------------------------------------------

def target_params(metadata: str, origin: str, block_sectors: int) -> str:
    return f"{metadata} {origin} {block_sectors}"


@dataclass(frozen=True)
class EraStatus:
    current_era: int
    #: the held metadata snapshot's block (None: none held)
    snapshot: int | None


def parse_status(params: str) -> EraStatus:
    """``<metadata block size> <used>/<total> <current era> <held root | ->``."""
    words = params.split()
    try:
        held = None if words[3] == "-" else int(words[3])
        return EraStatus(int(words[2]), held)
    except (IndexError, ValueError) as e:
        raise EraFormatError(f"unexpected era status {params!r}") from e
