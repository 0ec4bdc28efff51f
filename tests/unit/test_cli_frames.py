"""Control-socket frame codec and the CLI's error funnel / exit codes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.cli._error_reporting import interpret
from dmrepl.cli._exit import ExitCode
from dmrepl.cli.main import run
from dmrepl.daemon._proto import ControlError, FrameDecoder, FrameError, encode
from dmrepl.daemon.client import DaemonUnreachable
from dmrepl.daemon.daemon import parse_table
from dmrepl.errors import UserError

FRAMES = [{"op": "ping"}, {"op": "create", "name": "r", "table": "0 8 replicator x"},
          {"ok": True, "result": ["é", 1]}]


def test_roundtrip_whole_bytewise_trailing() -> None:
    raw = b"".join(encode(f) for f in FRAMES)
    assert FrameDecoder().feed(raw) == FRAMES
    dec, got = FrameDecoder(), []
    for i in range(len(raw)):
        got += dec.feed(raw[i:i + 1])
    assert got == FRAMES and dec.pending == 0
    dec = FrameDecoder()
    assert dec.feed(raw + encode(FRAMES[0])[:3]) == FRAMES and dec.pending == 3


@settings(deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=20), max_size=5))
def test_any_object_roundtrips(obj: dict[str, object]) -> None:
    assert FrameDecoder().feed(encode(obj)) == [obj]


@pytest.mark.parametrize("raw,match", [
    (struct.pack(">I", 1 << 30), "exceeds"),
    (struct.pack(">I", 3) + b"{{{", "not JSON"),
    (struct.pack(">I", 2) + b"[]", "not a JSON object"),
    (struct.pack(">I", 2) + b"\xff\xfe", "not JSON"),
])
def test_bad_frames(raw: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        FrameDecoder().feed(raw)


@pytest.mark.parametrize("err,code", [
    (ControlError("user", "bad table"), ExitCode.INVALID),
    (ControlError("notfound", "x"), ExitCode.NOT_FOUND),
    (ControlError("busy", "x"), ExitCode.BUSY),
    (ControlError("exists", "x"), ExitCode.EXISTS),
    (ControlError("timeout", "x"), ExitCode.TIMEOUT),
    (ControlError("runtime", "x"), ExitCode.ERROR),
    (DaemonUnreachable("/x", "No such file"), ExitCode.NO_DAEMON),
    (UserError("bad"), ExitCode.INVALID),
    (FileNotFoundError(2, "No such file or directory", "/t"), ExitCode.ERROR),
    (ZeroDivisionError("boom"), ExitCode.INTERNAL),
])
def test_interpret(err: Exception, code: ExitCode) -> None:
    got, message = interpret(err)
    assert got == code and "\n" not in message


def test_cause_chain_is_walked() -> None:
    try:
        try:
            raise ControlError("busy", "in use")
        except ControlError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert interpret(outer) == (ExitCode.BUSY, "in use")


def test_no_daemon_is_one_line_and_propagate_raises(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    sock = str(tmp_path / "none.sock")
    assert run()(["--socket", sock, "ls"]) == ExitCode.NO_DAEMON
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dmrepl: error: cannot reach")
    with pytest.raises(DaemonUnreachable):
        run()(["--socket", sock, "--propagate", "ls"])


def test_unreadable_table_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = run()(["--socket", str(tmp_path / "s"), "create", "x", str(tmp_path / "missing")])
    assert code == ExitCode.INVALID
    assert "cannot read table file" in capsys.readouterr().err


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        run()(["message", "x"])
    assert exc.value.code == ExitCode.USAGE


def test_help_documents_exit_codes(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        run()(["--help"])
    out = capsys.readouterr().out
    for code in ExitCode:
        assert code.name in out


@pytest.mark.parametrize("table,match", [
    ("", "empty table"),
    ("0 x replicator a", "integers"),
    ("0 8", "expected"),
    ("0 8 linear /dev/sda 0", "unsupported target"),
    ("0 8 replicator a\n0 8 replicator b", "exactly one line"),
    ("0 8 replicator-dev r 0\n0 8 replicator a", "one target type"),
    ("0 8 replicator-dev r 0\n16 8 replicator-dev r 1", "tile"),
])
def test_parse_table_rejects(table: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        parse_table(table)


def test_parse_table_multi_line_and_comments() -> None:
    lines = parse_table("# two halves\n0 8 replicator-dev r 0 x\n\n8 8 replicator-dev r 1 y\n")
    assert [(x.start, x.length, x.params[:2]) for x in lines] == [(0, 8, ["r", "0"]),
                                                                  (8, 8, ["r", "1"])]
