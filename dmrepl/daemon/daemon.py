"""The dmrepl daemon: replicators, their devices, NBD exports and kernel devices.

Objects are named like dm devices.  A *replicator* comes from a one-line
``replicator`` table; a *device* from one or more ``replicator-dev`` lines that
tile its sectors (each line becomes one engine device; the export concatenates
them).  Each device is served over NBD on ``<state-dir>/nbd.sock`` under its
name and, unless the daemon runs with ``kernel_devices=False``, attached to a
/dev/nbdN and shown as /dev/mapper/NAME (dm linear over /dev/nbdN).

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
import faulthandler
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dmrepl.blockio import open_store  # the engine's device opener; a compatibility name here
from dmrepl.daemon import _kernel
from dmrepl.daemon._proto import BadFrame, ControlError, FrameDecoder, FrameError, encode
from dmrepl.daemon._schema import schema_of
from dmrepl.errors import DmreplError, InUse, UserError
from dmrepl.nbd.backend import Backend
from dmrepl.nbd.server import Export, NbdLimits, NbdServer
from dmrepl.numbers import parse_int
from dmrepl.ownership import claim_directory
from dmrepl.replicator.errors import DeviceBusy
from dmrepl.replicator.table import table_line
from dmrepl.unixsock import AcceptBackoff, listen_root_only

log = logging.getLogger("dmrepl.daemon")

SECTOR = 512
STATE_FILE = "state.json"
SHUTDOWN_DEADLINE = 60.0   # seconds a SIGTERM shutdown may take before a forced exit
REMOVE_RETRY_INTERVAL = 0.2  # seconds between the attempts of a waiting remove


# -- tables ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Line:
    start: int
    length: int
    target: str
    params: list[str]
    text: str


def parse_table(text: str) -> list[Line]:
    """Split a dmsetup-style table into target lines (blank lines, # comments skipped)."""
    lines: list[Line] = []
    for n, raw in enumerate(text.splitlines(), 1):
        raw = raw.split("#", 1)[0].strip()
        if not raw:
            continue
        words = raw.split()
        if len(words) < 3:
            raise UserError(f"table line {n}: expected '<start> <length> <target> ...'")
        start = parse_int(words[0], f"table line {n}: start (sectors; integers)")
        length = parse_int(words[1], f"table line {n}: length (sectors; integers)", lo=1)
        lines.append(Line(start, length, words[2], words[3:], " ".join(words)))
    if not lines:
        raise UserError("empty table")
    kinds = {line.target for line in lines}
    if len(kinds) > 1:
        raise UserError(f"a table holds one target type, got {', '.join(sorted(kinds))}")
    kind = lines[0].target
    if kind not in ("replicator", "replicator-dev"):
        raise UserError(f"unsupported target type {kind!r} "
                        "(dmrepl manages 'replicator' and 'replicator-dev')")
    if kind == "replicator" and len(lines) != 1:
        raise UserError("a replicator table is exactly one line")
    if kind == "replicator-dev":
        pos = 0
        for line in sorted(lines, key=lambda x: x.start):
            if line.start != pos:
                raise UserError(f"replicator-dev lines must tile the device: sector {pos} "
                                f"expected, line starts at {line.start}")
            if len(line.params) < 2:
                raise UserError("replicator-dev needs <replicator_device> <dev_nr> ...")
            pos += line.length
    return lines


# -- objects -----------------------------------------------------------------

@dataclass
class ReplicatorObj:
    name: str
    lines: list[Line]
    engine: Any
    uuid: str
    kind: str = "replicator"
    inactive: list[Line] | None = None


@dataclass
class DeviceObj:
    name: str
    lines: list[Line]
    replicator: str
    devs: list[Any]
    export: Export
    uuid: str
    kind: str = "replicator-dev"
    nbd: str | None = None
    mapper: str | None = None
    inactive: list[Line] | None = None
    suspended: bool = False

    @property
    def sectors(self) -> int:
        return sum(line.length for line in self.lines)


class ConcatBackend:
    """Several engine devices back to back (one per replicator-dev table line)."""

    def __init__(self, parts: list[tuple[int, int, Backend]]) -> None:
        self.parts = parts  # (start byte, length bytes, backend)
        self.size_bytes = sum(length for _, length, _ in parts)

    def _split(self, offset: int, length: int) -> Iterator[tuple[Backend, int, int, int]]:
        for start, size, backend in self.parts:
            lo, hi = max(offset, start), min(offset + length, start + size)
            if lo < hi:
                yield backend, lo - start, hi - lo, lo - offset

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(b.read(o, n) for b, o, n, _ in self._split(offset, length))

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        for b, o, n, rel in self._split(offset, len(data)):
            # the engine wants bytes: copy only the pieces of a write across parts
            b.write(o, data if n == len(data) else data[rel:rel + n], fua)

    def flush(self) -> None:
        for _, _, b in self.parts:
            b.flush()

    def trim(self, offset: int, length: int) -> None:
        for b, o, n, _ in self._split(offset, length):
            b.trim(o, n)


def default_engine(kind: str = "auto") -> Any:
    if kind == "sim":
        from dmrepl.daemon.simengine import SimReplicator
        return SimReplicator
    try:
        Replicator = importlib.import_module("dmrepl.replicator").Replicator
    except (ImportError, AttributeError):
        if kind == "replicator":
            raise
        from dmrepl.daemon.simengine import SimReplicator
        log.warning("dmrepl.replicator is not available: using the sim engine")
        return SimReplicator
    return Replicator


def _wrap(e: Exception, what: str) -> ControlError:
    if isinstance(e, ControlError):
        return e
    if isinstance(e, UserError):
        return ControlError("user", f"{what}: {e}")
    if isinstance(e, InUse):
        return ControlError("busy", f"{what}: {e}")
    if isinstance(e, TimeoutError):
        return ControlError("timeout", f"{what}: {e}")
    if isinstance(e, DmreplError):
        return ControlError("runtime", f"{what}: {e}")
    if isinstance(e, OSError):
        return ControlError("runtime", f"{what}: {e.strerror or e}")
    if isinstance(e, ValueError | KeyError | OverflowError):
        return ControlError("user", f"{what}: {e}")
    return ControlError("internal", f"{what}: {type(e).__name__}: {e}")


# -- the daemon ------------------------------------------------------------------

class Daemon:
    """Holds the objects and answers control requests (see :meth:`handle`)."""

    def __init__(self, state_dir: str, *, kernel_devices: bool = True,
                 engine: Any = None, nbd_workers: int = 8,
                 tuning: dict[str, Any] | None = None,
                 nbd_limits: NbdLimits | None = None) -> None:
        # one daemon per state directory: claimed before anything in it is touched
        # (InUse if another process holds it; its sockets and files stay as they are)
        self.owner = claim_directory(state_dir)
        self.tuning = dict(tuning or {})
        self.state_dir = state_dir
        self.kernel_devices = kernel_devices
        self.engine = engine if engine is not None else default_engine()
        self.objects: dict[str, ReplicatorObj | DeviceObj] = {}
        self.lock = threading.RLock()
        self.nbd_socket = os.path.join(state_dir, "nbd.sock")
        try:
            self.nbd = NbdServer(self.nbd_socket, workers=nbd_workers,
                                 limits=nbd_limits).start()
        except BaseException:
            self.owner.release()
            raise
        self.restore_errors: list[str] = []

    # -- persistence -------------------------------------------------------

    def _live_lines(self, obj: ReplicatorObj | DeviceObj) -> list[Line]:
        """``obj``'s table as its engine has it now (messages change it)."""
        if isinstance(obj, ReplicatorObj):
            parts: list[tuple[Line, Any]] = [(obj.lines[0], obj.engine)]
        elif len(obj.devs) == len(obj.lines):
            parts = list(zip(obj.lines, obj.devs, strict=True))
        else:   # between the removal and re-adding of its engine devices
            return obj.lines
        out = []
        for line, engine in parts:
            params = engine.table()
            text = table_line(line.start, line.length, line.target, params)
            out.append(Line(line.start, line.length, line.target, params.split(), text))
        return out

    def _save(self) -> None:
        for obj in self.objects.values():
            obj.lines = self._live_lines(obj)
        state = {"version": 1, "objects": [
            {"name": o.name, "kind": o.kind, "uuid": o.uuid,
             "table": [line.text for line in o.lines],
             "nbd": o.nbd if isinstance(o, DeviceObj) else None}
            for o in self.objects.values()]}
        path = os.path.join(self.state_dir, STATE_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dirfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def restore(self) -> None:
        """Recreate the objects of the last run (after a crash or a clean stop)."""
        path = os.path.join(self.state_dir, STATE_FILE)
        try:
            with open(path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return
        for entry in state.get("objects", []):
            stale = entry.get("nbd")
            if stale and self.kernel_devices:
                _kernel.detach_nbd(stale)   # still bound to the dead daemon's socket
            try:
                self._create(entry["name"], "\n".join(entry["table"]), entry.get("uuid"),
                             save=False)
            except Exception as e:
                msg = f"could not recreate {entry['name']}: {_wrap(e, 'restore').message}"
                log.error("%s", msg)
                self.restore_errors.append(msg)
        self._save()

    # -- requests ------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request -> one reply; the arguments are checked against the op's
        declared schema (its handler's signature) before anything runs."""
        op = request.get("op")
        func: Callable[..., Any] | None = getattr(type(self), f"op_{op}", None) \
            if isinstance(op, str) else None
        if func is None:
            shown = repr(op)[:80] if isinstance(op, str) else f"of type {type(op).__name__}"
            return ControlError("user", f"unknown request {shown}").to_wire()
        args = {k: v for k, v in request.items() if k != "op"}
        try:
            schema_of(str(op), func).check(args)
            return {"ok": True, "result": func(self, **args)}
        except Exception as e:
            if not isinstance(e, DmreplError | OSError | ValueError | KeyError | OverflowError):
                log.exception("%s failed", op)
            return _wrap(e, str(op)).to_wire()

    def _get(self, name: str) -> ReplicatorObj | DeviceObj:
        obj = self.objects.get(name)
        if obj is None:
            raise ControlError("notfound", f"no device named {name!r}")
        return obj

    def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "engine": getattr(self.engine, "__name__", "?"),
                "kernel_devices": self.kernel_devices, "nbd_socket": self.nbd_socket,
                "restore_errors": self.restore_errors}

    def op_create(self, name: str, table: str, uuid: str | None = None) -> dict[str, Any]:
        with self.lock:
            obj = self._create(name, table, uuid)
            return self._describe(obj)

    def _create(self, name: str, table: str, uuid: str | None,
                save: bool = True) -> ReplicatorObj | DeviceObj:
        if not name or "/" in name or len(name) > 127 or name.startswith("."):
            raise UserError(f"invalid device name {name!r}")
        if name in self.objects:
            raise ControlError("exists", f"device {name!r} already exists")
        lines = parse_table(table)
        uuid = uuid or f"DMREPL-{uuidlib.uuid4().hex}"
        obj: ReplicatorObj | DeviceObj
        if lines[0].target == "replicator":
            engine = self.engine.from_table(lines[0].text, opener=open_store, **self.tuning)
            try:
                engine.start()
            except BaseException:
                engine.close()
                raise
            obj = ReplicatorObj(name, lines, engine, uuid)
            self.objects[name] = obj
        else:
            obj = self._create_device(name, lines, uuid)
        if save:
            try:
                self._save()
            except BaseException:
                self._destroy(obj)
                raise
        return obj

    def _replicator_of(self, lines: list[Line]) -> ReplicatorObj:
        refs = {line.params[0].removeprefix("/dev/mapper/") for line in lines}
        if len(refs) != 1:
            raise UserError("all lines of a device must name the same replicator")
        ref = refs.pop()
        rep = self.objects.get(ref)
        if not isinstance(rep, ReplicatorObj):
            raise ControlError("notfound", f"no replicator named {ref!r}")
        return rep

    @staticmethod
    def _check_lines(rep: ReplicatorObj, lines: list[Line]) -> None:
        """Every line valid for ``rep`` (grammar, site links) before any is used."""
        check = getattr(rep.engine, "check_device", None)
        if check is not None:
            for line in lines:
                check(line.text)

    def _add_devs(self, rep: ReplicatorObj, lines: list[Line]) -> list[Any]:
        self._check_lines(rep, lines)
        devs: list[Any] = []
        try:
            for line in lines:
                devs.append(rep.engine.add_device(line.text))
        except BaseException:
            for dev in devs:
                with contextlib.suppress(Exception):
                    rep.engine.remove_device(dev.dev_nr)
            raise
        return devs

    @staticmethod
    def _backend(lines: list[Line], devs: list[Any]) -> Backend:
        if len(devs) == 1 and lines[0].start == 0:
            return devs[0]
        return ConcatBackend([(line.start * SECTOR, line.length * SECTOR, dev)
                              for line, dev in zip(lines, devs, strict=True)])

    def _create_device(self, name: str, lines: list[Line], uuid: str) -> DeviceObj:
        lines = sorted(lines, key=lambda x: x.start)
        rep = self._replicator_of(lines)
        devs = self._add_devs(rep, lines)
        sectors = sum(line.length for line in lines)
        export = Export(name, self._backend(lines, devs), size=sectors * SECTOR)
        obj = DeviceObj(name, lines, rep.name, devs, export, uuid)
        self.objects[name] = obj
        self.nbd.add_export(export)
        if self.kernel_devices:
            try:
                busy = {int(o.nbd[8:]) for o in self.objects.values()
                        if isinstance(o, DeviceObj) and o.nbd}
                log.info("%s: attaching the export to an nbd device", name)
                obj.nbd = _kernel.attach_nbd(self.nbd_socket, name, sectors * SECTOR, busy)
                log.info("%s: %s attached; creating /dev/mapper/%s", name, obj.nbd, name)
                obj.mapper = _kernel.create_mapper(name, sectors, obj.nbd, uuid)
                log.info("%s: %s ready", name, obj.mapper)
            except BaseException:
                self._destroy(obj)
                raise
        return obj

    def _destroy(self, obj: ReplicatorObj | DeviceObj) -> None:
        """Undo everything an object holds (kernel devices first); no persistence."""
        if isinstance(obj, DeviceObj):
            if obj.mapper:
                _kernel.remove_mapper(obj.name)
                obj.mapper = None
            if obj.nbd:
                _kernel.detach_nbd(obj.nbd)
                obj.nbd = None
            self.nbd.remove_export(obj.name)
            rep = self.objects.get(obj.replicator)
            for dev in obj.devs:
                if isinstance(rep, ReplicatorObj):
                    with contextlib.suppress(Exception):
                        rep.engine.remove_device(dev.dev_nr)
        else:
            with contextlib.suppress(Exception):
                obj.engine.stop()
            obj.engine.close()
        self.objects.pop(obj.name, None)

    def op_remove(self, name: str, wait: float = 0) -> None:
        """Remove a device or an unused replicator.

        A busy object is refused with a "busy" error and left as it was: a device
        that is open, or whose writes the engine has not yet copied to all its
        site links (it refuses to drop them), or a replicator that still has
        devices.  With ``wait`` > 0 the removal is retried until it succeeds or
        ``wait`` seconds have passed (like ``dmsetup remove --retry``); the daemon
        lock is released between attempts, so the device keeps serving I/O and
        other requests are answered meanwhile."""
        deadline = time.monotonic() + max(0.0, float(wait))
        while True:
            try:
                with self.lock:
                    self._remove(self._get(name))
                return
            except ControlError as e:
                if e.kind != "busy" or time.monotonic() >= deadline:
                    raise
            time.sleep(REMOVE_RETRY_INTERVAL)

    def _remove(self, obj: ReplicatorObj | DeviceObj) -> None:
        if isinstance(obj, ReplicatorObj):
            users = [o.name for o in self.objects.values()
                     if isinstance(o, DeviceObj) and o.replicator == obj.name]
            if users:
                raise ControlError("busy", f"replicator {obj.name!r} still has devices: "
                                           f"{', '.join(users)}")
            self._destroy(obj)
            self._save()
            return
        if obj.mapper and _kernel.mapper_open_count(obj.name) > 0:
            raise ControlError("busy", f"/dev/mapper/{obj.name} is in use")
        rep = self.objects[obj.replicator]
        assert isinstance(rep, ReplicatorObj)
        # The engine devices go first: it is the engine that may refuse (writes not
        # yet at every site link), and then the kernel devices must still be there.
        obj.export.suspend(timeout=60)     # no request reaches a device while it goes
        try:
            self._remove_engine_devs(obj, rep)
        except BaseException:
            obj.export.resume()
            raise
        self.nbd.remove_export(obj.name)   # requests from here on: ESHUTDOWN
        obj.export.resume()                # (and those that waited fail, not hang)
        try:
            self._destroy(obj)
        except BaseException:
            # the kernel devices are still there (e.g. opened meanwhile): keep the
            # device whole rather than leave /dev/mapper/NAME over nothing
            self._readd_engine_devs(obj, rep)
            self.nbd.add_export(obj.export)
            raise
        self._save()

    def _remove_engine_devs(self, obj: DeviceObj, rep: ReplicatorObj,
                            what: str = "remove") -> None:
        """Remove ``obj``'s engine devices, all or none: if the engine refuses one,
        the ones already removed are added back; "busy" is raised if it refused
        because of writes not yet copied (DeviceBusy), else its error as it is."""
        removed = 0
        try:
            for dev in obj.devs:
                rep.engine.remove_device(dev.dev_nr)
                removed += 1
        except BaseException as e:
            if removed:
                self._readd_engine_devs(obj, rep, upto=removed)
            if not isinstance(e, DeviceBusy):
                raise
            hint = " (or: dmrepl remove --wait SECONDS)" if what == "remove" else ""
            raise ControlError("busy", f"cannot {what} {obj.name} yet: {e}{hint}") from e
        obj.devs = []

    def _readd_engine_devs(self, obj: DeviceObj, rep: ReplicatorObj,
                           upto: int | None = None) -> None:
        n = len(obj.lines) if upto is None else upto
        devs = self._add_devs(rep, obj.lines[:n])
        obj.devs = devs + obj.devs[n:]
        obj.export.backend = self._backend(obj.lines, obj.devs)

    def op_load(self, name: str, table: str) -> None:
        with self.lock:
            obj = self._get(name)
            lines = parse_table(table)
            if lines[0].target != obj.kind:
                raise UserError(f"{name} is a {obj.kind}; cannot load a {lines[0].target} table")
            if isinstance(obj, ReplicatorObj):
                raise UserError("reloading a replicator table is not supported; "
                                "remove its devices and the replicator, then create it again")
            if sum(line.length for line in lines) != obj.sectors:
                raise UserError(f"new table has {sum(x.length for x in lines)} sectors, "
                                f"{name} has {obj.sectors}: resizing is not supported")
            self._check_lines(self._replicator_of(lines), lines)
            obj.inactive = sorted(lines, key=lambda x: x.start)

    def op_suspend(self, name: str) -> None:
        with self.lock:
            for dev in self._devices_of(self._get(name)):
                if dev.suspended:
                    continue
                if dev.mapper:
                    _kernel.suspend_mapper(dev.name)   # drains the kernel's queue first
                dev.export.suspend(timeout=60)
                dev.suspended = True

    def op_resume(self, name: str) -> None:
        with self.lock:
            obj = self._get(name)
            if isinstance(obj, DeviceObj) and obj.inactive is not None:
                self._swap(obj)
            self._resume_devices(obj)

    def _resume_devices(self, obj: ReplicatorObj | DeviceObj) -> None:
        for dev in self._devices_of(obj):
            if not dev.suspended:
                continue
            dev.export.resume()
            if dev.mapper:
                _kernel.resume_mapper(dev.name)
            dev.suspended = False

    def _swap(self, obj: DeviceObj) -> None:
        new = obj.inactive
        assert new is not None
        was_suspended = obj.suspended
        if not was_suspended:
            self.op_suspend(obj.name)
        try:
            rep = self._replicator_of(new)
            old_rep = self.objects[obj.replicator]
            assert isinstance(old_rep, ReplicatorObj)
            # busy (writes not yet at every site link): nothing changed, the loaded
            # table stays for a later resume
            self._remove_engine_devs(obj, old_rep, "switch the table of")
        except BaseException:
            if not was_suspended:
                self._resume_devices(obj)
            raise
        try:
            devs = self._add_devs(rep, new)
        except BaseException:
            self._readd_engine_devs(obj, old_rep)   # put the old table back
            obj.inactive = None
            raise
        obj.lines, obj.devs, obj.replicator, obj.inactive = new, devs, rep.name, None
        obj.export.backend = self._backend(new, devs)
        self._save()

    def _devices_of(self, obj: ReplicatorObj | DeviceObj) -> list[DeviceObj]:
        if isinstance(obj, DeviceObj):
            return [obj]
        return [o for o in self.objects.values()
                if isinstance(o, DeviceObj) and o.replicator == obj.name]

    def op_message(self, name: str, sector: int, args: list[str]) -> str:
        """A target message; what the engine accepted is persisted (as the live
        table) before the answer, what it refused changed nothing."""
        with self.lock:
            obj = self._get(name)
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise UserError("a message is a list of words")
            if not args:
                raise UserError("empty message")
            if isinstance(sector, bool) or not isinstance(sector, int) or sector < 0:
                raise UserError(f"invalid sector {sector!r}: not a sector number")
            if isinstance(obj, ReplicatorObj):
                target = obj.engine
            else:
                target = obj.devs[self._line_at(obj, sector)]
            answer = str(target.message(list(args)) or "")
            try:
                self._save()
            except OSError as e:
                raise ControlError("runtime", f"message applied, but the live table of "
                                              f"{name} could not be persisted: "
                                              f"{e.strerror or e}") from e
            return answer

    @staticmethod
    def _line_at(obj: DeviceObj, sector: int) -> int:
        for i, line in enumerate(obj.lines):
            if line.start <= sector < line.start + line.length:
                return i
        raise UserError(f"sector {sector} is outside {obj.name} (0..{obj.sectors - 1})")

    def _names(self, name: str | None) -> list[str]:
        if name is None:
            return list(self.objects)
        self._get(name)
        return [name]

    def op_status(self, name: str | None = None, kind: str = "info") -> list[dict[str, Any]]:
        with self.lock:
            out = []
            for n in self._names(name):
                obj = self.objects[n]
                desc = self._describe(obj)
                if isinstance(obj, ReplicatorObj):
                    desc["status"] = [obj.engine.status(kind)]
                    with contextlib.suppress(AttributeError):
                        desc["detail"] = obj.engine.status_dict()
                else:
                    desc["status"] = [dev.status(kind) for dev in obj.devs]
                out.append(desc)
            return out

    def op_table(self, name: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [self._describe(self.objects[n]) for n in self._names(name)]

    def op_ls(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._describe(o) for o in self.objects.values()]

    def _describe(self, obj: ReplicatorObj | DeviceObj) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "name": obj.name, "type": obj.kind, "uuid": obj.uuid,
            "table": [line.text for line in self._live_lines(obj)],
            "inactive_table": [line.text for line in obj.inactive] if obj.inactive else None,
        }
        if isinstance(obj, ReplicatorObj):
            desc["event_nr"] = getattr(obj.engine, "event_nr", 0)
        else:
            desc.update(replicator=obj.replicator, nbd=obj.nbd, mapper=obj.mapper,
                        export=obj.name, suspended=obj.suspended, size=obj.sectors * SECTOR,
                        dev_nrs=[getattr(d, "dev_nr", None) for d in obj.devs])
        return desc

    def op_wait(self, name: str, event_nr: int | None = None,
                timeout: float | None = None) -> int:
        with self.lock:
            obj = self._get(name)
            rep = obj if isinstance(obj, ReplicatorObj) else self.objects[obj.replicator]
            assert isinstance(rep, ReplicatorObj)
            engine = rep.engine
        after = int(engine.event_nr) if event_nr is None else int(event_nr)
        got = int(engine.wait_event(after, timeout))
        if got <= after:
            raise ControlError("timeout", f"no event on {name} after {after} "
                                          f"within {timeout}s")
        return got

    # -- lifetime ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Tear down kernel devices and engines; the state file stays for the next start."""
        with self.lock:
            for obj in reversed(list(self.objects.values())):
                started = time.monotonic()
                try:
                    if isinstance(obj, DeviceObj):
                        with contextlib.suppress(Exception):
                            obj.export.backend.flush()
                    self._destroy(obj)
                except Exception as e:
                    log.error("shutdown: %s: %s", obj.name, e)
                log.info("shutdown: %s closed in %.1fs", obj.name, time.monotonic() - started)
            self.nbd.close()
            self.owner.release()


# -- control socket ------------------------------------------------------------

SO_PEERCRED_FMT = "3i"


#: Connections the control socket serves at once; more are answered "busy" and closed.
CONTROL_MAX_CONNECTIONS = 64
#: Seconds a control connection may take to send a whole request before it is closed.
CONTROL_REQUEST_TIMEOUT = 60.0


class ControlServer:
    """Root-only unix socket; one thread per connection, one reply per request.

    Every frame gets a reply: a malformed one (not JSON, too deep, a number too
    long, arguments of the wrong type) an error of kind "user", and the
    connection reads on; only a frame length beyond :data:`MAX_FRAME` (the
    stream cannot be followed past it) closes the connection, after the reply.
    """

    def __init__(self, daemon: Daemon, path: str, *,
                 max_connections: int = CONTROL_MAX_CONNECTIONS,
                 request_timeout: float | None = CONTROL_REQUEST_TIMEOUT) -> None:
        self.daemon = daemon
        self.path = path
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.sock = listen_root_only(path, 32)
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._slots = threading.BoundedSemaphore(max_connections)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"x")

    def serve_forever(self) -> None:
        backoff = AcceptBackoff("control")
        try:
            while True:
                ready, _, _ = select.select([self.sock.fileno(), self._rfd], [], [])
                if self._rfd in ready:
                    return
                try:
                    conn, _ = self.sock.accept()
                except OSError as e:
                    # out of fds: the connection stays queued; wait (for stop too)
                    delay = backoff.failed(e)
                    if delay and select.select([self._rfd], [], [], delay)[0]:
                        return
                    continue
                backoff.succeeded()
                if not self._slots.acquire(blocking=False):
                    self._refuse(conn)
                    continue
                threading.Thread(target=self._serve_slot, args=(conn,), daemon=True,
                                 name="control").start()
        finally:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _refuse(self, conn: socket.socket) -> None:
        log.warning("control: %d connections already: refusing one", self.max_connections)
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)   # never wait on a peer we refuse
            conn.send(encode(ControlError("busy", "too many control connections "
                                                  f"({self.max_connections}); retry "
                                                  "later").to_wire()))

    def _allowed(self, conn: socket.socket) -> bool:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                               struct.calcsize(SO_PEERCRED_FMT))
        _, uid, _ = struct.unpack(SO_PEERCRED_FMT, cred)
        return uid in (0, os.getuid())

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve(conn)
        except OSError as e:
            log.info("control: connection ended: %s", e)
        except Exception:
            # a bug, but one connection's: the daemon serves on
            log.exception("control: connection failed")
        finally:
            self._slots.release()

    def _reply(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        try:
            data = encode(reply)
        except (FrameError, TypeError, ValueError) as e:
            data = encode(ControlError("internal", f"reply not sendable: {e}").to_wire())
        conn.sendall(data)

    def _serve(self, conn: socket.socket) -> None:
        if not self._allowed(conn):
            conn.sendall(encode(ControlError("user", "permission denied: root only")
                                .to_wire()))
            return
        conn.settimeout(self.request_timeout)
        decoder = FrameDecoder()
        while True:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                log.info("control: closing a connection idle for %ss", self.request_timeout)
                return
            if not data:
                return
            decoder.receive(data)
            while True:
                try:
                    frame = decoder.next_frame()
                except BadFrame as e:
                    self._reply(conn, ControlError("user", f"invalid request: {e}").to_wire())
                    continue
                except FrameError as e:
                    log.warning("control: dropping connection: %s", e)
                    self._reply(conn, ControlError("user", f"invalid request: {e}").to_wire())
                    return
                if frame is None:
                    break
                self._reply(conn, self.daemon.handle(frame))


def run_daemon(socket_path: str, state_dir: str, ready_file: str | None = None, *,
               kernel_devices: bool = True, engine: str = "auto",
               tuning: dict[str, Any] | None = None,
               nbd_limits: NbdLimits | None = None) -> int:
    """``dmrepl daemon``: serve until SIGTERM/SIGINT, then shut down cleanly.

    Another daemon on the same state directory or control socket: raises
    :class:`~dmrepl.errors.InUse` (exit code IN_USE) before touching either."""
    logging.basicConfig(level=logging.INFO, format="dmrepl-daemon: %(levelname)s %(message)s")
    # The state directory is claimed first (Daemon), then the control socket:
    # a second daemon stops at whichever another one holds, having touched nothing.
    daemon = Daemon(state_dir, kernel_devices=kernel_devices, engine=default_engine(engine),
                    tuning=tuning, nbd_limits=nbd_limits)
    try:
        server = ControlServer(daemon, socket_path)
    except BaseException:
        daemon.shutdown()
        raise

    def on_signal(signum: int, frame: object) -> None:
        del frame
        log.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # thread dump on demand
    try:
        daemon.restore()
        if ready_file:
            tmp = ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, ready_file)
        log.info("ready: control %s, nbd %s", socket_path, daemon.nbd_socket)
        server.serve_forever()
    finally:
        # A shutdown that cannot finish (a request stuck in a wedged kernel or
        # engine) must not keep SIGTERM waiting forever: dump the threads and exit.
        faulthandler.dump_traceback_later(SHUTDOWN_DEADLINE, exit=True)
        started = time.monotonic()
        daemon.shutdown()
        faulthandler.cancel_dump_traceback_later()
        if ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file)
        log.info("shut down in %.1fs", time.monotonic() - started)
    # NBD worker threads may still sit in requests of connections that ended with
    # the kernel devices; the interpreter would wait for them at exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
