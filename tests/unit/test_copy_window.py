"""The copy window (what a site link applied since its last persisted position):
its overlap test is exact whatever mix of whole-block and other writes it holds.
A copier adds only writes that overlap nothing in it (an overlap makes it persist
and clear the window first): so do these tests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.replicator.slink.link import WINDOW_BLOCK, WINDOW_BLOCKS_MAX, CopyWindow

SECTOR = 512
SPAN = 64 * WINDOW_BLOCK   # a small device: overlaps are frequent

# a write: (device, start, end), sector aligned; many of them whole 4 KiB blocks
_block_write = st.builds(
    lambda dev, first, n: (dev, first * WINDOW_BLOCK, (first + n) * WINDOW_BLOCK),
    st.integers(0, 1), st.integers(0, 63), st.integers(1, WINDOW_BLOCKS_MAX + 4))
_sector_write = st.builds(
    lambda dev, first, n: (dev, first * SECTOR, (first + n) * SECTOR),
    st.integers(0, 1), st.integers(0, SPAN // SECTOR - 1), st.integers(1, 300))
_write = st.one_of(_block_write, _sector_write)


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


@settings(max_examples=300)
@given(st.lists(_write, max_size=40), st.lists(_write, min_size=1, max_size=20))
def test_a_write_overlaps_the_window_exactly_when_it_overlaps_a_write_added(
        added: list[tuple[int, int, int]], probes: list[tuple[int, int, int]]) -> None:
    window = CopyWindow()
    kept: list[tuple[int, int, int]] = []
    for write in added:
        if not any(_overlap(write, k) for k in kept):
            window.add(*write)
            kept.append(write)
    assert window.n == len(kept)
    for probe in probes:
        assert window.overlaps(*probe) == any(_overlap(probe, k) for k in kept), probe


def test_a_cleared_window_overlaps_nothing() -> None:
    window = CopyWindow()
    window.add(0, 0, WINDOW_BLOCK)
    window.add(0, 3 * SECTOR, 5 * SECTOR)
    assert window.overlaps(0, SECTOR, 2 * SECTOR)
    window.clear()
    assert window.n == 0
    assert not window.overlaps(0, 0, SPAN)
