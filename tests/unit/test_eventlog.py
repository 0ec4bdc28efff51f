"""The event log (dmrepl/eventlog.py) and the daemons' log format (dmrepl/logfmt.py)."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import pytest

from dmrepl.eventlog import EventLog, log_events
from dmrepl.logfmt import setup_logging

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_events_are_numbered_and_stamped_in_utc_with_microseconds() -> None:
    log = EventLog(clock=iter([100.0, 100.5]).__next__)
    sub = log.subscribe()
    log.emit("change", "link-down", "slink", name="rep", slink=1)
    log.emit("change", "link-up", "slink", name="rep", slink=1)
    got = sub.read(0)
    assert got is not None
    assert [(e["seq"], e["event"], e["slink"]) for e in got] == [
        (1, "link-down", 1), (2, "link-up", 1)]
    assert [e["time"] for e in got] == ["1970-01-01T00:01:40.000000Z",
                                        "1970-01-01T00:01:40.500000Z"]
    assert all(ISO.match(e["time"]) for e in got)


def test_time_never_goes_backwards_when_the_clock_does() -> None:
    log = EventLog(clock=iter([200.0, 150.0]).__next__)
    first = log.emit("change", "a", "x")
    second = log.emit("change", "b", "x")
    assert second["time"] == first["time"] and second["seq"] == first["seq"] + 1


def test_a_reader_too_slow_gets_a_lost_marker_and_the_emitter_never_waits() -> None:
    log = EventLog(capacity=4)
    sub = log.subscribe()
    for i in range(10):                     # nobody reads: emit carries on
        log.emit("change", "e", "x", i=i)
    got = sub.read(0)
    assert got is not None
    assert got[0]["kind"] == "lost" and got[0]["count"] == 6
    assert [e["i"] for e in got[1:]] == [6, 7, 8, 9]
    log.emit("change", "e", "x", i=10)      # in step again: no marker
    assert [e["i"] for e in sub.read(0) or []] == [10]


def test_a_subscriber_sees_only_what_follows_and_ends_with_the_log() -> None:
    log = EventLog()
    log.emit("change", "before", "x")
    sub = log.subscribe()
    assert sub.read(0) == []
    log.emit("change", "after", "x")
    log.close()
    assert [e["event"] for e in sub.read(0) or []] == ["after"]
    assert sub.read(0) is None


def test_events_are_logged_at_their_level() -> None:
    log = EventLog()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.eventlog")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Keep())
    thread = log_events(log, logger)
    for name in ("link-down", "link-up", "forced-sync-on", "forced-sync-off",
                 "resync-start", "resync-end", "lost-writes", "device-add",
                 "device-remove"):
        log.emit("change", name, "slink", name="rep", slink=1)
    log.close()
    thread.join()
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "link-down object=slink name=rep slink=1"),
        ("INFO", "link-up object=slink name=rep slink=1"),
        ("WARNING", "forced-sync-on object=slink name=rep slink=1"),
        ("INFO", "forced-sync-off object=slink name=rep slink=1"),
        ("INFO", "resync-start object=slink name=rep slink=1"),
        ("INFO", "resync-end object=slink name=rep slink=1"),
        ("ERROR", "lost-writes object=slink name=rep slink=1"),
        ("INFO", "device-add object=slink name=rep slink=1"),
        ("INFO", "device-remove object=slink name=rep slink=1")]


@pytest.fixture
def restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def _logged(stream: io.TextIOBase | object, level: str) -> None:
    setup_logging("prog", level, stream)   # type: ignore[arg-type]
    logging.getLogger("dmrepl.x").warning("link down")
    logging.getLogger("dmrepl.x").info("link up")
    logging.getLogger("dmrepl.x").debug("detail")


def test_log_lines_are_stamped_when_stderr_is_not_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_root_logger: object) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")      # another stream is the journal
    with open(tmp_path / "err", "w+") as f:
        _logged(f, "info")
        f.seek(0)
        lines = f.read().splitlines()
    assert len(lines) == 2
    assert re.match(rf"^\S+Z prog\[{os.getpid()}\] WARNING dmrepl.x: link down$", lines[0])
    assert ISO.match(lines[0].split()[0])
    assert lines[1].endswith("INFO dmrepl.x: link up")


def test_log_lines_carry_syslog_priorities_and_no_time_for_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_root_logger: object) -> None:
    with open(tmp_path / "err", "w+") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        _logged(f, "debug")
        f.seek(0)
        lines = f.read().splitlines()
    assert lines == ["<4>prog: WARNING dmrepl.x: link down",
                     "<6>prog: INFO dmrepl.x: link up",
                     "<7>prog: DEBUG dmrepl.x: detail"]


def test_an_unknown_log_level_is_refused(restore_root_logger: object) -> None:
    with pytest.raises(ValueError, match="not one of debug, info"):
        setup_logging("prog", "loud", io.StringIO())
