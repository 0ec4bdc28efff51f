"""Table grammar of replicator / replicator-dev: examples, errors, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.replicator.errors import TableError
from dmrepl.replicator.table import (
    FallBehind,
    ReplicatorConfig,
    ReplogConfig,
    SlinkConfig,
    parse_device,
    parse_fallbehind,
    parse_replicator,
)

SEED_EXAMPLE = ("0 1 replicator ringbuffer 4 /dev/mapper/replog_store 32 auto 65536 "
                "blockdev 4 0 async ios 100 blockdev 4 1 async ios 10000")


def test_seed_example() -> None:
    cfg = parse_replicator(SEED_EXAMPLE)
    assert cfg.replog == ReplogConfig("/dev/mapper/replog_store", 32, "auto", 65536)
    assert [s.slink_nr for s in cfg.slinks] == [0, 1]
    assert cfg.slinks[1].fallbehind == FallBehind("ios", 10000)
    assert not cfg.slinks[0].sync
    assert cfg.params() == SEED_EXAMPLE.split(" ", 3)[3].replace("4 0 async ios 100",
                                                                 "4 0 async ios 100")
    assert parse_replicator(cfg.params()) == parse_replicator(SEED_EXAMPLE).__class__(
        cfg.replog, cfg.slinks, 0, None)


@pytest.mark.parametrize(("kind", "value", "base"), [
    ("size", "200m", 200 * 2048), ("size", "1k", 2), ("size", "3", 3), ("size", "5s", 5),
    ("size", "1G", 2 << 20), ("size", "1t", 2 << 30), ("size", "1p", 2 << 40),
    ("size", "1e", 2 << 50), ("timeout", "5", 5), ("timeout", "5t", 5),
    ("timeout", "2s", 2000), ("timeout", "3m", 180_000), ("timeout", "1h", 3_600_000),
    ("timeout", "1d", 86_400_000), ("ios", "7", 7),
])
def test_units_have_the_documented_meaning(kind: str, value: str, base: int) -> None:
    assert parse_fallbehind(kind, value) == FallBehind(kind, base)


def test_zero_fallbehind_is_off_and_canonical() -> None:
    assert parse_fallbehind("size", "0m") == FallBehind()
    assert not FallBehind().enabled


@pytest.mark.parametrize(("params", "slink"), [
    ("blockdev 1 0", SlinkConfig(0)),
    ("blockdev 2 0 sync", SlinkConfig(0, sync=True)),
    ("blockdev 2 0 synchronous", SlinkConfig(0, sync=True)),
    ("blockdev 2 0 asynchronous+stall", SlinkConfig(0, stall=True)),
    ("blockdev 2 0 stall", SlinkConfig(0, stall=True)),
    ("blockdev 3 0 async ios=12", SlinkConfig(0, fallbehind=FallBehind("ios", 12))),
    ("blockdev 4 0 async timeout 2s", SlinkConfig(0, fallbehind=FallBehind("timeout", 2000))),
])
def test_slink_forms(params: str, slink: SlinkConfig) -> None:
    cfg = parse_replicator(f"ringbuffer 2 /log 0 {params}")
    assert cfg.slinks == (slink,)


BAD_REPLICATOR = [
    ("", "empty"),
    ("1 1 replicator ringbuffer 2 /l 0 blockdev 1 0", "start must be 0"),
    ("raid 2 /l 0 blockdev 1 0", "'raid'"),
    ("ringbuffer 5 /l 0 auto 4096 x blockdev 1 0", "parameter count"),
    ("ringbuffer 1 /l", "parameter count"),
    ("ringbuffer 4 /l 0 auto", "only 3 given"),
    ("ringbuffer 3 /l 0 auto blockdev 1 0", "needs a <size>"),
    ("ringbuffer 3 /l 0 create blockdev 1 0", "needs a <size>"),
    ("ringbuffer 4 /l 0 make 4096 blockdev 1 0", "open type 'make'"),
    ("ringbuffer 4 /l 0 auto 100 blockdev 1 0", "replog size"),
    ("ringbuffer 2 /l x blockdev 1 0", "dev_start"),
    ("ringbuffer 2 /l 0", "no site link"),
    ("ringbuffer 2 /l 0 blockdev 1 1", "first site link must be 0"),
    ("ringbuffer 2 /l 0 blockdev 1 0 blockdev 1 0", "given twice"),
    ("ringbuffer 2 /l 0 net 1 0", "site link type 'net'"),
    ("ringbuffer 2 /l 0 blockdev 7 0 a b c d e f", "site link parameter count"),
    ("ringbuffer 2 /l 0 blockdev 2 0", "only 1 given"),
    ("ringbuffer 2 /l 0 blockdev 2 0 fast", "policy 'fast'"),
    ("ringbuffer 2 /l 0 blockdev 2 0 sync+async", "sync and async together"),
    ("ringbuffer 2 /l 0 blockdev 2 0 sync+sync", "twice"),
    ("ringbuffer 2 /l 0 blockdev 4 0 sync ios 5", "synchronous"),
    ("ringbuffer 2 /l 0 blockdev 4 0 async bytes 5", "fall-behind type 'bytes'"),
    ("ringbuffer 2 /l 0 blockdev 4 0 async size 5q", "for size '5q': unknown unit 'q'"),
    ("ringbuffer 2 /l 0 blockdev 4 0 async ios 5k",
     "for ios '5k': not a decimal number (takes no unit)"),
    ("ringbuffer 2 /l 0 blockdev 4 0 async timeout -1", "fall-behind value"),
    ("ringbuffer 2 /l 0 blockdev 3 0 async ios", "<type>=<value>"),
    ("ringbuffer 2 /l 0 blockdev 1 2048", "site link number"),
]


@pytest.mark.parametrize(("line", "msg"), BAD_REPLICATOR)
def test_bad_replicator_tables_name_the_argument(line: str, msg: str) -> None:
    with pytest.raises(TableError, match=None) as ei:
        parse_replicator(line)
    assert msg in str(ei.value), str(ei.value)


BAD_DEVICE = [
    ("0 8 replicator-dev r 0", "not enough device arguments"),
    ("0 8 replicator-dev r x 0 1 /a nolog 0", "device number"),
    ("0 8 replicator-dev r 0 0 2 /a nolog 0", "exactly 1"),
    ("0 8 replicator-dev r 0 0 1 /a core 1 8", "must use 'nolog 0'"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 1 1 /b nolog 0", "needs a dirty log"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 1 1 /b mirror 0", "dirty log type 'mirror'"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 1 1 /b core 1 3", "not a power of two"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 1 1 /b core 1 16", "dirty log of /b"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 1 1 /b core 3 8", "needs 3 parameters"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 0 1 /b nolog 0", "site link 0 given twice"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 1 1 /a core 1 8", "on two site links"),
    ("0 8 replicator-dev r 0 0 1 /a nolog 0 1 1", "not enough device arguments"),
]


@pytest.mark.parametrize(("line", "msg"), BAD_DEVICE)
def test_bad_device_tables_name_the_argument(line: str, msg: str) -> None:
    with pytest.raises(TableError) as ei:
        parse_device(line)
    assert msg in str(ei.value), str(ei.value)


def test_device_line_round_trip() -> None:
    line = ("0 2048 replicator-dev 253:4 3 0 1 /dev/l nolog 0 1 1 /dev/r core 2 8 sync "
            "2 1 /dev/s disk 3 /dev/log 8 nosync")
    cfg = parse_device(line)
    assert cfg.dev_nr == 3 and cfg.length == 2048
    assert [leg.slink_nr for leg in cfg.legs] == [0, 1, 2]
    assert cfg.legs[2].dlog_args == ("/dev/log", "8", "nosync")
    assert cfg.line() == line
    assert parse_device(cfg.params()).legs == cfg.legs


# -- property: format -> parse is the identity on configurations ----------------

fallbehinds = st.one_of(
    st.just(FallBehind()),
    st.builds(FallBehind, st.just("ios"), st.integers(1, 10**9)),
    st.builds(FallBehind, st.just("size"), st.integers(1, 1 << 50)),
    st.builds(FallBehind, st.just("timeout"), st.integers(1, 10**12)),
)


@st.composite
def replicator_configs(draw: st.DrawFn) -> ReplicatorConfig:
    mode = draw(st.sampled_from([None, "open", "auto", "create"]))
    size = None
    if mode in ("auto", "create") or (mode == "open" and draw(st.booleans())):
        size = draw(st.integers(4096, 1 << 40))
    replog = ReplogConfig(draw(st.from_regex(r"/[a-z0-9_/]{1,20}", fullmatch=True)),
                          draw(st.integers(0, 1 << 40)), mode, size)
    nrs = [0, *sorted(draw(st.sets(st.integers(1, 2047), max_size=5)))]
    slinks = []
    for nr in nrs:
        sync = draw(st.booleans())
        fb = FallBehind() if sync else draw(fallbehinds)
        rate = draw(st.sampled_from([0, 1])) * draw(st.integers(1, 1 << 40)) * 1024
        slinks.append(SlinkConfig(nr, sync, draw(st.booleans()), fb, rate))
    return ReplicatorConfig(replog, tuple(slinks))


@given(replicator_configs())
@settings(max_examples=300, deadline=None)
def test_table_output_parses_back_to_the_same_config(cfg: ReplicatorConfig) -> None:
    assert parse_replicator(cfg.params()) == cfg
    full = parse_replicator(cfg.line())
    assert (full.replog, full.slinks) == (cfg.replog, cfg.slinks)


WORDS = ["ringbuffer", "blockdev", "0", "1", "2", "4", "4096", "auto", "open", "create",
         "async", "sync", "stall", "async+stall", "ios", "size", "timeout", "10k", "5s",
         "ios=3", "/dev/x", "-1", "x", "replicator", "99999999999999999999"]


@given(st.lists(st.sampled_from(WORDS), max_size=14))
@settings(max_examples=500, deadline=None)
def test_random_token_soup_parses_or_raises_table_error(words: list[str]) -> None:
    try:
        cfg = parse_replicator(" ".join(words))
    except TableError:
        return
    assert parse_replicator(cfg.params()) == cfg


@given(st.lists(st.sampled_from(["0", "1", "2", "3", "8", "/a", "/b", "/c", "nolog",
                                 "core", "disk", "sync", "nosync", "r"]), max_size=16))
@settings(max_examples=500, deadline=None)
def test_random_device_lines_parse_or_raise_table_error(words: list[str]) -> None:
    try:
        cfg = parse_device(["0", "64", "replicator-dev", *words])
    except TableError:
        return
    assert parse_device(cfg.line()) == cfg
