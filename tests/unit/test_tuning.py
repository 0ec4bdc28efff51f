"""``dmrepl daemon --tuning``: typed, bounded, and the same keys as the engine's."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields, replace

import pytest

from dmrepl.errors import UserError
from dmrepl.replicator import Replicator
from dmrepl.tuning import TUNABLES, Tuning, parse_tuning


def test_every_knob_is_an_engine_keyword_and_back() -> None:
    """The engine's knobs are the fields of Tuning, each declared with its bounds
    and meaning, its default of the declared type and within its bounds; each one
    is a keyword argument of the engine."""
    knobs = fields(Tuning)
    assert set(TUNABLES) == {f.name for f in knobs}
    for f in knobs:  # and of the engine's type
        t = TUNABLES[f.name]
        assert type(f.default) is t.kind, f.name
        assert t.minimum <= f.default and (t.maximum is None or f.default <= t.maximum)
        assert t.meaning
    params = inspect.signature(Replicator.__init__).parameters
    assert params["tuning"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        replace(Tuning(), no_such_knob=1)  # type: ignore[call-arg]


def test_values_are_typed() -> None:
    got = parse_tuning(["retry_interval=1.5", "copy_inflight=16", "durable_acks=0",
                        " coalesce_delay = 0 "])
    assert got == {"retry_interval": 1.5, "copy_inflight": 16, "durable_acks": False,
                   "coalesce_delay": 0.0}
    assert type(got["copy_inflight"]) is int and type(got["durable_acks"]) is bool


@pytest.mark.parametrize("item,message", [
    ("retry_interval", "KEY=VALUE"),
    ("=3", "KEY=VALUE"),
    ("no_such_knob=1", "unknown tuning key 'no_such_knob'; known: "),
    ("copy_inflight=8.5", "tuning copy_inflight '8.5': not a whole number"),
    ("copy_inflight=0", "tuning copy_inflight '0': must be 1..1024"),
    ("durable_acks=2", "tuning durable_acks '2': must be 0..1"),
    ("persist_interval=soon", "tuning persist_interval 'soon': not a decimal number"),
    ("full_grace=-1", "tuning full_grace '-1': not a decimal number (it takes no sign)"),
])
def test_bad_values_are_refused_by_name(item: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_tuning([item])


def test_parsed_tuning_builds_an_engine(tmp_path) -> None:
    log = tmp_path / "log"
    log.write_bytes(bytes(4 << 20))
    rep = Replicator.from_table(f"0 1 replicator ringbuffer 4 {log} 0 create 8192 "
                                "blockdev 2 0 async",
                                **parse_tuning(["copy_inflight=2", "durable_acks=0",
                                                "cache_bytes=1048576"]))
    try:
        assert rep.tuning.copy_inflight == 2 and rep.tuning.durable_acks is False
    finally:
        rep.close()


def test_daemon_refuses_bad_tuning_before_starting(tmp_path, capsys) -> None:
    from dmrepl.cli.main import run
    state = tmp_path / "state"
    code = run()(["--socket", str(tmp_path / "sock"), "daemon", "--state-dir", str(state),
                  "--tuning", "copy_inflight=2.5"])
    err = capsys.readouterr().err
    assert code == 3, err  # invalid argument
    assert err.strip() == ("dmrepl: error: invalid tuning copy_inflight '2.5': not a "
                           "whole number")
    assert not state.exists()  # nothing was started


def test_daemon_help_lists_every_knob_with_default_and_meaning() -> None:
    """`dmrepl daemon --help` says what each --tuning key means and its default."""
    import contextlib
    import io

    import pytest as _pytest

    from dmrepl.cli._parser import gen_parser
    from dmrepl.tuning import TUNABLES, Tuning

    out = io.StringIO()
    with contextlib.redirect_stdout(out), _pytest.raises(SystemExit):
        gen_parser().parse_args(["daemon", "--help"])
    text = " ".join(out.getvalue().split())
    for key, knob in TUNABLES.items():
        default = getattr(Tuning(), key)
        shown = str(int(default)) if isinstance(default, bool) else (
            f"{default:g}" if isinstance(default, float) else str(default))
        assert f"{key}={shown} (" in text, key
        assert " ".join(knob.meaning.split()) in text, key
