"""The table model: parse/format round trips, layout validation, device references."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmrepl.dm import DeviceRef, Table, TableError, Target
from dmrepl.errors import UserError

# What `dmsetup table` printed for devices in the test VM (kernel 6.1).
DMSETUP_OUTPUT = """\
0 16384 linear 7:0 0
16384 8192 zero
24576 32768 mirror core 1 1024 2 7:1 0 7:2 0 1 handle_errors
57344 8 error
"""

type_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1,
                     max_size=15)
param_tokens = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                              blacklist_characters="#"),
                       min_size=1, max_size=12)
params = st.lists(param_tokens, max_size=8).map(" ".join)


@st.composite
def tables(draw: st.DrawFn) -> Table:
    lengths = draw(st.lists(st.integers(min_value=1, max_value=2**40), min_size=1, max_size=8))
    targets, start = [], 0
    for length in lengths:
        targets.append(Target(start, length, draw(type_names), draw(params)))
        start += length
    return Table(targets)


@given(tables())
def test_format_parse_round_trip(table: Table) -> None:
    assert Table.parse(table.format()) == table
    assert Table.parse(table.format()).format() == table.format()


@given(tables(), st.sampled_from([" ", "\t", "  \t "]), st.booleans())
def test_whitespace_comments_and_blank_lines_are_ignored(table: Table, sep: str,
                                                         comments: bool) -> None:
    lines = ["# a comment", ""] if comments else []
    for target in table:
        tokens = [str(target.start), str(target.length), target.target_type,
                  *target.params.split()]
        lines.append(sep + sep.join(tokens) + (f"{sep}# trailing" if comments else sep))
        lines.append("   " if comments else "")
    assert Table.parse("\n".join(lines)) == table


def test_dmsetup_output_round_trips() -> None:
    table = Table.parse(DMSETUP_OUTPUT)
    assert table.format() == DMSETUP_OUTPUT
    assert len(table) == 4 and table.size == 57352
    assert table[2].params == "core 1 1024 2 7:1 0 7:2 0 1 handle_errors"
    start, length, target_type, rest = table[1]
    assert (start, length, target_type, rest) == (16384, 8192, "zero", "")


def test_trailing_whitespace_from_dmsetup_is_tolerated() -> None:
    # dmsetup prints "0 8 zero " (a space before the empty params).
    assert Table.parse("0 8 zero \n").format() == "0 8 zero\n"


@given(tables(), st.data())
def test_a_gap_is_reported_with_its_line(table: Table, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(table) - 1))
    shift = data.draw(st.integers(min_value=1, max_value=1000))
    lines = table.format().splitlines()
    moved = table[index]
    lines[index] = Target(moved.start + shift, moved.length, moved.target_type,
                          moved.params).format()
    with pytest.raises(TableError, match=rf"^line {index + 1}: gap in table"):
        Table.parse("\n".join(lines))


@given(tables().filter(lambda t: len(t) >= 2), st.data())
def test_an_overlap_is_reported_with_its_line(table: Table, data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=1, max_value=len(table) - 1))
    back = data.draw(st.integers(min_value=1, max_value=table[index - 1].length))
    lines = ["# header comment", *table.format().splitlines()]
    moved = table[index]
    lines[index + 1] = Target(moved.start - back, moved.length, moved.target_type,
                              moved.params).format()
    with pytest.raises(TableError, match=rf"^line {index + 2}: target at sector .* overlaps"):
        Table.parse("\n".join(lines))


@pytest.mark.parametrize("text, message", [
    ("", "at least one target"),
    ("# only a comment\n\n", "at least one target"),
    ("0 8", "line 1: expected"),
    ("0 8 zero\n8 -1 zero", "line 2: invalid length .-1.: not a decimal number"),
    ("0 0 zero", "line 1: target length must be positive"),
    ("x 8 zero", "line 1: invalid start .x.: not a decimal number"),
    ("0 8 a-target-type-name-too-long", "longer than 15 bytes"),
    ("0 8 zero\n4 8 zero", "line 2: target at sector 4 overlaps"),
    ("0 8 zero\n\n# c\n9 8 zero", "line 4: gap in table"),
    ("5 8 zero", "line 1: gap in table: target starts at sector 5"),
    # undecodable bytes (argv and files are decoded with surrogateescape): found by
    # the table-line fuzz run (tests/sim/test_fuzz_parsers.py)
    ("0 8 zer\udcff", "line 1: target type 'zer\\\\udcff' is not valid UTF-8"),
    ("0 8 linear /dev/sd\udcff 0", "line 1: target params .* is not valid UTF-8"),
])
def test_bad_tables(text: str, message: str) -> None:
    with pytest.raises(TableError, match=message) as excinfo:
        Table.parse(text)
    assert isinstance(excinfo.value, UserError)


def test_table_from_targets_names_the_target() -> None:
    with pytest.raises(TableError, match="target 2: target at sector 4 overlaps"):
        Table([Target(0, 8, "zero"), Target(4, 8, "zero")])
    with pytest.raises(TableError, match="at least one target"):
        Table([])


@pytest.mark.parametrize("kwargs", [
    {"start": -1, "length": 8, "target_type": "zero"},
    {"start": 0, "length": 0, "target_type": "zero"},
    {"start": 0, "length": True, "target_type": "zero"},
    {"start": 0, "length": 8, "target_type": ""},
    {"start": 0, "length": 8, "target_type": "has space"},
    {"start": 0, "length": 8, "target_type": "zero", "params": "a\nb"},
    {"start": 0, "length": 8, "target_type": "zero", "params": "a\0b"},
])
def test_target_validation(kwargs: dict) -> None:
    with pytest.raises(TableError):
        Target(**kwargs)


def test_table_is_immutable_and_hashable() -> None:
    table = Table.parse(DMSETUP_OUTPUT)
    assert hash(table) == hash(Table.parse(DMSETUP_OUTPUT))
    with pytest.raises(AttributeError):
        table[0].start = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        table[0] = Target(0, 1, "zero")  # type: ignore[index]


@given(st.integers(min_value=0, max_value=4095), st.integers(min_value=0, max_value=2**20 - 1))
def test_devno_refs_round_trip(major: int, minor: int) -> None:
    ref = DeviceRef.parse(f"{major}:{minor}")
    assert (ref.major, ref.minor) == (major, minor)
    assert str(ref) == f"{major}:{minor}"
    assert ref.resolve() is ref
    assert DeviceRef.from_devno(ref.dev) == ref


def fake_stat(devices: dict[str, tuple[int, int]]):  # type: ignore[no-untyped-def]
    def stat_fn(path: str) -> os.stat_result:
        if path not in devices:
            raise FileNotFoundError(2, "No such file or directory", path)
        major, minor = devices[path]
        mode = stat.S_IFBLK | 0o660 if major else stat.S_IFREG | 0o644
        return os.stat_result((mode, 0, 0, 1, 0, 0, 0, 0, 0, 0),
                              {"st_rdev": os.makedev(major, minor)})
    return stat_fn


def test_path_refs_resolve_through_stat() -> None:
    stat_fn = fake_stat({"/dev/loop3": (7, 3), "/dev/sdq": (65, 0), "/dev/file": (0, 0)})
    ref = DeviceRef.parse("/dev/loop3")
    assert not ref.resolved and str(ref) == "/dev/loop3"
    resolved = ref.resolve(stat_fn)
    assert (resolved.path, resolved.devno) == ("/dev/loop3", "7:3")
    with pytest.raises(TableError, match="not a block device"):
        DeviceRef.parse("/dev/file").resolve(stat_fn)
    with pytest.raises(TableError, match="No such file"):
        DeviceRef.parse("/dev/none").resolve(stat_fn)
    with pytest.raises(TableError, match="neither"):
        DeviceRef.parse("loop3")
    with pytest.raises(TableError, match="not resolved"):
        _ = ref.devno


def test_table_resolves_devices_to_what_the_kernel_prints() -> None:
    stat_fn = fake_stat({"/dev/loop1": (7, 1), "/dev/loop2": (7, 2), "/dev/loop0": (7, 0)})
    ours = Table.parse("0 16384 linear /dev/loop0 0\n16384 8192 zero\n"
                       "24576 32768 mirror core 1 1024 2 /dev/loop1 0 /dev/loop2 0 "
                       "1 handle_errors\n57344 8 error\n")
    assert ours.resolve_devices(stat_fn) == Table.parse(DMSETUP_OUTPUT)
