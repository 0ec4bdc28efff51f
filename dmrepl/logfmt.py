"""One log format for both daemons (``dmrepl daemon``, ``ulogd run``).

* stderr is the journal (``JOURNAL_STREAM`` names stderr's device and inode, as
  systemd sets it): ``<N>`` syslog priority prefixes, no timestamps (the journal
  stamps and ranks each line itself);
* otherwise: ``2026-12-03T19:03:13.123456Z PROGRAM[PID] LEVEL LOGGER: MESSAGE``,
  the time in UTC like the event stream's.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from dmrepl.eventlog import iso_utc

#: ``--log-level`` choices.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

#: syslog priorities (sd-daemon(3): ``<N>`` line prefixes) by logging level.
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                   logging.ERROR: 3, logging.CRITICAL: 2}


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal (``JOURNAL_STREAM``
    is ``DEVICE:INODE`` of it; a stream redirected elsewhere keeps the variable but
    is not the journal)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__(f"{program}: %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < 30 else 3)
        # every line of a multi-line message (a traceback) keeps the priority
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).split("\n"))


class StampedFormatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__(f"%(asctime)s {program}[%(process)d] %(levelname)s %(name)s: "
                         "%(message)s")

    def formatTime(self, record: logging.LogRecord,
                   datefmt: str | None = None) -> str:
        del datefmt
        return iso_utc(record.created)


def setup_logging(program: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at ``level`` (one of :data:`LOG_LEVELS`) in the
    format for where it goes; replaces any handler set before."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(JournalFormatter(program) if stderr_is_journal(out)
                         else StampedFormatter(program))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
