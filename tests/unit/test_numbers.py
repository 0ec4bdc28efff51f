"""Numbers of any size are a clear error: the one number parser, in every place
a number is read from text (tables, messages, tuning, CLI and ulogd arguments)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl.cli.main import run
from dmrepl.daemon.daemon import parse_table
from dmrepl.dirtylog import parse_devnum, parse_dirty_log_args
from dmrepl.dm.table import DeviceRef, Table
from dmrepl.errors import UserError
from dmrepl.numbers import MAX_DIGITS, parse_decimal, parse_int
from dmrepl.replicator import MessageError, Replicator, TableError
from dmrepl.replicator.table import parse_device, parse_fallbehind, parse_rate, parse_replicator
from dmrepl.tuning import parse_tuning
from dmrepl_testing.replicator import FakeStore, StoreSet
from ulogd import protocol as p
from ulogd.main import build_parser
from ulogd.server import Dispatcher

HUGE = "7" * 5000          # past Python's 4300-digit int() limit
LONG = "1" * (MAX_DIGITS + 1)  # the shortest number the parser refuses by length


def assert_clear(err: BaseException, names: str) -> None:
    """The error every bad number gets: a UserError, one short line, naming the
    argument, never the bare ValueError of int()."""
    text = str(err)
    assert isinstance(err, UserError), repr(err)
    assert "\n" not in text and len(text) < 300, text
    assert names in text, text
    assert "4300" not in text and "Exceeds the limit" not in text, text


@pytest.mark.parametrize("text", [HUGE, LONG])
def test_parse_int_bounds_digits_before_converting(text: str) -> None:
    with pytest.raises(UserError) as ei:
        parse_int(text, "widget count")
    assert_clear(ei.value, "invalid widget count")
    assert "digits, too large" in str(ei.value)


@pytest.mark.parametrize("text,value", [("0", 0), ("007", 7), ("4k", 4096),
                                        ("4K", 4096), ("1" * MAX_DIGITS, int("1" * MAX_DIGITS))])
def test_parse_int_accepts(text: str, value: int) -> None:
    assert parse_int(text, "x", hi=None, units={"k": 1024}) == value


@pytest.mark.parametrize("text,reason", [
    ("", "not a decimal number"), ("-1", "takes no sign"), ("+1", "takes no sign"),
    ("1.5", "not a whole number"), ("0x10", "not a decimal number"),
    ("1_000", "not a decimal number"), (" 1", "not a decimal number"),
    ("\u0661", "not a decimal number"), ("5q", "unknown unit 'q'"), ("11", "must be 0..10"),
])
def test_parse_int_refuses(text: str, reason: str) -> None:
    with pytest.raises(UserError, match=reason):
        parse_int(text, "x", hi=10, units={"k": 1024})


@pytest.mark.parametrize("text", [HUGE, HUGE + ".5", "nan", "inf", "1e3", ".", "-0.5"])
def test_parse_decimal_refuses(text: str) -> None:
    with pytest.raises(UserError) as ei:
        parse_decimal(text, "delay")
    assert_clear(ei.value, "invalid delay")


def test_parse_decimal_accepts() -> None:
    assert [parse_decimal(t, "x") for t in ("1", "1.5", ".25", "2.")] == [1, 1.5, .25, 2]


# -- every place a number is parsed -----------------------------------------------

REP = "0 1 replicator ringbuffer 4 /l 0 auto 4096 blockdev 2 0 async"
TABLE_CASES: list[tuple[Callable[[str], object], str, str]] = [
    (parse_replicator, f"0 1 replicator ringbuffer 4 /l {HUGE} auto 4096 blockdev 1 0",
     "replog dev_start"),
    (parse_replicator, f"0 1 replicator ringbuffer 4 /l 0 auto {HUGE} blockdev 1 0",
     "replog size"),
    (parse_replicator, f"0 {HUGE} replicator ringbuffer 2 /l 0 blockdev 1 0", "length"),
    (parse_replicator, f"0 1 replicator ringbuffer {HUGE} /l 0 blockdev 1 0",
     "replication log parameter count"),
    (parse_replicator, f"{REP} blockdev {HUGE} 1", "site link parameter count"),
    (parse_replicator, f"{REP} blockdev 2 {HUGE} async", "site link number"),
    (parse_replicator, f"{REP} blockdev 4 1 async ios {HUGE}", "fall-behind value for ios"),
    (parse_replicator, f"{REP} blockdev 4 1 async size {HUGE}m",
     "fall-behind value for size"),
    (parse_replicator, f"{REP} blockdev 3 1 async timeout={HUGE}",
     "fall-behind value for timeout"),
    (parse_replicator, f"{REP} blockdev 4 1 async resync_rate {HUGE}k", "resync rate"),
    (parse_device, f"0 {HUGE} replicator-dev r 0 0 1 /a nolog 0", "length"),
    (parse_device, f"{HUGE} 8 replicator-dev r 0 0 1 /a nolog 0", "start"),
    (parse_device, f"0 8 replicator-dev r {HUGE} 0 1 /a nolog 0", "device number"),
    (parse_device, f"0 8 replicator-dev r 0 {HUGE} 1 /a nolog 0", "site link number"),
    (parse_device, f"0 8 replicator-dev r 0 0 {HUGE} /a nolog 0", "device parameter count"),
    (parse_device, f"0 8 replicator-dev r 0 0 1 /a nolog {HUGE}", "dirty log parameter count"),
    (parse_device, f"0 8 replicator-dev r 0 0 1 /a nolog 0 1 1 /b core 1 {HUGE}",
     "region size"),
    (lambda t: parse_fallbehind("timeout", t), f"{HUGE}s", "fall-behind value for timeout"),
    (parse_rate, HUGE, "resync rate"),
    (Table.parse, f"0 {HUGE} zero", "length"),
    (Table.parse, f"{HUGE} 8 zero", "start"),
    (DeviceRef.parse, f"{HUGE}:0", "device major"),
    (parse_table, f"0 {HUGE} replicator x", "table line 1: length"),
    (lambda t: parse_dirty_log_args("core", [t], 1 << 20), HUGE, "region size"),
    (parse_devnum, f"1:{HUGE}", "device minor"),
    (lambda t: parse_tuning([f"copy_inflight={t}"]), HUGE, "tuning copy_inflight"),
    (lambda t: parse_tuning([f"retry_interval={t}"]), HUGE, "tuning retry_interval"),
    (lambda t: parse_tuning([f"retry_interval={t}"]), "nan", "tuning retry_interval"),
]


@pytest.mark.parametrize("parse,text,names", TABLE_CASES,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(TABLE_CASES)])
def test_a_huge_number_anywhere_is_the_one_line_error_naming_it(
        parse: Callable[[str], object], text: str, names: str) -> None:
    with pytest.raises(UserError) as ei:
        parse(text)
    assert_clear(ei.value, names)
    if parse in (parse_replicator, parse_device):
        assert isinstance(ei.value, TableError)


@pytest.fixture
def rep() -> Replicator:
    stores = StoreSet()
    for name, size in (("log", 8 << 20), ("l0", 1 << 20), ("r1", 1 << 20)):
        stores.add(FakeStore(size, name=name))
    r = Replicator.from_table("0 1 replicator ringbuffer 4 log 0 create 8192 "
                              "blockdev 2 0 async blockdev 2 1 async", opener=stores.open)
    r.add_device("0 2048 replicator-dev rep 0 0 1 l0 nolog 0 1 1 r1 core 2 8 nosync")
    yield r
    r.close()


@pytest.mark.parametrize("argv,names", [
    (["slink", "message", HUGE, "policy", "sync"], "site link number"),
    (["slink", "del", HUGE], "site link number"),
    (["slink", "add", "blockdev", "2", HUGE, "async"], "site link number"),
    (["slink", "message", "1", "fallbehind", "ios", HUGE], "fall-behind value for ios"),
    (["slink", "message", "1", "fallbehind", f"size={HUGE}k"], "fall-behind value for size"),
    (["slink", "message", "1", "resync_rate", HUGE], "resync rate"),
    (["replog", "resize", HUGE], "replog size"),
])
def test_a_huge_number_in_a_replicator_message(rep: Replicator, argv: list[str],
                                               names: str) -> None:
    before = rep.status("table")
    with pytest.raises(MessageError) as ei:
        rep.message(argv)
    assert_clear(ei.value, names)
    assert rep.status("table") == before


@pytest.mark.parametrize("argv,names", [
    (["device", "del", HUGE], "site link number"),
    (["device", "add", "rep", HUGE, "1", "1", "r1", "core", "1", "8"], "device number"),
    (["device", "add", "rep", "0", "2", "1", "/x", "core", "1", HUGE], "region size"),
])
def test_a_huge_number_in_a_device_message(rep: Replicator, argv: list[str],
                                           names: str) -> None:
    dev = rep.devices[0]
    before = dev.table()
    with pytest.raises(MessageError) as ei:
        dev.message(argv)
    assert_clear(ei.value, names)
    assert dev.table() == before


@pytest.mark.parametrize("argv,names", [
    (["message", "vol", HUGE, "ping"], "sector"),
    (["wait", "vol", HUGE], "event_nr"),
    (["wait", "vol", "--timeout", HUGE], "--timeout"),
    (["wait", "vol", "--timeout", "nan"], "--timeout"),
    (["remove", "vol", "--wait", HUGE], "--wait"),
    (["daemon", "--tuning", f"batch_entries={HUGE}"], "tuning batch_entries"),
])
def test_a_huge_number_on_the_command_line_is_an_invalid_argument(
        argv: list[str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run()(["--socket", str(tmp_path / "no-daemon"), *argv])
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID, err
    assert err.startswith("dmrepl: error: invalid ") and err.count("\n") == 1, err
    assert names in err and len(err) < 300, err


def test_a_huge_number_for_ulogd_realtime_is_a_usage_error_naming_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["run", "--realtime", HUGE])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "invalid --realtime '777777777777'... (5000 characters)" in err, err


def test_a_huge_target_length_in_a_ulogd_ctr_is_einval_with_a_clear_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = Dispatcher()
    ctr = p.encode_request(0, 1, b"U" * 8, p.RequestType.CTR, f"{HUGE} core 64".encode())
    with caplog.at_level(logging.ERROR, logger="ulogd"):
        replies = dispatcher.handle_batch([ctr])
    assert len(replies) == 1
    assert "invalid target length (sectors)" in caplog.text, caplog.text
    assert "Exceeds the limit" not in caplog.text
