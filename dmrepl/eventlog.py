"""A bounded in-memory log of state changes, read by any number of subscribers.

Rules / theory of operation
---------------------------
* :meth:`EventLog.emit` never blocks on a reader: it appends one event (a JSON
  object: ``seq``, ``time``, ``kind``, ``event``, ``object`` and the event's own
  fields) to a ring of at most ``capacity`` events and wakes the readers.  The
  engine calls it holding its own lock, so it does no I/O.
* ``seq`` increases by one per event and ``time`` is ISO 8601 UTC with
  microseconds (``drbdsetup events2 --timestamps``); a reader that falls more
  than ``capacity`` events behind gets one ``{"kind": "lost", "count": N}``
  marker in their place, never back-pressure on the emitter.
* ``kind`` is ``exists`` (the current state, for ``events --now``), ``change``,
  ``create``, ``destroy`` or ``error``; ``event`` names what happened
  (:data:`LEVELS` gives the log level of each).
"""

from __future__ import annotations

import collections
import datetime
import logging
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

#: Events kept for readers that fall behind.
EVENT_CAPACITY = 4096

#: The log level of each event name (an event not listed: INFO).
LEVELS: dict[str, int] = {
    "link-down": logging.WARNING,
    "link-up": logging.INFO,
    "forced-sync-on": logging.WARNING,
    "forced-sync-off": logging.INFO,
    "resync-start": logging.INFO,
    "resync-progress": logging.DEBUG,
    "resync-end": logging.INFO,
    "lost-writes": logging.ERROR,
    "io-error": logging.ERROR,
    "replog-failed": logging.ERROR,
    "entries-dropped": logging.WARNING,
    "device-add": logging.INFO,
    "device-remove": logging.INFO,
    "lost": logging.WARNING,
    "refused": logging.WARNING,
}


def iso_utc(epoch: float) -> str:
    """``epoch`` as ISO 8601 UTC with microseconds (``2026-12-03T19:03:13.123456Z``)."""
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def describe(event: dict[str, Any]) -> str:
    """One log line for an event: its name, then its fields as key=value."""
    skip = {"seq", "time", "kind", "event"}
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    what = event.get("event") or event.get("kind")
    return f"{what} {fields}".rstrip()


class EventLog:
    """The ring of recent events; see the module docstring."""

    def __init__(self, capacity: int = EVENT_CAPACITY,
                 clock: Callable[[], float] | None = None) -> None:
        self.capacity = capacity
        self._clock = clock or time.time
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._last_seq = 0
        self._last_time = 0.0
        self.closed = False

    def emit(self, kind: str, event: str, obj: str, **fields: Any) -> dict[str, Any]:
        """Append one event; return it (with its ``seq`` and ``time``)."""
        with self._cond:
            # never backwards, even if the wall clock is set back
            now = self._last_time = max(self._clock(), self._last_time)
            self._last_seq += 1
            record = {"seq": self._last_seq, "time": iso_utc(now), "kind": kind,
                      "event": event, "object": obj, **fields}
            self._events.append(record)
            self._cond.notify_all()
        return record

    def stamp(self, kind: str, event: str, obj: str, **fields: Any) -> dict[str, Any]:
        """An event with this log's clock and sequence that is not kept (the
        current state for one reader)."""
        with self._cond:
            now = self._last_time = max(self._clock(), self._last_time)
            return {"seq": self._last_seq, "time": iso_utc(now), "kind": kind,
                    "event": event, "object": obj, **fields}

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._last_seq

    def close(self) -> None:
        """No more events: readers get what is left, then the end."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def subscribe(self, after: int | None = None) -> Subscription:
        """A reader of the events emitted from now on (``after``: of those after
        that sequence number, as far as they are still kept; 0: all kept)."""
        return Subscription(self, self.last_seq if after is None else after)

    def _read(self, after: int, timeout: float | None) -> tuple[list[dict[str, Any]], int]:
        with self._cond:
            self._cond.wait_for(lambda: self._last_seq > after or self.closed, timeout)
            new = [e for e in self._events if e["seq"] > after]
            if self._last_seq > after and (not new or new[0]["seq"] != after + 1):
                first = new[0]["seq"] if new else self._last_seq + 1
                lost = first - after - 1
                new.insert(0, {"seq": first - 1, "time": iso_utc(self._last_time),
                               "kind": "lost", "event": "lost", "object": "-",
                               "count": lost})
            return new, self._last_seq


class Subscription:
    """One reader's place in an :class:`EventLog`."""

    def __init__(self, log: EventLog, after: int) -> None:
        self.log = log
        self.after = after

    def read(self, timeout: float | None = None) -> list[dict[str, Any]] | None:
        """The events since the last read (``[]`` after ``timeout`` seconds
        without one); ``None`` once the log is closed and everything was read."""
        events, last = self.log._read(self.after, timeout)
        self.after = last
        if not events and self.log.closed:
            return None
        return events


def log_events(events: EventLog, logger: logging.Logger) -> threading.Thread:
    """Start a thread that logs every event at its level (:data:`LEVELS`) until
    ``events`` is closed: a subscriber like any other, so a slow log (a stalled
    journal) costs lost events in the log, never a stalled engine."""
    sub = events.subscribe()

    def run() -> None:
        while (batch := sub.read()) is not None:
            for event in batch:
                name = event.get("event") or event["kind"]
                logger.log(LEVELS.get(name, logging.INFO), "%s", describe(event))

    thread = threading.Thread(target=run, name="event-log", daemon=True)
    thread.start()
    return thread


def stdout_reader_gone() -> bool:
    """Whether the reader of our stdout (a pipe) closed its end (POLLERR): an
    events stream idle behind ``| head`` ends then, not at the next event."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
