"""The replicator's state machines, as transition tables.

Rules / theory of operation
---------------------------
Rule 1: every state a site link or a device is in lives in one
:class:`StateMachine`, and changes only by firing an *event* through its table
(``TABLE[state][event] -> new state``).  An event that the table does not list for
the current state is a bug in the caller: :meth:`StateMachine.fire` raises
:class:`IllegalTransition` and changes nothing.  Self-transitions that the engine
relies on (a second ``suspend``, another I/O error on a link that is already down)
are listed explicitly.

Rule 2: the machines are independent of each other; the engine combines them.  A
site link has three, because their changes are independent in time:

* **link** (``LINK_TRANSITIONS``): ``up`` while its devices take copies; an I/O
  error on one of them takes it ``down``; a periodic test read (every
  ``retry_interval``) that succeeds on every failed device brings it back ``up``,
  and the copier resumes at the position it had reached.
* **ack mode** (``ACK_TRANSITIONS``): an async link is ``async`` while its lag is
  within its fall-behind threshold, ``forced_sync`` past it (new writes then wait
  for it, as for a sync link) until it is back under; when the ring runs full and
  its entries are dropped to the dirty logs it has no lag left, so a drop releases
  forced sync.  Sync links stay ``async`` here: their policy holds the acks.
* **resync** (``RESYNC_TRANSITIONS``): ``idle`` or ``resyncing`` (copying regions
  its dirty logs mark out of sync from the local devices: after a drop, for a new
  device, after a ``sync`` dirty log create).  Resync runs only while the link has
  no log entries outstanding, region by region, at most at its ``resync_rate``.

A replicated device (``DEVICE_TRANSITIONS``) is ``running``; ``suspend`` holds its
new I/O and its copies (``suspended``) until ``resume``; ``remove`` (or closing the
replicator) ends it (``removed``: nothing leaves that state).

Theory: the tables are the documentation.  ``tools/state-diagrams`` renders them
(Graphviz dot); the unit tests check that every state is reachable from the
initial one and that the engine's flags follow the machines.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

# state -> event -> new state (keys: the enums below; Any: Mapping keys are invariant)
Table = Mapping[Any, Mapping[Any, Any]]


class IllegalTransition(RuntimeError):
    """An event fired in a state whose table row does not list it (a bug)."""


class LinkState(enum.Enum):
    UP = "up"
    DOWN = "down"


class LinkEvent(enum.Enum):
    IO_ERROR = "io_error"
    RETRY_OK = "retry_ok"


class AckState(enum.Enum):
    ASYNC = "async"
    FORCED_SYNC = "forced_sync"


class AckEvent(enum.Enum):
    OVER_THRESHOLD = "over_threshold"
    UNDER_THRESHOLD = "under_threshold"
    DROPPED = "dropped"


class ResyncState(enum.Enum):
    IDLE = "idle"
    RESYNCING = "resyncing"


class ResyncEvent(enum.Enum):
    REGION_STARTED = "region_started"
    ALL_IN_SYNC = "all_in_sync"


class DeviceState(enum.Enum):
    RUNNING = "running"
    SUSPENDED = "suspended"
    REMOVED = "removed"


class DeviceEvent(enum.Enum):
    SUSPEND = "suspend"
    RESUME = "resume"
    REMOVE = "remove"


class Job(enum.Enum):
    """What a site link's copier does next (chosen by ``Copiers.next_job_locked``,
    in this order of priority)."""

    EXIT = "exit"  # the site link is closing
    DROP = "drop"  # ring full: its outstanding entries go to the dirty logs
    RETRY = "retry"  # it is down: probe its failed devices
    PERSIST = "persist"  # flush its devices and write its position to the ring header
    FLUSH = "flush"  # a write waits for its copies to be durable
    COMMIT = "commit"  # make written log entries durable (nobody else does it now)
    BATCH = "batch"  # apply the next entries, epoch by epoch
    RESYNC = "resync"  # copy one out-of-sync region from the local device


LINK_TRANSITIONS: dict[LinkState, dict[LinkEvent, LinkState]] = {
    LinkState.UP: {
        LinkEvent.IO_ERROR: LinkState.DOWN,
    },
    LinkState.DOWN: {
        LinkEvent.IO_ERROR: LinkState.DOWN,  # another device of the link failed too
        LinkEvent.RETRY_OK: LinkState.UP,
    },
}

ACK_TRANSITIONS: dict[AckState, dict[AckEvent, AckState]] = {
    AckState.ASYNC: {
        AckEvent.OVER_THRESHOLD: AckState.FORCED_SYNC,
        AckEvent.DROPPED: AckState.ASYNC,
    },
    AckState.FORCED_SYNC: {
        AckEvent.UNDER_THRESHOLD: AckState.ASYNC,
        AckEvent.DROPPED: AckState.ASYNC,
    },
}

RESYNC_TRANSITIONS: dict[ResyncState, dict[ResyncEvent, ResyncState]] = {
    ResyncState.IDLE: {
        ResyncEvent.REGION_STARTED: ResyncState.RESYNCING,
    },
    ResyncState.RESYNCING: {
        ResyncEvent.REGION_STARTED: ResyncState.RESYNCING,
        ResyncEvent.ALL_IN_SYNC: ResyncState.IDLE,
    },
}

DEVICE_TRANSITIONS: dict[DeviceState, dict[DeviceEvent, DeviceState]] = {
    DeviceState.RUNNING: {
        DeviceEvent.SUSPEND: DeviceState.SUSPENDED,
        DeviceEvent.RESUME: DeviceState.RUNNING,
        DeviceEvent.REMOVE: DeviceState.REMOVED,
    },
    DeviceState.SUSPENDED: {
        DeviceEvent.SUSPEND: DeviceState.SUSPENDED,
        DeviceEvent.RESUME: DeviceState.RUNNING,
        DeviceEvent.REMOVE: DeviceState.REMOVED,
    },
    DeviceState.REMOVED: {},
}

# name -> (table, initial state): what tools/state-diagrams draws
MACHINES: dict[str, tuple[Table, enum.Enum]] = {
    "site link: link": (LINK_TRANSITIONS, LinkState.UP),
    "site link: ack mode": (ACK_TRANSITIONS, AckState.ASYNC),
    "site link: resync": (RESYNC_TRANSITIONS, ResyncState.IDLE),
    "device": (DEVICE_TRANSITIONS, DeviceState.RUNNING),
}


class StateMachine:
    """One machine: a table and a current state (callers hold the engine lock)."""

    __slots__ = ("name", "state", "table")

    def __init__(self, name: str, table: Table, initial: enum.Enum) -> None:
        if initial not in table:
            raise ValueError(f"{name}: initial state {initial.value} not in the table")
        self.name = name
        self.table = table
        self.state = initial

    def fire(self, event: enum.Enum) -> enum.Enum:
        """Apply ``event``; return the new state.  Raises IllegalTransition."""
        new = self.table[self.state].get(event)
        if new is None:
            raise IllegalTransition(f"{self.name}: event {event.value!r} is not allowed in "
                                    f"state {self.state.value!r}")
        self.state = new
        return new

    def can(self, event: enum.Enum) -> bool:
        return event in self.table[self.state]

    def __repr__(self) -> str:
        return f"<{self.name}: {self.state.value}>"


def machine(name: str) -> StateMachine:
    """A new machine of the kind ``name`` (a key of MACHINES) in its initial state."""
    table, initial = MACHINES[name]
    return StateMachine(name, table, initial)


def dot(name: str) -> str:
    """Graphviz dot text of one machine."""
    table, initial = MACHINES[name]
    ident = "".join(c if c.isalnum() else "_" for c in name)
    lines = [f"digraph {ident} {{", f'  label="{name}"; labelloc=t; rankdir=LR;',
             '  node [shape=box, style=rounded];', '  start [shape=point];',
             f'  start -> "{initial.value}";']
    for state, row in table.items():
        lines.append(f'  "{state.value}";')
        for event, new in row.items():
            lines.append(f'  "{state.value}" -> "{new.value}" [label="{event.value}"];')
    lines.append("}")
    return "\n".join(lines)
