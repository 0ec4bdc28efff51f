"""Engine messages: validated whole, then applied; a refused one changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.replicator import MessageError, Replicator
from dmrepl.replicator.table import DeviceConfig, LegConfig, parse_device

MB = 1 << 20


def blank(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.fixture
def rep(tmp_path: Path) -> Iterator[Replicator]:
    log = blank(tmp_path / "log", 8 * MB)
    r = Replicator.from_table(f"0 1 replicator ringbuffer 4 {log} 0 create 8192 "
                              "blockdev 2 0 async blockdev 4 1 async ios 100 "
                              "blockdev 2 2 async blockdev 2 3 async")
    local, r1 = blank(tmp_path / "local", MB), blank(tmp_path / "r1", MB)
    r.add_device(f"0 2048 replicator-dev rep 0 0 1 {local} nolog 0 1 1 {r1} core 2 8 nosync")
    yield r
    r.close()


def snapshot(r: Replicator) -> tuple[str, str, str]:
    return r.status("table"), r.status(), r.devices[0].table()


def test_several_settings_apply_together_or_not_at_all(rep: Replicator) -> None:
    rep.message(["slink", "message", "1", "fallbehind", "ios", "0", "policy", "sync",
                 "resync_rate", "8m"])
    assert "blockdev 4 1 sync resync_rate 8m" in rep.status("table")
    before = snapshot(rep)
    for bad in (["resync_rate", "1m", "policy", "bogus"],
                ["policy", "async", "fallbehind", "ios", "5", "resync_rate", "-1"],
                ["fallbehind", "ios", "5"],            # on a sync link: meaningless
                ["policy", "async", "policy", "sync"],
                ["resync_rate", "2m", "fallbehind", "ios"],
                []):
        with pytest.raises(MessageError):
            rep.message(["slink", "message", "1", *bad])
        assert snapshot(rep) == before, bad


def test_a_device_add_whose_later_leg_is_refused_leaves_nothing_behind(
        rep: Replicator, tmp_path: Path) -> None:
    dlog = blank(tmp_path / "dlog", MB)
    r2, small = blank(tmp_path / "r2", MB), blank(tmp_path / "small", MB // 2)
    before = snapshot(rep)
    with pytest.raises(MessageError, match="smaller than the local device"):
        rep.devices[0].message(["device", "add", "rep", "0", "2", "1", r2, "disk", "2", dlog,
                                "8", "3", "1", small, "core", "1", "8"])
    assert snapshot(rep) == before
    assert Path(dlog).read_bytes() == bytes(MB)   # the first leg's disk log: untouched
    rep.devices[0].message(["device", "add", "rep", "0", "2", "1", r2, "disk", "2", dlog,
                            "8"])
    assert f"2 1 {r2} disk 2 {dlog} 8" in rep.devices[0].table()


REFUSED_REPLICATOR = [
    [], ["frobnicate"], ["start", "some"], ["stop", "all", "now"], ["statistics", "maybe"],
    ["slink"], ["slink", "add"], ["slink", "add", "blockdev", "2", "1", "async"],
    ["slink", "add", "blockdev", "2", "0", "async"], ["slink", "add", "net", "1", "5"],
    ["slink", "add", "blockdev", "4", "5", "sync", "ios", "3"],
    ["slink", "del", "0"], ["slink", "del", "1"], ["slink", "del", "9"], ["slink", "del", "x"],
    ["slink", "message", "9", "policy", "sync"], ["slink", "message", "1"],
    ["slink", "message", "1", "policy", "sync"],           # keeps its fall-behind
    ["slink", "message", "2", "resync_rate", "1m", "fallbehind", "bytes", "3"],
    ["slink", "message", "2", "policy", "async", "frobnicate", "1"],
    ["slink", "frob", "1"], ["replog"], ["replog", "resize", "100"],
    ["replog", "resize", "-1"], ["replog", "resize", str(1 << 40)],
]
REFUSED_DEVICE = [
    [], ["frob"], ["start", "x"], ["device"], ["device", "add"], ["device", "del", "0"],
    ["device", "del", "2"], ["device", "del", "1", "2"], ["device", "add", "rep", "5"],
    ["device", "add", "rep", "0", "1", "1", "/nonexistent", "core", "1", "8"],
    ["device", "add", "rep", "0", "9", "1", "/nonexistent", "core", "1", "8"],
    ["device", "add", "rep", "0", "2", "1", "/nonexistent", "core", "1", "8"],
    ["device", "add", "rep", "0", "2", "1", "/x", "core", "1", "16"],   # region size
]


@pytest.mark.parametrize("argv", REFUSED_REPLICATOR, ids=" ".join)
def test_a_refused_replicator_message_changes_nothing(rep: Replicator,
                                                      argv: list[str]) -> None:
    before = snapshot(rep)
    with pytest.raises(MessageError):
        rep.message(argv)
    assert snapshot(rep) == before


@pytest.mark.parametrize("argv", REFUSED_DEVICE, ids=" ".join)
def test_a_refused_device_message_changes_nothing(rep: Replicator, argv: list[str]) -> None:
    before = snapshot(rep)
    with pytest.raises(MessageError):
        rep.devices[0].message(argv)
    assert snapshot(rep) == before


# -- property: the device table renders back to the same configuration -----------

paths = st.from_regex(r"/[a-z0-9_]{1,12}", fullmatch=True)


@st.composite
def device_configs(draw: st.DrawFn) -> DeviceConfig:
    nrs = sorted(draw(st.sets(st.integers(1, 2047), max_size=4)))
    names = draw(st.lists(paths, min_size=len(nrs) + 1, max_size=len(nrs) + 1, unique=True))
    region = 1 << draw(st.integers(1, 10))
    legs = [LegConfig(0, names[0])]
    for nr, path in zip(nrs, names[1:], strict=True):
        sync = draw(st.sampled_from([(), ("sync",), ("nosync",)]))
        if draw(st.booleans()):
            legs.append(LegConfig(nr, path, "core", (str(region), *sync)))
        else:
            legs.append(LegConfig(nr, path, "disk", (path + "_log", str(region), *sync)))
    return DeviceConfig(draw(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)),
                        draw(st.integers(0, (1 << 32) - 1)), tuple(legs),
                        draw(st.integers(0, 1 << 40)), draw(st.integers(1 << 10, 1 << 40)))


@given(device_configs())
@settings(max_examples=300, deadline=None)
def test_device_table_output_parses_back_to_the_same_config(cfg: DeviceConfig) -> None:
    assert parse_device(cfg.line()) == cfg
