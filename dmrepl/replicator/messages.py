"""The message grammar of both targets (``dmsetup message``): the replicator's
(start/stop, slink add|del|message, statistics, replog) and a replicated
device's (device add|del, start/stop).  Each message is checked before it
changes anything: a refused one raises :class:`MessageError` and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from dmrepl.numbers import parse_int
from dmrepl.replicator import replog as replog_types
from dmrepl.replicator import slink as slink_types
from dmrepl.replicator.device import open_legs
from dmrepl.replicator.errors import MessageError, TableError
from dmrepl.replicator.table import (
    parse_legs,
    parse_slinks,
)

if TYPE_CHECKING:
    from dmrepl.replicator.device import ReplicatedDevice
    from dmrepl.replicator.target import Replicator

SECTOR = 512

# The usage of every message, as the errors below quote it; ``dmrepl message --help``
# lists these, so the grammar is written down once.
STATISTICS_USAGE = "statistics on|off|reset"
SLINK_ADD_USAGE = "slink add [<type> <#params>] <slink params as in the table>"
SLINK_DEL_USAGE = "slink del <slink_nr>"
SLINK_MESSAGE_USAGE = ("slink message <slink_nr> [policy sync|async] "
                       "[fallbehind ios|size|timeout N] [resync_rate RATE]")
DEVICE_ADD_USAGE = "device add <replicator> <dev_nr> <device tuples as in the table>"
DEVICE_DEL_USAGE = "device del <slink_nr>"
#: (usage, what it does) of the ``replicator`` target's messages.
REPLICATOR_MESSAGES: tuple[tuple[str, str], ...] = (
    ("start|resume [all]", "start copying (all: and resume every device)"),
    ("stop|suspend|postsuspend [all]", "stop copying (all: and suspend every device)"),
    (SLINK_ADD_USAGE, "add a site link"),
    (SLINK_DEL_USAGE, "delete a site link no device uses"),
    (SLINK_MESSAGE_USAGE, "change a site link's settings, checked together"),
    (STATISTICS_USAGE, "statistics counters"),
    ("replog ...", replog_types.MESSAGES_USAGE),
)
#: (usage, what it does) of the ``replicator-dev`` target's messages.
DEVICE_MESSAGES: tuple[tuple[str, str], ...] = (
    ("start|resume", "resume the device's I/O"),
    ("stop|suspend|postsuspend", "suspend the device's I/O"),
    (DEVICE_ADD_USAGE, "add the device's devices on site links"),
    (DEVICE_DEL_USAGE, "delete the device's device on a site link"),
)


def replicator_message(rep: Replicator, argv: Sequence[str]) -> str:
    """A replicator target message; raises MessageError changing nothing."""
    rep.check_open()
    argv = list(argv)
    if not argv:
        raise MessageError("too few message arguments")
    cmd = argv[0]
    if cmd in ("start", "resume", "stop", "suspend", "postsuspend"):
        if len(argv) > 2 or (len(argv) == 2 and argv[1] != "all"):
            raise MessageError(f"invalid {cmd} arguments {argv[1:]!r}: expected "
                               "nothing or 'all'")
        every = len(argv) == 2
        if cmd in ("start", "resume"):
            if every:
                for d in list(rep.devices.values()):
                    d.resume()
            rep.start()
        else:
            rep.stop()
            if every:
                for d in list(rep.devices.values()):
                    d.suspend()
        return ""
    if cmd == "slink":
        return _slink_message(rep, argv[1:])
    if cmd == "statistics":
        if len(argv) != 2 or argv[1] not in ("on", "off", "reset"):
            raise MessageError(f"usage: {STATISTICS_USAGE}")
        with rep.cond:
            if argv[1] == "on":
                rep.statistics = True
            elif argv[1] == "off":
                rep.statistics = False
            else:
                rep.stats = dict.fromkeys(rep.stats, 0)
        return ""
    if cmd == "replog":
        return _replog_message(rep, argv[1:])
    raise MessageError(f"invalid message {cmd!r}: expected start, resume, stop, suspend, "
                       "postsuspend, slink, statistics or replog")


def _slink_message(rep: Replicator, argv: list[str]) -> str:
    if len(argv) < 2:
        raise MessageError("too few slink message arguments: slink add|del|message ...")
    sub = argv[0]
    if sub == "add":
        words = argv[1:]
        if words[0] not in slink_types.registered():
            words = ["blockdev", str(len(words)), *words]
        try:
            new, _used = parse_slinks(words, 0, existing=list(rep.slinks))
        except TableError as e:
            raise MessageError(f"slink add: {e}") from e
        if len(new) != 1:
            raise MessageError("slink add takes exactly one site link")
        if new[0].slink_nr == 0:
            raise MessageError("can't add site link 0 via message")
        with rep.cond:
            if new[0].slink_nr in rep.slinks:
                raise MessageError(f"site link {new[0].slink_nr} already exists")
            s = rep.add_slink_locked(new[0], fresh=True)
            if rep.running:
                rep.copiers.ensure_thread_locked(s)
            rep.bump_locked(f"slink {new[0].slink_nr} added")
        rep.copiers.persist_all()
        return ""
    nr = _msg_int(argv[1], "site link number")
    if sub == "del":
        if len(argv) != 2:
            raise MessageError(f"usage: {SLINK_DEL_USAGE}")
        if nr == 0:
            raise MessageError("can't delete site link 0 via message")
        with rep.cond:
            gone = rep.slinks.get(nr)
            if gone is None:
                raise MessageError(f"site link {nr} doesn't exist")
            if any(nr in d.legs for d in rep.devices.values()):
                raise MessageError(f"site link {nr} still has devices")
            gone.close_locked()
            del rep.slinks[nr]
            rep.bump_locked(f"slink {nr} deleted")
            t = gone.thread
        if t is not None:
            t.join()
        rep.copiers.persist_all()
        return ""
    if sub == "message":
        rest = argv[2:]
        with rep.cond:
            link = rep.slinks.get(nr)
            if link is None:
                raise MessageError(f"site link {nr} doesn't exist")
            # all settings are checked against the resulting configuration
            # before any applies: a refused message changes nothing
            cfg = link.cfg
            new_cfg = link.ops.message(link, rest)
            link.cfg = new_cfg
            if new_cfg.resync_rate != cfg.resync_rate:
                link.resync_next = rep.clock()  # the new rate applies from now
            rep.copiers.check_fallbehind_locked(link, time.monotonic())
            rep.bump_locked(f"slink {nr}: {' '.join(rest)}")
        return ""
    raise MessageError(f"invalid slink command {sub!r}: expected add, del or message")


def _replog_message(rep: Replicator, argv: list[str]) -> str:
    if len(argv) == 2 and argv[0] == "statistics":
        return replicator_message(rep, ["statistics", argv[1]])
    return rep.replog.message(argv)  # the log type's own messages


def _msg_int(word: str, what: str, *, lo: int = 0, hi: int | None = None) -> int:
    return parse_int(word, what, lo=lo, hi=hi, error=MessageError)


# -- replicated devices --------------------------------------------------------------------

def device_message(dev: ReplicatedDevice, argv: Sequence[str]) -> str:
    """replicator-dev messages: device add|del, start|resume, stop|suspend|postsuspend."""
    argv = list(argv)
    if not argv:
        raise MessageError("too few message arguments")
    if argv[0] in ("start", "resume") and len(argv) == 1:
        dev.resume()
        return ""
    if argv[0] in ("stop", "suspend", "postsuspend") and len(argv) == 1:
        dev.suspend()
        return ""
    if argv[0] == "device" and len(argv) >= 2:
        if argv[1] == "add":
            return _add_legs(dev, argv[2:])
        if argv[1] == "del":
            if len(argv) != 3:
                raise MessageError(f"usage: {DEVICE_DEL_USAGE}")
            nr = _msg_int(argv[2], "site link number")
            if nr < 1:
                raise MessageError("invalid site link number argument; must be > 0")
            return _del_leg(dev, nr)
        raise MessageError(f"invalid device command {argv[1]!r}: expected add or del")
    raise MessageError(f"invalid message {' '.join(argv)!r}: expected device add|del, "
                       "start|resume or stop|suspend|postsuspend")


def _add_legs(dev: ReplicatedDevice, argv: list[str]) -> str:
    if len(argv) < 2:
        raise MessageError(f"usage: {DEVICE_ADD_USAGE}")
    if _msg_int(argv[1], "device number") != dev.dev_nr:
        raise MessageError(f"device add: device number {argv[1]} is not this device's "
                           f"({dev.dev_nr})")
    try:
        cfgs = parse_legs(argv[2:], dev.size_bytes // SECTOR)
        if not cfgs:
            raise TableError("no device tuple given")
        for c in cfgs:
            if c.slink_nr in dev.legs:
                raise TableError(f"device {dev.dev_nr} already has a device on site "
                                 f"link {c.slink_nr}")
        legs = open_legs(dev.rep, dev.dev_nr, cfgs, dev.size_bytes // SECTOR,
                         list(dev.legs.values()))
    except TableError as e:
        raise MessageError(f"device add: {e}") from e
    with dev.rep.cond:
        dev.legs.update(legs)
        dev.cfg = replace(dev.cfg, legs=tuple(lg.cfg for _, lg in
                                              sorted(dev.legs.items())))
        dev.rep.bump_locked(f"device {dev.dev_nr}: legs added on site links "
                            f"{sorted(legs)}")
    return ""


def _del_leg(dev: ReplicatedDevice, nr: int) -> str:
    with dev.rep.cond:
        leg = dev.legs.get(nr)
        if leg is None:
            raise MessageError(f"device {dev.dev_nr} has no device on site link {nr}")
        del dev.legs[nr]
        dev.cfg = replace(dev.cfg, legs=tuple(lg.cfg for _, lg in
                                              sorted(dev.legs.items())))
        dev.rep.retire_store_locked(leg.store)
        dev.rep.bump_locked(f"device {dev.dev_nr}: site link {nr} device deleted")
    return ""
