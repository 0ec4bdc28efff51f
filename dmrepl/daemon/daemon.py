"""The dmrepl daemon: replicators, their devices, NBD exports and kernel devices.

:class:`Daemon` wires the parts and answers control requests (``op_*``, under one
lock): the objects and their lifecycle (:mod:`.objects`), their tables
(:mod:`.tables`, the dmsetup grammar of :mod:`dmrepl.dm.table`), the NBD exports
(:mod:`.exports`), the kernel devices (:mod:`._kernel`), the persisted state
(:mod:`.state`), the engine it drives (:mod:`._engine`), the control socket
(:mod:`.control`) and the process (:mod:`.run`).

Every change (a create, a table switch, a remove, and every message an engine
accepted: policy, fall-behind, resync rate, site links and device legs added or
deleted, a replog resize) is written to ``<state-dir>/state.json`` (atomically)
before it is acknowledged, as the *live* tables the engines render, so a daemon
restarted after a crash recreates the same objects as they were, in the same
order; the engine's own log recovery does the rest.  ``dmrepl table`` shows the
same live tables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from dmrepl.blockio import open_store  # the engine's device opener; a compatibility name here
from dmrepl.daemon import _kernel
from dmrepl.daemon._engine import Engine, load_engine
from dmrepl.daemon._proto import ControlError, Stream
from dmrepl.daemon.control import (
    CONTROL_MAX_CONNECTIONS,
    CONTROL_REQUEST_TIMEOUT,
    ControlServer,
    as_control_error,
    dispatch,
)
from dmrepl.daemon.exports import SECTOR, ConcatBackend
from dmrepl.daemon.objects import DeviceObj, Obj, Objects, ReplicatorObj
from dmrepl.daemon.state import STATE_FILE, SavedObject, StateFile
from dmrepl.daemon.tables import Line, parse_table
from dmrepl.errors import UserError
from dmrepl.eventlog import EventLog, Subscription
from dmrepl.nbd.server import NbdLimits, NbdServer
from dmrepl.ownership import claim_directory

log = logging.getLogger("dmrepl.daemon")

#: Seconds an events stream waits for an event before checking its client is there.
EVENTS_IDLE_CHECK = 1.0

REMOVE_RETRY_INTERVAL = 0.2  # seconds between the attempts of a waiting remove

# names importers of this module use (tests, tools)
__all__ = [
    "CONTROL_MAX_CONNECTIONS", "CONTROL_REQUEST_TIMEOUT", "SECTOR", "STATE_FILE",
    "ConcatBackend", "ControlServer", "Daemon", "DeviceObj", "Line", "ReplicatorObj",
    "open_store", "parse_table",
]


#: Seconds between looks at the mirrors' journal legs, and at least between two
#: attempts to give one device a new journal leg.
JOURNAL_WATCH_INTERVAL = 1.0
JOURNAL_REJOIN_BACKOFF = 10.0


class Daemon:
    """Holds the objects and answers control requests (see :meth:`handle`)."""

    def __init__(self, state_dir: str, *, kernel_devices: bool = True,
                 engine: Engine | None = None, nbd_workers: int = 8,
                 tuning: dict[str, Any] | None = None,
                 nbd_limits: NbdLimits | None = None) -> None:
        # one daemon per state directory: claimed before anything in it is touched
        # (InUse if another process holds it; its sockets and files stay as they are)
        self.owner = claim_directory(state_dir)
        self.state_dir = state_dir
        self.kernel_devices = kernel_devices
        self.engine = engine if engine is not None else load_engine()
        self.lock = threading.RLock()
        self.state = StateFile(state_dir)
        self.nbd_socket = os.path.join(state_dir, "nbd.sock")
        try:
            self.nbd = NbdServer(self.nbd_socket, workers=nbd_workers,
                                 limits=nbd_limits).start()
        except BaseException:
            self.owner.release()
            raise
        self.events = EventLog()
        self.registry = Objects(self.engine, self.nbd, self.nbd_socket,
                            kernel_devices=kernel_devices, tuning=dict(tuning or {}),
                            persist=self.state.save, events=self.events,
                            mirror_log_dir=os.path.join(state_dir, "mirror-logs"),
                            journal_dir=os.path.join(state_dir, "journal"),
                            raid_dir=os.path.join(state_dir, "raid"))
        # a dead daemon's guardian flushes its kernel journals until this one takes
        # them over: it goes first (its flushes must not meet the takeover's swaps)
        self.registry.guardian.stop_previous()
        self.restore_errors: list[str] = []
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    @property
    def objects(self) -> dict[str, Obj]:
        """The replicators and devices by name, in creation order."""
        return self.registry.by_name

    def restore(self) -> None:
        """Recreate the objects of the last run (after a crash or a clean stop)."""
        for entry in self.state.load():
            stale = entry.get("nbd")
            if stale and self.kernel_devices:
                _kernel.detach_nbd(stale)   # still bound to the dead daemon's socket
            try:
                saved = SavedObject.from_json(entry)
                self.registry.create(saved.name, "\n".join(saved.table), saved.uuid, save=False,
                                     structure=saved.structure)
            except Exception as e:
                msg = (f"could not recreate {entry['name']}: "
                       f"{as_control_error(e, 'restore').message}")
                log.error("%s", msg)
                self.restore_errors.append(msg)
        self.registry.finish_restore()
        self.registry.save()

    # -- requests ----------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request -> one reply (:func:`dmrepl.daemon.control.dispatch`)."""
        return dispatch(self, request)

    def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "engine": self.engine.__name__,
                "kernel_devices": self.kernel_devices, "nbd_socket": self.nbd_socket,
                "restore_errors": self.restore_errors}

    def op_create(self, name: str, table: str, uuid: str | None = None,
                  structure: str = "auto") -> dict[str, Any]:
        with self.lock:
            return self._describe(self.registry.create(name, table, uuid,
                                                       structure=structure))

    def op_remove(self, name: str, wait: float = 0, force: bool = False) -> None:
        """Remove a device or an unused replicator.

        A busy object is refused with a "busy" error and left as it was: a device
        that is open, or whose writes the engine has not yet copied to all its
        site links (it refuses to drop them), or a replicator that still has
        devices.  With ``wait`` > 0 the removal is retried until it succeeds or
        ``wait`` seconds have passed (like ``dmsetup remove --retry``); the daemon
        lock is released between attempts, so the device keeps serving I/O and
        other requests are answered meanwhile.  ``force`` (after ``wait``): the
        remote site links give up the writes they do not have yet."""
        deadline = time.monotonic() + max(0.0, float(wait))
        while True:
            try:
                with self.lock:
                    # forced once the wait is over: a site that comes back meanwhile
                    # gets its writes rather than a resync
                    self.registry.remove(self.registry.get(name),
                                         force=force and time.monotonic() >= deadline)
                return
            except ControlError as e:
                if e.kind != "busy" or time.monotonic() >= deadline:
                    raise
            time.sleep(REMOVE_RETRY_INTERVAL)

    def op_load(self, name: str, table: str) -> None:
        with self.lock:
            self.registry.load(self.registry.get(name), table)

    def op_suspend(self, name: str) -> None:
        with self.lock:
            self.registry.suspend(self.registry.get(name))

    def op_resume(self, name: str) -> None:
        with self.lock:
            self.registry.resume(self.registry.get(name))

    def op_message(self, name: str, sector: int, args: list[str]) -> str:
        """A target message; what the engine accepted is persisted (as the live
        table) before the answer, what it refused changed nothing."""
        with self.lock:
            obj = self.registry.get(name)
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise UserError("a message is a list of words")
            if not args:
                raise UserError("empty message")
            if isinstance(sector, bool) or not isinstance(sector, int) or sector < 0:
                raise UserError(f"invalid sector {sector!r}: not a sector number")
            target = self.registry.message_target(obj, sector)
            self.registry.check_message(obj, list(args))
            answer = str(target.message(list(args)) or "")
            try:
                self.registry.save()
            except OSError as e:
                raise ControlError("runtime", f"message applied, but the live table of "
                                              f"{name} could not be persisted: "
                                              f"{e.strerror or e}") from e
            return answer

    def _names(self, name: str | None) -> list[str]:
        if name is None:
            return list(self.objects)
        self.registry.get(name)
        return [name]

    def op_status(self, name: str | None = None, kind: str = "info") -> list[dict[str, Any]]:
        with self.lock:
            out = []
            for n in self._names(name):
                obj = self.objects[n]
                desc = self._describe(obj)
                if isinstance(obj, ReplicatorObj):
                    desc["status"] = [obj.engine.status(kind)]
                    desc["detail"] = obj.engine.status_dict()
                    self._remote_legs_in(obj, desc["detail"])
                else:
                    desc["status"] = [dev.status(kind) for dev in obj.devs]
                    desc["detail"] = [dev.status_dict() for dev in obj.devs]
                out.append(desc)
            return out

    def _remote_legs_in(self, rep: ReplicatorObj, detail: dict[str, Any]) -> None:
        """A site link whose copies the kernel writes through a raid1's remote leg
        is as that leg is (the engine does not copy to it): down while the leg has
        failed, resyncing and not consistent while md copies to it; each such leg
        under ``remote_legs`` by device."""
        slinks = detail.get("slinks")
        if not isinstance(slinks, dict):
            return   # (the test-only sim engine)
        for dev in self.registry.devices_of(rep):
            leg = dev.remote_leg
            s = slinks.get(leg.slink_nr) if leg is not None else None
            if leg is None or not isinstance(s, dict):
                continue
            d = leg.describe()
            s.setdefault("remote_legs", {})[dev.name] = d
            if d["failed"] or d["device"] is None:
                s["state"] = "down"
                s["error"] = s.get("error") or (f"the remote leg of {dev.name} failed "
                                                f"(health {d['health']})")
            elif not d["in_sync"]:
                s["resyncing"] = True
                s["consistent"] = False

    def op_table(self, name: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [self._describe(self.objects[n]) for n in self._names(name)]

    def op_ls(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._describe(o) for o in self.objects.values()]

    def _describe(self, obj: Obj) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "name": obj.name, "type": obj.kind, "uuid": obj.uuid,
            "table": [line.text for line in self.registry.live_lines(obj)],
            "inactive_table": [line.text for line in obj.inactive] if obj.inactive else None,
        }
        if isinstance(obj, ReplicatorObj):
            desc["event_nr"] = obj.engine.event_nr
        else:
            desc.update(replicator=obj.replicator, nbd=obj.nbd, mapper=obj.mapper,
                        export=obj.name, suspended=obj.suspended, size=obj.sectors * SECTOR,
                        dev_nrs=[d.dev_nr for d in obj.devs],
                        structure="mirror" if obj.mirrored else
                        "log-writes" if obj.kjournal is not None or obj.group else
                        "raid1" if obj.remote_leg is not None else
                        ("linear" if obj.mapper else None))
            if obj.kjournal is not None:
                desc["kernel_journal"] = obj.kjournal.describe()
            elif obj.group is not None:
                desc["kernel_journal"] = obj.group.describe()
            if obj.remote_leg is not None:
                desc["remote_leg"] = obj.remote_leg.describe()
            if obj.mirrored and obj.mapper:
                # the regions the journal leg (so the remote sites) has: below all,
                # the kernel mirror is copying what it missed (a daemon outage)
                parts = _kernel.mirror_status(obj.name)
                desc["journal"] = {"in_sync": sum(p.in_sync for p in parts),
                                   "regions": sum(p.regions for p in parts),
                                   "failed": any(p.journal_leg_failed for p in parts)}
        return desc

    def op_wait(self, name: str, event_nr: int | None = None,
                timeout: float | None = None) -> int:
        with self.lock:
            engine = self.registry.replicator_of(self.registry.get(name)).engine
        after = int(engine.event_nr) if event_nr is None else int(event_nr)
        got = int(engine.wait_event(after, timeout))
        if got <= after:
            raise ControlError("timeout", f"no event on {name} after {after} "
                                          f"within {timeout}s")
        return got

    def op_events(self, name: str | None = None, now: bool = False) -> Stream:
        """Stream the state changes (of ``name`` and its replicator, or of all);
        ``now``: first each object's current state (``kind: exists``), ended by
        ``{"kind": "exists", "object": "-"}``."""
        sub = self.events.subscribe()   # before the current state: no change lost
        with self.lock:
            names = None if name is None else {name, self.registry.replicator_of(
                self.registry.get(name)).name}
            current = self._current_state(names) if now else []
        return Stream(self._event_items(sub, names, current))

    def _current_state(self, names: set[str] | None) -> list[dict[str, Any]]:
        stamp = self.events.stamp
        out = []
        for obj in self.objects.values():
            if names is not None and obj.name not in names:
                continue
            if isinstance(obj, ReplicatorObj):
                out.append(stamp("exists", "exists", obj.kind, name=obj.name))
                out += [stamp("exists", "exists", what, name=obj.name, **fields)
                        for what, fields in obj.engine.current_state()]
            else:
                out.append(stamp("exists", "exists", obj.kind, name=obj.name,
                                 replicator=obj.replicator,
                                 devices=[d.dev_nr for d in obj.devs]))
        out.append(stamp("exists", "exists", "-"))
        return out

    @staticmethod
    def _event_items(sub: Subscription, names: set[str] | None,
                     current: list[dict[str, Any]]) -> Iterator[dict[str, Any] | None]:
        yield from current
        while True:
            events = sub.read(timeout=EVENTS_IDLE_CHECK)
            if events is None:
                return
            if not events:
                yield None   # the server checks whether the client is still there
            for e in events:
                if names is None or e.get("name") in names or e["kind"] == "lost":
                    yield e

    # -- lifetime ----------------------------------------------------------------

    def watch_journal_legs(self) -> None:
        """Start watching the mirrors: one whose journal leg failed while this
        daemon runs (the kernel gave up a request after JOURNAL_REQUEST_TIMEOUT,
        e.g. a sync site link held it that long) is given a new one."""
        if self.kernel_devices and self._watch is None:
            self._watch = threading.Thread(target=self._watch_loop, name="journal-watch",
                                           daemon=True)
            self._watch.start()

    def _watch_loop(self) -> None:
        backoff: dict[str, float] = {}   # name -> no new attempt before
        failed: set[str] = set()         # names whose leg was seen failed (one event)
        while not self._stopping.wait(JOURNAL_WATCH_INTERVAL):
            due: list[tuple[DeviceObj, str, Callable[[DeviceObj], bool],
                            Callable[[DeviceObj], None]]] = []
            with self.lock:
                for obj in list(self.objects.values()):
                    if not isinstance(obj, DeviceObj) or obj.suspended:
                        continue
                    if obj.remote_leg is not None:
                        due.append((obj, "remote leg", self._remote_leg_failed,
                                    self.registry.rejoin_remote_leg))
                    elif obj.mirrored and obj.mapper and obj.nbd:
                        due.append((obj, "journal leg", self._journal_leg_failed,
                                    self.registry.rejoin))
            for obj, leg, is_failed, rejoin in due:
                self._rejoin_if_failed(obj, backoff, failed, leg, is_failed, rejoin)

    @staticmethod
    def _journal_leg_failed(obj: DeviceObj) -> bool:
        return any(p.journal_leg_failed for p in _kernel.mirror_status(obj.name))

    @staticmethod
    def _remote_leg_failed(obj: DeviceObj) -> bool:
        assert obj.remote_leg is not None
        st = obj.remote_leg.status()
        if st is None or not st.remote_failed:
            obj.remote_leg.settle()
            return False
        return True

    def _rejoin_if_failed(self, obj: DeviceObj, backoff: dict[str, float], seen: set[str],
                          leg: str, failed: Callable[[DeviceObj], bool],
                          rejoin: Callable[[DeviceObj], None]) -> None:
        """Give ``obj`` its ``leg`` again if it failed (a mirror's journal leg: a new
        nbd device on the export; a raid1's remote leg: the remote once it answers),
        at most every JOURNAL_REJOIN_BACKOFF seconds.  The first time a failure is
        seen, an event says so (``seen``: the names whose failure was told).  The
        daemon's lock is held to look and to rejoin, not while a remote that may
        not answer is probed (seconds: every request would wait)."""
        if time.monotonic() < backoff.get(obj.name, 0.0):
            return
        event = leg.replace(" ", "-")
        with self.lock:
            if self.objects.get(obj.name) is not obj or obj.suspended:
                return
            try:
                if not failed(obj):
                    backoff.pop(obj.name, None)
                    seen.discard(obj.name)
                    return
            except Exception as e:   # one device's trouble; the loop watches on
                log.error("%s: looking at the %s failed: %s", obj.name, leg, e)
                backoff[obj.name] = time.monotonic() + JOURNAL_REJOIN_BACKOFF
                return
            if obj.name not in seen:
                seen.add(obj.name)
                self.events.emit("warning", f"{event}-failed", obj.kind, name=obj.name)
        remote = obj.remote_leg
        if remote is not None and not remote.reachable():
            log.warning("%s: the %s failed and its remote %s does not answer: tried "
                        "again in %gs", obj.name, leg, remote.url, JOURNAL_REJOIN_BACKOFF)
            backoff[obj.name] = time.monotonic() + JOURNAL_REJOIN_BACKOFF
            return
        with self.lock:
            if self.objects.get(obj.name) is not obj or obj.suspended:
                return
            try:
                log.warning("%s: the %s failed: attaching it again", obj.name, leg)
                rejoin(obj)
            except Exception as e:   # one device's trouble; the loop watches on
                log.error("%s: rejoining the %s failed: %s", obj.name, leg, e)
                self.events.emit("error", f"{event}-rejoin-failed", obj.kind,
                                 name=obj.name, error=str(e))
        backoff[obj.name] = time.monotonic() + JOURNAL_REJOIN_BACKOFF

    def shutdown(self) -> None:
        """Tear down kernel devices and engines; the state file stays for the next start."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join()
        with self.lock:
            for obj in reversed(list(self.objects.values())):
                started = time.monotonic()
                try:
                    if isinstance(obj, DeviceObj):
                        with contextlib.suppress(Exception):
                            obj.export.backend.flush()
                    self.registry.destroy(obj, keep_logs=True)
                except Exception as e:
                    log.error("shutdown: %s: %s", obj.name, e)
                log.info("shutdown: %s closed in %.1fs", obj.name, time.monotonic() - started)
            self.nbd.close()
            self.registry.guardian.close()
            self.events.close()
            self.owner.release()
