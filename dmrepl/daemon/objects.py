"""The daemon's objects and their lifecycle: replicators and replicated devices.

A *replicator* comes from a one-line ``replicator`` table and holds one engine
replicator; a *device* from one or more ``replicator-dev`` lines that tile its
sectors (each line becomes one engine device; the export concatenates them).
Each device is served over NBD under its name and, with kernel devices, attached
to a /dev/nbdN and shown as /dev/mapper/NAME: a dm mirror of its local devices
and /dev/nbdN, whose export then logs writes for the remote site links only
(:mod:`dmrepl.daemon._kernel`), or, over local devices that are files, dm linear
over /dev/nbdN.

:class:`Objects` creates, loads (an inactive table), suspends, resumes (switching
to a loaded table), removes and persists them.  It is not thread-safe: the daemon
calls it under its lock.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmrepl.blockio import open_store, open_store_beside_the_kernel
from dmrepl.daemon import _kernel
from dmrepl.daemon._engine import Engine, EngineDevice, EngineReplicator
from dmrepl.daemon._proto import ControlError
from dmrepl.daemon.exports import SECTOR, backend_of
from dmrepl.daemon.guardian import PIDFILE as GUARDIAN_PIDFILE
from dmrepl.daemon.guardian import Guardian
from dmrepl.daemon.kgroup import (
    KernelGroup,
    Member,
    Replacing,
    forget_members,
    saved_members,
    saved_replacing,
)
from dmrepl.daemon.kjournal import JournalTarget, KernelJournal
from dmrepl.daemon.remoteleg import RemoteLeg
from dmrepl.daemon.state import SavedObject
from dmrepl.daemon.tables import REPLICATOR, REPLICATOR_DEV, Line, parse_table
from dmrepl.errors import Busy, UserError
from dmrepl.eventlog import EventLog
from dmrepl.nbd.server import Export, NbdServer
from dmrepl.tuning import TUNABLES

log = logging.getLogger("dmrepl.daemon")

#: Seconds an export may take to finish its requests in flight when suspended.
EXPORT_SUSPEND_TIMEOUT = 60


@dataclass
class ReplicatorObj:
    name: str
    lines: list[Line]
    engine: EngineReplicator
    uuid: str
    kind: str = REPLICATOR
    inactive: list[Line] | None = None


@dataclass
class DeviceObj:
    name: str
    lines: list[Line]
    replicator: str
    devs: list[EngineDevice]
    export: Export
    uuid: str
    kind: str = REPLICATOR_DEV
    nbd: str | None = None
    mapper: str | None = None
    inactive: list[Line] | None = None
    suspended: bool = False
    #: /dev/mapper/NAME is a mirror (its export serves the journal legs)
    mirrored: bool = False
    #: /dev/mapper/NAME is a kernel journal (dm log-writes) that the daemon drains
    kjournal: KernelJournal | None = None
    #: /dev/mapper/NAME is a slice of its replicator's group journal (kgroup)
    group: KernelGroup | None = None
    #: /dev/mapper/NAME is a raid1 of the local device and the remote export
    remote_leg: RemoteLeg | None = None
    #: what its creator asked /dev/mapper/NAME to be (``auto``: the daemon picks,
    #: and changes it as the replicator's devices come and go)
    structure: str = "auto"

    @property
    def sectors(self) -> int:
        return sum(line.length for line in self.lines)


Obj = ReplicatorObj | DeviceObj


class Objects:
    """The objects by name (in creation order) and every change to them.

    ``persist`` is called after every change (with the objects' live tables
    refreshed) before the change counts as done; if it fails, a create is undone."""

    def __init__(self, engine: Engine, nbd: NbdServer, nbd_socket: str, *, kernel_devices: bool,
                 tuning: dict[str, Any], persist: Callable[[list[SavedObject]], None],
                 events: EventLog | None = None, mirror_log_dir: str | None = None,
                 journal_dir: str | None = None, raid_dir: str | None = None) -> None:
        self.engine = engine
        #: where the remote legs' metadata files are (None: no remote legs)
        self.raid_dir = raid_dir
        #: where the kernel journals' segments are (None: no kernel journals)
        self.journal_dir = journal_dir
        #: where the mirrors' dirty-log files are (None: no mirrors, linear only)
        self.mirror_log_dir = mirror_log_dir
        self.events = events if events is not None else EventLog()
        self.nbd = nbd
        self.nbd_socket = nbd_socket
        self.kernel_devices = kernel_devices
        self.tuning = tuning
        self.persist = persist
        self.by_name: dict[str, Obj] = {}
        #: resumes the kernel journals whose writes the daemon holds, if it dies, and
        #: flushes them until the next daemon (as often as the daemon swaps them:
        #: the kernel holds no more of their writes in memory than while it runs)
        self.guardian = Guardian(
            pidfile=os.path.join(journal_dir, GUARDIAN_PIDFILE) if journal_dir else None,
            flush_interval=float(self.knob("journal_interval")))
        #: the replicators' kernel journal groups, by replicator name
        self.groups: dict[str, KernelGroup] = {}

    def knob(self, key: str) -> Any:
        """A tuning knob's value: as the daemon was told, else its default."""
        return self.tuning.get(key, TUNABLES[key].default)

    # -- lookups -----------------------------------------------------------------

    def get(self, name: str) -> Obj:
        obj = self.by_name.get(name)
        if obj is None:
            raise ControlError("notfound", f"no device named {name!r}")
        return obj

    def replicator_of(self, obj: Obj) -> ReplicatorObj:
        rep = obj if isinstance(obj, ReplicatorObj) else self.by_name[obj.replicator]
        assert isinstance(rep, ReplicatorObj)
        return rep

    def devices_of(self, obj: Obj) -> list[DeviceObj]:
        if isinstance(obj, DeviceObj):
            return [obj]
        return [o for o in self.by_name.values()
                if isinstance(o, DeviceObj) and o.replicator == obj.name]

    def _replicator_named_by(self, lines: list[Line]) -> ReplicatorObj:
        refs = {line.params[0].removeprefix("/dev/mapper/") for line in lines}
        if len(refs) != 1:
            raise UserError("all lines of a device must name the same replicator")
        ref = refs.pop()
        rep = self.by_name.get(ref)
        if not isinstance(rep, ReplicatorObj):
            raise ControlError("notfound", f"no replicator named {ref!r}")
        return rep

    # -- persistence -------------------------------------------------------------

    def live_lines(self, obj: Obj) -> list[Line]:
        """``obj``'s table as its engine has it now (messages change it)."""
        if isinstance(obj, ReplicatorObj):
            return [obj.lines[0].with_params(obj.engine.table())]
        if len(obj.devs) != len(obj.lines) or obj.remote_leg is not None:
            # between the removal and re-adding of its engine devices; or a remote
            # leg's (its engine device has the local device only)
            return obj.lines
        return [line.with_params(dev.table())
                for line, dev in zip(obj.lines, obj.devs, strict=True)]

    def save(self) -> None:
        for obj in self.by_name.values():
            obj.lines = self.live_lines(obj)
        self.persist([SavedObject(o.name, o.kind, o.uuid, [line.text for line in o.lines],
                                  o.nbd if isinstance(o, DeviceObj) else None,
                                  o.structure if isinstance(o, DeviceObj) else "auto")
                      for o in self.by_name.values()])

    # -- create and destroy ------------------------------------------------------

    def create(self, name: str, table: str, uuid: str | None, save: bool = True, *,
               structure: str = "auto") -> Obj:
        """``structure``: what /dev/mapper/NAME of a replicated device is to be
        (:data:`_kernel.STRUCTURES`; a replicator has none)."""
        if not name or "/" in name or len(name) > 127 or name.startswith("."):
            raise UserError(f"invalid device name {name!r}")
        if structure not in _kernel.STRUCTURES:
            raise UserError(f"unknown structure {structure!r} (one of "
                            f"{', '.join(_kernel.STRUCTURES)})")
        if name in self.by_name:
            raise ControlError("exists", f"device {name!r} already exists")
        lines = parse_table(table)
        uuid = uuid or f"DMREPL-{uuidlib.uuid4().hex}"
        obj: Obj
        if lines[0].target == REPLICATOR:
            if structure != "auto":
                raise UserError("a replicator has no structure: --structure is for a "
                                "replicated device (replicator-dev)")
            engine = self.engine.from_table(
                lines[0].text,
                opener=open_store_beside_the_kernel if self.kernel_devices else open_store,
                on_event=functools.partial(self.events.emit, name=name), **self.tuning)
            try:
                engine.start()
            except BaseException:
                engine.close()
                raise
            obj = ReplicatorObj(name, lines, engine, uuid)
            self.by_name[name] = obj
        else:
            try:
                obj = self._create_device(name, lines, uuid, structure)
            except BaseException:
                self._journal_again_after_failure(lines)
                raise
        if save:
            try:
                self.save()
            except BaseException:
                self.destroy(obj)
                if isinstance(obj, DeviceObj):
                    self._journal_again_after_failure(lines)
                raise
        self.events.emit("create", "object-create", obj.kind, name=name)
        return obj

    @staticmethod
    def _check_lines(rep: ReplicatorObj, lines: list[Line]) -> None:
        """Every line valid for ``rep`` (grammar, site links) before any is used."""
        for line in lines:
            rep.engine.check_device(line.text)

    def _add_devs(self, rep: ReplicatorObj, lines: list[Line], *,
                  local_only: bool = False) -> list[EngineDevice]:
        """The engine devices of ``lines`` (``local_only``: of their local devices
        only: the kernel writes the remote, the engine must not)."""
        self._check_lines(rep, lines)
        devs: list[EngineDevice] = []
        try:
            for line in lines:
                devs.append(rep.engine.add_device(_local_only(line) if local_only
                                                  else line.text))
        except BaseException:
            for dev in devs:
                with contextlib.suppress(Exception):
                    rep.engine.remove_device(dev.dev_nr)
            raise
        return devs

    def _mirrorable(self, devs: list[EngineDevice]) -> bool:
        return (self.kernel_devices and self.mirror_log_dir is not None
                and all(_kernel.is_block_device(d.local_device()) for d in devs))

    def _journalable(self, name: str, rep: ReplicatorObj, devs: list[EngineDevice]) -> bool:
        """May the kernel journal the device's writes (``kernel_journal`` tuned
        on; one line over a block device; every remote site link async (with a
        fall-behind limit: the device is held while past it); the replicator's
        only device)?  A device keeps the structure it had (its files say which)."""
        if not self._journal_takes(devs):
            return False
        if self._was_journaled(name):
            return True
        if self._was_mirrored(name):
            return False
        if self.devices_of(rep):
            # each kernel journal keeps its own device's order only: a replicator's
            # order across devices needs them all on the mirror
            return False
        return self._remote_links_async(rep)

    def _journal_takes(self, devs: list[EngineDevice]) -> bool:
        """``kernel_journal`` tuned on, kernel devices, one line over a block device."""
        return (bool(self.knob("kernel_journal")) and self.kernel_devices
                and self.journal_dir is not None and len(devs) == 1
                and _kernel.is_block_device(devs[0].local_device()))

    @staticmethod
    def _remote_links_async(rep: ReplicatorObj) -> bool:
        slinks = rep.engine.status_dict().get("slinks", {})
        return all(s.get("policy") == "async" for nr, s in slinks.items() if int(nr) != 0)

    def _was_journaled(self, name: str) -> bool:
        """NAME was made a kernel journal (its journal order file is there)."""
        return self.journal_dir is not None and os.path.exists(
            os.path.join(self.journal_dir, f"{name}.journal"))

    def _was_mirrored(self, name: str) -> bool:
        """NAME was made a mirror (a dirty-log file of one of its lines is there)."""
        return self.mirror_log_dir is not None and bool(glob.glob(
            os.path.join(glob.escape(self.mirror_log_dir), f"{glob.escape(name)}@*.log")))

    def _remote_leg_for(self, name: str, rep: ReplicatorObj,
                        lines: list[Line]) -> RemoteLeg | None:
        """The remote leg of a device that may have one (``remote_leg`` tuned on;
        one line over a block device; its replicator's only remote site link is
        sync, without a fall-behind limit, and the device's remote is an NBD
        export), else None.  A device keeps the structure it had (its files say
        which)."""
        if not (self.knob("remote_leg") and self.kernel_devices
                and self.raid_dir is not None and len(lines) == 1):
            return None
        from dmrepl.replicator.table import parse_device
        config = parse_device(lines[0].text)
        local = config.leg(0)
        remotes = [leg for leg in config.legs if leg.slink_nr != 0]
        if local is None or len(remotes) != 1 or not _kernel.is_block_device(local.dev_path):
            return None
        remote = remotes[0]
        leg = RemoteLeg(name, lines[0].length, local.dev_path, remote.dev_path,
                        self.raid_dir, assume_in_sync="nosync" in remote.dlog_args)
        from dmrepl.replicator.table import TableError, parse_replicator
        try:   # (the live table: what messages changed included)
            rep_config = parse_replicator(self.live_lines(rep)[0].text)
        except TableError:   # an engine whose table the real one would refuse (sim)
            rep_config = None
        remote_slinks = {s.slink_nr: s for s in rep_config.slinks
                         if s.slink_nr != 0} if rep_config is not None else {}
        slink = remote_slinks.get(remote.slink_nr)
        leg.slink_nr = remote.slink_nr
        if slink is not None:
            leg.recovery_rate = slink.resync_rate
        leg.request_timeout = int(self.knob("remote_timeout"))
        if leg.made_before():
            return leg
        if not (remote.dev_path.startswith(("nbd://", "nbd+unix://"))
                or _kernel.is_block_device(remote.dev_path)):
            return None
        if self._was_journaled(name) or self._was_mirrored(name):
            return None
        if slink is None or set(remote_slinks) != {remote.slink_nr}:
            return None
        if not slink.sync or slink.fallbehind.enabled:
            return None
        return leg

    def _mirror_log_file(self, name: str, line: Line) -> str:
        assert self.mirror_log_dir is not None
        return os.path.join(self.mirror_log_dir, f"{name}@{line.start}.log")

    def _mirror_parts(self, obj: DeviceObj, lines: list[Line],
                      devs: list[EngineDevice]) -> list[_kernel.MirrorPart]:
        """The mirror of each line (its log file attached to a loop device)."""
        parts = []
        for line, dev in zip(lines, devs, strict=True):
            loop, new = _kernel.attach_mirror_log(self._mirror_log_file(obj.name, line),
                                                  line.length)
            parts.append(_kernel.MirrorPart(line.start, line.length, dev.local_device(),
                                            loop, new_log=new))
        return parts

    def _nbds_in_use(self) -> set[int]:
        busy = set()
        for o in self.by_name.values():
            if isinstance(o, DeviceObj):
                for path in (o.nbd, o.remote_leg.device if o.remote_leg else None):
                    if path and path.startswith("/dev/nbd"):
                        busy.add(int(path[8:]))
        return busy

    def _attach_nbd(self, obj: DeviceObj) -> str:
        """Attach ``obj``'s export to a free /dev/nbdN (its journal leg's request
        timeout if it is a mirror) and record it in ``obj.nbd``."""
        obj.nbd = None
        obj.nbd = _kernel.attach_nbd(
            self.nbd_socket, obj.name, obj.sectors * SECTOR, self._nbds_in_use(),
            request_timeout=_kernel.JOURNAL_REQUEST_TIMEOUT if obj.mirrored else None)
        return obj.nbd

    def _create_device(self, name: str, lines: list[Line], uuid: str,
                       structure: str = "auto") -> DeviceObj:
        rep = self._replicator_named_by(lines)
        remote_leg = (self._remote_leg_for(name, rep, lines)
                      if structure in ("auto", "raid1") else None)
        if structure == "raid1" and remote_leg is None:
            raise UserError(f"{name} cannot be a raid1 with a remote leg: that takes one "
                            "line over a block device, one remote device (nbd:// or a "
                            "block device) and its site link synchronous without a "
                            "fall-behind limit, the replicator's only remote one")
        # a member of the replicator's group coming back (a restart)
        restoring = self._saved_group_listing(rep, name)
        devs = self._add_devs(rep, lines, local_only=remote_leg is not None)
        if restoring is not None and _kernel.live_target_type(name) == "log-writes":
            self._dissolved(rep, restoring[0], name, devs)
            restoring = None
        sectors = sum(line.length for line in lines)
        grouped = (remote_leg is None and structure in ("auto", "log-writes")
                   and (restoring is not None or self._group_takes(rep, devs)))
        journaled = (remote_leg is None and not grouped
                     and structure in ("auto", "log-writes")
                     and self._journalable(name, rep, devs))
        mirrored = (remote_leg is None and not journaled and not grouped
                    and structure in ("auto", "mirror") and self._mirrorable(devs))
        try:
            if structure == "log-writes" and not (journaled or grouped):
                raise UserError(f"{name} cannot be a kernel journal (log-writes): that "
                                "takes one line over a block device, every remote site "
                                "link asynchronous, kernel_journal tuned on, and the "
                                "replicator's other devices kernel journals too")
            if structure == "mirror" and not mirrored:
                raise UserError(f"{name} cannot be a mirror: that takes local devices "
                                "that are block devices, and kernel devices")
            in_group = [p.name for p in self.devices_of(rep) if p.group is not None]
            if not grouped and in_group:
                raise UserError(
                    f"{name} cannot join {rep.name}: its devices ({', '.join(in_group)}) "
                    "are one kernel journal, which keeps their write order across them, "
                    f"and {name} cannot be part of it (that takes one line over a block "
                    "device and the structure auto or log-writes)")
            for peer in self.devices_of(rep) if not grouped else ():
                if peer.kjournal is not None:
                    # a kernel journal keeps its own device's write order only: the
                    # replicator's order across devices needs them all on the mirror
                    self._journal_to_mirror(peer)
        except BaseException:
            for dev in devs:
                with contextlib.suppress(Exception):
                    rep.engine.remove_device(dev.dev_nr)
            raise
        # (a remote leg's export is read-only: a write through it would reach the
        # local device behind the raid1's back)
        export = Export(name, backend_of(lines, devs, journal=mirrored),
                        size=sectors * SECTOR, read_only=remote_leg is not None)
        obj = DeviceObj(name, lines, rep.name, devs, export, uuid, mirrored=mirrored,
                        structure=structure)
        self.by_name[name] = obj
        self.nbd.add_export(export)
        if remote_leg is not None:
            try:
                log.info("%s: creating /dev/mapper/%s as a raid1 of the local device and "
                         "the remote %s", name, name, remote_leg.url)
                obj.mapper = remote_leg.open(uuid, self._nbds_in_use())
                obj.remote_leg = remote_leg
                log.info("%s: %s ready (remote leg %s)", name, obj.mapper, remote_leg.device)
            except BaseException:
                if obj.remote_leg is None:   # (destroy closes it once it is the object's)
                    # its nbd device, its metadata's loop devices; the files only if
                    # no earlier start made them
                    remote_leg.close(keep=remote_leg.made_before())
                self.destroy(obj, keep_logs=True)
                raise
        elif grouped:
            try:
                if restoring is None:
                    log.info("%s: joining the kernel journal of %s's devices", name, rep.name)
                    self._regroup(rep, self.devices_of(rep))
                elif set(restoring[1]) <= {d.name for d in self.devices_of(rep)}:
                    self._restore_group(rep, *restoring)
                # (else a member still to come back puts the group back)
            except BaseException:
                self.destroy(obj)
                raise
        elif journaled:
            try:
                obj.kjournal = self._kernel_journal(obj)
                log.info("%s: creating /dev/mapper/%s as a kernel journal (log-writes) "
                         "of the local device", name, name)
                obj.mapper = obj.kjournal.open(uuid)
                log.info("%s: %s ready", name, obj.mapper)
            except BaseException:
                self.destroy(obj)
                raise
        elif self.kernel_devices:
            try:
                log.info("%s: attaching the export to an nbd device", name)
                nbd = self._attach_nbd(obj)
                if mirrored:
                    log.info("%s: %s attached (journal leg); creating /dev/mapper/%s as "
                             "a mirror of the local device", name, nbd, name)
                    obj.mapper = _kernel.create_mirror(
                        name, self._mirror_parts(obj, lines, devs), nbd, uuid)
                else:
                    log.warning("%s: a local device is not a block device: /dev/mapper/%s "
                                "is linear over %s (all I/O through the daemon)",
                                name, name, nbd)
                    obj.mapper = _kernel.create_mapper(name, sectors, nbd, uuid)
                log.info("%s: %s ready", name, obj.mapper)
            except BaseException:
                self.destroy(obj)
                raise
        return obj

    def _kernel_journal(self, obj: DeviceObj) -> KernelJournal:
        assert self.journal_dir is not None
        return KernelJournal(
            obj.name, obj.sectors, obj.devs[0].local_device(), obj.devs[0], self.journal_dir,
            segment_bytes=int(self.knob("journal_segment_mib")) << 20,
            interval=float(self.knob("journal_interval")),
            paused=lambda: obj.suspended,
            on_event=lambda kind, event, **fields: self.events.emit(
                kind, event, REPLICATOR_DEV, name=obj.name, **fields),
            guardian=self.guardian)

    # -- the replicator's group journal (kgroup) -------------------------------------

    def _group_journal(self, rep: str, name: str, sectors: int, local: str,
                       target: JournalTarget) -> KernelJournal:
        assert self.journal_dir is not None
        return KernelJournal(
            name, sectors, local, target, self.journal_dir,
            segment_bytes=int(self.knob("journal_segment_mib")) << 20,
            interval=float(self.knob("journal_interval")),
            on_event=lambda kind, event, **fields: self.events.emit(
                kind, event, REPLICATOR, name=rep, **fields),
            guardian=self.guardian)

    def _group_takes(self, rep: ReplicatorObj, devs: list[EngineDevice]) -> bool:
        """May a new device join (or, with a kernel journal alone, make) the
        replicator's group: one line over a block device, every remote site link
        async, and every device of the replicator a kernel journal (alone or in
        the group) that is not suspended nor has a table loaded?"""
        peers = self.devices_of(rep)
        return (bool(peers)
                and all((p.kjournal is not None or p.group is not None)
                        and p.mapper is not None and not p.suspended and p.inactive is None
                        and p.structure in ("auto", "log-writes") for p in peers)
                and self._journal_takes(devs) and self._remote_links_async(rep))

    def _saved_group_listing(self, rep: ReplicatorObj, name: str
                             ) -> tuple[int, list[str]] | None:
        """The saved group of ``rep`` if it lists ``name`` and is not live here."""
        if rep.name in self.groups:
            return None
        saved = saved_members(self.journal_dir, rep.name)
        if saved is None or name not in saved[1]:
            return None
        return saved

    def _new_group(self, rep: ReplicatorObj, gen: int, members: list[DeviceObj]) -> KernelGroup:
        assert self.journal_dir is not None
        return KernelGroup(rep.name, gen,
                           [Member(m.name, m.sectors, m.devs[0].local_device(), m.devs[0])
                            for m in members],
                           self.journal_dir, functools.partial(self._group_journal, rep.name))

    def _restore_group(self, rep: ReplicatorObj, gen: int, names: list[str]) -> None:
        """Every member of the saved group is back: the group's devices made again
        (after a crash: what its journal lost is resynchronised) or a dead daemon's
        taken over, each member's slice over it."""
        mine = {m.name: m for m in self.devices_of(rep)}
        devices = [mine[n] for n in names]
        group = self._new_group(rep, gen, devices)
        log.info("%s: putting back the kernel journal of its devices %s", rep.name,
                 ", ".join(names))
        group.open(start=True)
        self.groups[rep.name] = group
        for m in devices:
            m.group = group
            m.mapper = _kernel.place_linear(m.name, group.slice(m.name), m.uuid)
        replacing = saved_replacing(self.journal_dir, rep.name)
        if replacing is not None:
            self._discard_replaced(rep, group, replacing)

    def _dissolved(self, rep: ReplicatorObj, gen: int, name: str,
                   devs: list[EngineDevice]) -> None:
        """A saved group member back with a kernel journal of its own: a daemon
        died while it made the group's last member a journal alone again
        (:meth:`_ungroup`, after the switch).  The group is gone; what its
        journal held and had not drained cannot come after what the member's own
        journal holds: the member resynchronises whole."""
        log.error("%s: a daemon died while it made %s a kernel journal of its own again: "
                  "%s resynchronised whole", rep.name, name, name)
        self._forget_group(rep.name)
        for dev in devs:
            dev.lost_writes()
        self._clear_old_group(rep, gen)   # (the member's restore goes on if it fails)
        self.events.emit("error", "kernel-journal-regroup-interrupted", REPLICATOR,
                         name=rep.name, members=name)

    def _clear_old_group(self, rep: ReplicatorObj, gen: int) -> None:
        """Remove what is left of generation ``gen`` of ``rep``'s group; a failure
        is logged (the rest of a restore goes on)."""
        try:
            self._new_group(rep, gen, []).clear_stale()
        except Exception as e:
            log.error("%s: the old kernel journal group .%s.j%d stays: %s", rep.name,
                      rep.name, gen, e)

    def _discard_replaced(self, rep: ReplicatorObj, group: KernelGroup,
                          replacing: Replacing) -> None:
        """A daemon died in the middle of a regroup: the journals it was replacing
        (now that every member is a slice of ``group``, nothing writes to them)
        hold writes that are not in the replication log, and draining them now
        would put them after the new journal's: the members resynchronise whole
        instead, and those journals go."""
        log.error("%s: a daemon died while it rebuilt the kernel journal of its devices: "
                  "what the journals it replaced held is not drained; %s resynchronised "
                  "whole", rep.name, ", ".join(group.names))
        for m in group.members:
            m.dev.lost_writes()
        if replacing.group is not None and replacing.group != group.gen:
            self._new_group(rep, replacing.group, []).clear_stale()
        for name in replacing.alone:
            obj = self.by_name.get(name)
            if isinstance(obj, DeviceObj):
                self._kernel_journal(obj).discard()
        group.save()
        self.events.emit("error", "kernel-journal-regroup-interrupted", REPLICATOR,
                         name=rep.name, members=",".join(group.names))

    def finish_restore(self) -> None:
        """After a restart: a group some of whose members did not come back (their
        tables failed) cannot be taken over (its journal's offsets need them all);
        the members that did are journalled again without them, and their remote
        site links resynchronise them whole (what the old journal held is not
        drained).  Never raises (errors logged, with an event)."""
        for rep in [o for o in self.by_name.values() if isinstance(o, ReplicatorObj)]:
            if rep.name in self.groups:
                continue
            try:
                saved = saved_members(self.journal_dir, rep.name)
                if saved is None:
                    continue
                gen, names = saved
                # (an interrupted regroup's old group: the whole resync below covers it)
                replacing = saved_replacing(self.journal_dir, rep.name)
                back = [o for o in self.devices_of(rep)
                        if o.name in names and o.mapper is None and o.group is None]
                if not back:
                    continue
                missing = [n for n in names if n not in self.by_name]
                log.error("%s: its kernel journal group cannot be put back without %s: "
                          "%s journalled again, resynchronised whole", rep.name,
                          ", ".join(missing), ", ".join(o.name for o in back))
                for o in back:
                    if _kernel.mapper_exists(o.name):   # (a dead daemon's slice: switched)
                        o.mapper = f"/dev/mapper/{o.name}"
                if len(back) >= 2:
                    self._regroup(rep, back)
                else:
                    kj = self._kernel_journal(back[0])
                    back[0].mapper = kj.open(back[0].uuid, replace=back[0].mapper is not None)
                    back[0].kjournal = kj
                    self._forget_group(rep.name)
                for o in back:
                    o.devs[0].lost_writes()
                # (the old group's devices, unless a missing member's slice holds them)
                self._clear_old_group(rep, gen)
                if replacing is not None and replacing.group is not None:
                    self._clear_old_group(rep, replacing.group)
                self.events.emit("error", "kernel-journal-group-incomplete", REPLICATOR,
                                 name=rep.name, missing=",".join(missing))
            except Exception as e:
                log.error("%s: its kernel journal group: %s", rep.name, e)
                self.events.emit("error", "structure-change-failed", REPLICATOR,
                                 name=rep.name, structure="log-writes", error=str(e))

    def _regroup(self, rep: ReplicatorObj, members: list[DeviceObj]) -> None:
        """Make ``members`` (two or more, in this order) the slices of a new group
        journal: those live (a kernel journal alone, or a slice of the old group)
        switched together, the others made.  Writers wait a moment; nothing
        fails.  What the old journals hold enters the replication log before
        anything the new one logs.  Raises with everything as it was if the new
        group cannot be made or switched to."""
        old = self.groups.get(rep.name)
        busy = [m.name for m in members if m.mapper and (m.suspended or m.inactive)]
        if busy:
            raise UserError(f"{', '.join(busy)}: suspended, or a table loaded: resume "
                            "first (the replicator's kernel journal is rebuilt)")
        saved = saved_members(self.journal_dir, rep.name)
        gen = max(old.gen if old else 0, saved[0] if saved else 0) + 1
        group = self._new_group(rep, gen, members)
        group.clear_stale()
        alone = [m for m in members if m.kjournal is not None]
        # most of what the old journals hold, now: the writers' wait below is short
        for m in alone:
            assert m.kjournal is not None
            m.kjournal.drain_now()
        if old is not None:
            old.journal.drain_now()

        def restart_old() -> None:
            for m in alone:
                if m.kjournal is not None:
                    m.kjournal.start()
            if old is not None:
                old.start()
        try:
            group.open(start=False)
        except BaseException:
            restart_old()
            raise
        live = [m for m in members if m.mapper]
        try:
            # saved before the switch, with what it replaces: a daemon killed
            # before the old journals are drained leaves writes in them that no
            # restart can order after the new journal's (:meth:`_discard_replaced`)
            group.save(Replacing(old.gen if old is not None else None,
                                 [m.name for m in alone]))
            _kernel.switch_linear([(m.name, group.slice(m.name)) for m in live])
        except BaseException:
            with contextlib.suppress(Exception):
                group.close(keep=False)
            if old is not None:   # (the membership as it was)
                old.save()
            else:
                self._forget_group(rep.name)
            restart_old()
            raise
        # every write in flight under the old structure completed: the old journals
        # hold them all (their targets are destroyed, or idle) and go to the log first
        for m in alone:
            kj = m.kjournal
            assert kj is not None
            kj.drain_replaced_or_resync()
            kj.close(keep=False)
            m.kjournal = None
        if old is not None:
            old.retire()
        for m in members:
            m.group = group
        self.groups[rep.name] = group
        group.save()
        group.start()
        for m in alone:
            self.events.emit("change", "structure-changed", REPLICATOR_DEV, name=m.name,
                             structure="log-writes", group=group.dm_name)
        for m in members:
            if not m.mapper:
                m.mapper = _kernel.place_linear(m.name, group.slice(m.name), m.uuid)

    def _ungroup(self, rep: ReplicatorObj, obj: DeviceObj) -> None:
        """The group's last member becomes a kernel journal of its own, in place
        (the group's writes go to the log first)."""
        group = self.groups[rep.name]
        log.info("%s: alone on its replicator again: a kernel journal of its own", obj.name)
        group.journal.drain_now()
        kj = self._kernel_journal(obj)
        try:
            obj.mapper = kj.open(obj.uuid, replace=True, start=False)
        except BaseException:
            kj.close(keep=False)   # (still the group's slice)
            group.start()
            raise
        group.retire()
        self._forget_group(rep.name)
        obj.group, obj.kjournal = None, kj
        kj.start()
        self.events.emit("change", "structure-changed", REPLICATOR_DEV, name=obj.name,
                         structure="log-writes")

    def _fit_group(self, rep: ReplicatorObj) -> None:
        """After a remove or a failed create: the group journal rebuilt for the
        devices left (one left: a kernel journal of its own; none: gone).  Never
        raises: what called it is done."""
        group = self.groups.get(rep.name)
        if group is None:
            return
        members = [o for o in self.devices_of(rep) if o.group is group]
        try:
            if len(members) >= 2 and [m.name for m in members] != group.names:
                self._regroup(rep, members)
            elif len(members) == 1:
                self._ungroup(rep, members[0])
            elif not members:
                group.close(keep=False)
                self._forget_group(rep.name)
        except Exception as e:   # (the group as it was: its drainer goes on)
            group.start()
            log.error("%s: its kernel journal stays as it was: %s", rep.name, e)
            self.events.emit("error", "structure-change-failed", REPLICATOR, name=rep.name,
                             structure="log-writes", error=str(e))

    def _forget_group(self, rep: str, *, keep_file: bool = False) -> None:
        """The replicator has no group any more (``keep_file``: a shutdown, the
        next start puts it back from its saved membership)."""
        self.groups.pop(rep, None)
        if not keep_file and self.journal_dir is not None:
            forget_members(self.journal_dir, rep)

    def _journal_to_mirror(self, obj: DeviceObj) -> None:
        """Make a kernel journal device a mirror, in place (writers wait a moment,
        nothing fails).  Its journal's writes enter the replication log before any
        the mirror's journal leg takes: that leg's export holds every request until
        the journal is drained."""
        kj = obj.kjournal
        assert kj is not None
        log.info("%s: its replicator gets a second device: the kernel journal becomes "
                 "a mirror", obj.name)
        kj.drain_now()   # (most of it now, so the writers' wait below is short)
        old_export = obj.export
        export = Export(obj.name, backend_of(obj.lines, obj.devs, journal=True),
                        size=obj.sectors * SECTOR)
        self.nbd.remove_export(obj.name)
        self.nbd.add_export(export)
        obj.export, obj.mirrored = export, True

        def undo() -> None:   # (still the kernel journal: as it was)
            self._unmirror(obj, old_export)
            kj.start()
        try:
            nbd = self._attach_nbd(obj)
            parts = self._mirror_parts(obj, obj.lines, obj.devs)
        except BaseException:
            undo()
            raise
        # (its drainer is stopped: nothing else swaps segments)
        export.suspend()
        try:
            try:
                _kernel.create_mirror(obj.name, parts, nbd)   # (suspend, load, resume)
            except BaseException:   # (the journal's table resumed as it was)
                undo()
                raise
            kj.drain_replaced_or_resync()
        finally:
            export.resume()
        kj.close(keep=False)
        obj.kjournal = None
        self.events.emit("change", "structure-changed", REPLICATOR_DEV, name=obj.name,
                         structure="mirror")

    def _journal_again(self, rep: ReplicatorObj) -> None:
        """The replicator is down to one device: a mirror the daemon chose
        becomes the kernel journal again if it may (see :meth:`_mirror_to_journal`).
        Never raises: what called it (a remove, a failed create) is done."""
        devices = self.devices_of(rep)
        if len(devices) != 1:
            return
        obj = devices[0]
        if not (obj.mirrored and obj.structure == "auto" and obj.mapper and obj.nbd
                and not obj.suspended and obj.inactive is None   # (a mirror's switch)
                and self._journal_takes(obj.devs)
                and self._remote_links_async(rep)):
            return
        try:
            if any(st.journal_leg_failed or st.in_sync < st.regions
                   for st in _kernel.mirror_status(obj.name)):
                log.info("%s: alone on its replicator again, it stays a mirror: its "
                         "journal leg missed writes not yet copied to it", obj.name)
                return
            self._mirror_to_journal(obj)
        except Exception as e:   # (still the mirror, whole: the remove went through)
            log.error("%s: it stays a mirror: %s", obj.name, e)
            self.events.emit("error", "structure-change-failed", REPLICATOR_DEV,
                             name=obj.name, structure="log-writes", error=str(e))

    def _journal_again_after_failure(self, lines: list[Line]) -> None:
        """A device that failed to be made may have made its peer a mirror first
        (the failure raised stays the one the caller sees)."""
        try:
            rep = self._replicator_named_by(lines)
        except Exception:   # (no such replicator: nothing was converted)
            return
        self._fit_group(rep)
        self._journal_again(rep)

    def _mirror_to_journal(self, obj: DeviceObj) -> None:
        """Make a mirror the kernel journal, in place (writers wait a moment,
        nothing fails): the mirror's suspension completes the writes in flight,
        each through the journal leg into the replication log, before the kernel
        journal logs any, so the log keeps the device's order."""
        log.info("%s: alone on its replicator again: the mirror becomes a kernel journal",
                 obj.name)
        kj = self._kernel_journal(obj)
        try:
            obj.mapper = kj.open(obj.uuid, replace=True)
        except BaseException:
            kj.close(keep=False)   # (NAME is still the mirror)
            raise
        self._unmirror(obj, Export(obj.name, backend_of(obj.lines, obj.devs, journal=False),
                                   size=obj.sectors * SECTOR))
        obj.kjournal = kj
        self.save()
        self.events.emit("change", "structure-changed", REPLICATOR_DEV, name=obj.name,
                         structure="log-writes")

    def _unmirror(self, obj: DeviceObj, export: Export) -> None:
        """NAME is no longer a mirror (or never became one): ``export`` serves it,
        the journal leg's nbd device and the dirty logs go."""
        self.nbd.remove_export(obj.name)
        self.nbd.add_export(export)
        obj.export, obj.mirrored = export, False
        if obj.nbd:
            _kernel.detach_nbd(obj.nbd)
            obj.nbd = None
        for line in obj.lines:
            _kernel.detach_mirror_log(self._mirror_log_file(obj.name, line), delete=True)

    def destroy(self, obj: Obj, *, keep_logs: bool = False) -> None:
        """Undo everything an object holds (kernel devices first); no persistence.

        ``keep_logs``: a mirror's dirty-log files stay (a daemon's shutdown: the
        next start finds what the journal leg missed)."""
        if isinstance(obj, DeviceObj):
            if obj.kjournal is not None:
                obj.kjournal.stop()
            if obj.mapper:
                _kernel.remove_mapper(obj.name)
                obj.mapper = None
            if obj.group is not None:
                self._leave_group(obj, keep_logs=keep_logs)
            if obj.kjournal is not None:
                # (the removed target logged what it held: drained now)
                obj.kjournal.close(keep=keep_logs)
                obj.kjournal = None
            if obj.remote_leg is not None:
                obj.remote_leg.close(keep=keep_logs)
                obj.remote_leg = None
            if obj.nbd:
                _kernel.detach_nbd(obj.nbd)
                obj.nbd = None
            if obj.mirrored and self.mirror_log_dir is not None:
                for line in obj.lines:
                    _kernel.detach_mirror_log(self._mirror_log_file(obj.name, line),
                                              delete=not keep_logs)
            self.nbd.remove_export(obj.name)
            rep = self.by_name.get(obj.replicator)
            for dev in obj.devs:
                if isinstance(rep, ReplicatorObj):
                    with contextlib.suppress(Exception):
                        rep.engine.remove_device(dev.dev_nr)
        else:
            with contextlib.suppress(Exception):
                obj.engine.stop()
            obj.engine.close()
        if self.by_name.pop(obj.name, None) is not None:
            self.events.emit("destroy", "object-remove", obj.kind, name=obj.name)

    def _leave_group(self, obj: DeviceObj, *, keep_logs: bool) -> None:
        """``obj``'s slice is gone: what the group journalled goes to the log now,
        while its engine devices are there to take it; the last member out
        closes the group (``keep_logs``: a shutdown, its files stay for the next
        start; else they go)."""
        group, obj.group = obj.group, None
        assert group is not None
        if self.groups.get(obj.replicator) is not group:
            return
        others = [m for m in self.devices_of(self.replicator_of(obj))
                  if m.group is group and m.mapper]
        if others:
            try:
                group.journal.drain_now()
            finally:
                group.start()
            return
        try:
            group.close(keep=keep_logs)
        finally:
            self._forget_group(obj.replicator, keep_file=keep_logs)

    def rejoin(self, obj: DeviceObj) -> None:
        """Give a mirror whose journal leg failed a new one: a new /dev/nbdN on the
        export, loaded into the mirror (whose recovery then copies the regions the
        old leg missed)."""
        assert obj.mirrored and obj.mapper and obj.nbd
        old = obj.nbd
        _kernel.detach_nbd(old)   # fails what still waits on it (the mirror marks it)
        nbd = self._attach_nbd(obj)
        _kernel.create_mirror(obj.name, self._mirror_parts(obj, obj.lines, obj.devs), nbd)
        self.save()
        self.events.emit("warning", "journal-leg-rejoined", obj.kind, name=obj.name,
                         old=old, new=nbd)

    def rejoin_remote_leg(self, obj: DeviceObj) -> None:
        """Give a raid1 whose remote leg failed the remote export again (md then
        copies the regions its bitmap marked); RemoteLegError while the remote
        does not answer."""
        assert obj.remote_leg is not None
        old = obj.remote_leg.device
        new = obj.remote_leg.rejoin(self._nbds_in_use())
        self.events.emit("warning", "remote-leg-rejoined", obj.kind, name=obj.name,
                         old=old, new=new)

    # -- remove ------------------------------------------------------------------

    def remove(self, obj: Obj, *, force: bool = False) -> None:
        """Remove a device or an unused replicator; "busy" (nothing changed) if it
        is in use, has devices, or has writes not yet at every site link
        (``force``: the remote site links give those writes up, see
        :meth:`~dmrepl.daemon._engine.EngineReplicator.remove_device`)."""
        if isinstance(obj, ReplicatorObj):
            users = [o.name for o in self.devices_of(obj)]
            if users:
                raise ControlError("busy", f"replicator {obj.name!r} still has devices: "
                                           f"{', '.join(users)}")
            self.destroy(obj)
            self.save()
            return
        if obj.mapper and _kernel.mapper_open_count(obj.name) > 0:
            raise ControlError("busy", f"/dev/mapper/{obj.name} is in use")
        if obj.remote_leg is not None and not force:
            st = obj.remote_leg.status()
            if st is None or not st.in_sync:
                where = (f"{st.health} {st.done}/{st.total} {st.action}" if st
                         else "no status")
                raise ControlError(
                    "busy", f"cannot remove {obj.name} yet: its remote leg is not in sync "
                    f"({where}; or: dmrepl remove --wait SECONDS; or, if the site is "
                    "down, dmrepl remove --force)")
        rep = self.replicator_of(obj)
        # The engine devices go first: it is the engine that may refuse (writes not
        # yet at every site link), and then the kernel devices must still be there.
        journal = (obj.kjournal if obj.kjournal is not None
                   else obj.group.journal if obj.group is not None else None)
        if journal is not None:
            # what the kernel journalled goes to the log first, where the engine
            # counts it as writes not yet at every site link
            journal.drain_now()
        obj.export.suspend(timeout=EXPORT_SUSPEND_TIMEOUT)   # no request reaches a
        try:                                                  # device while it goes
            self._remove_engine_devs(obj, rep, force=force)
        except BaseException:
            obj.export.resume()
            if journal is not None:
                journal.start()
            raise
        self.nbd.remove_export(obj.name)   # requests from here on: ESHUTDOWN
        obj.export.resume()                # (and those that waited fail, not hang)
        try:
            self.destroy(obj)
        except BaseException:
            # the kernel devices are still there (e.g. opened meanwhile): keep the
            # device whole rather than leave /dev/mapper/NAME over nothing
            self._readd_engine_devs(obj, rep)
            self.nbd.add_export(obj.export)
            raise
        self.save()
        self._fit_group(rep)
        self._journal_again(rep)

    def _remove_engine_devs(self, obj: DeviceObj, rep: ReplicatorObj,
                            what: str = "remove", *, force: bool = False) -> None:
        """Remove ``obj``'s engine devices, all or none: if the engine refuses one,
        the ones already removed are added back; "busy" is raised if it refused
        because of writes not yet copied (Busy), else its error as it is."""
        removed = 0
        try:
            for dev in obj.devs:
                rep.engine.remove_device(dev.dev_nr, force=force)
                removed += 1
        except BaseException as e:
            if removed:
                self._readd_engine_devs(obj, rep, upto=removed)
            if not isinstance(e, Busy):
                raise
            hint = (" (or: dmrepl remove --wait SECONDS; or, if a site is down, "
                    "dmrepl remove --force)") if what == "remove" else ""
            raise ControlError("busy", f"cannot {what} {obj.name} yet: {e}{hint}") from e
        obj.devs = []

    def _readd_engine_devs(self, obj: DeviceObj, rep: ReplicatorObj,
                           upto: int | None = None) -> None:
        n = len(obj.lines) if upto is None else upto
        devs = self._add_devs(rep, obj.lines[:n], local_only=obj.remote_leg is not None)
        obj.devs = devs + obj.devs[n:]
        obj.export.backend = backend_of(obj.lines, obj.devs, journal=obj.mirrored)

    # -- load, suspend, resume ---------------------------------------------------

    def load(self, obj: Obj, table: str) -> None:
        """Check ``table`` and keep it as ``obj``'s inactive table (resume switches)."""
        lines = parse_table(table)
        if lines[0].target != obj.kind:
            raise UserError(f"{obj.name} is a {obj.kind}; cannot load a "
                            f"{lines[0].target} table")
        if isinstance(obj, ReplicatorObj):
            raise UserError("reloading a replicator table is not supported; "
                            "remove its devices and the replicator, then create it again")
        if obj.kjournal is not None or obj.group is not None or obj.remote_leg is not None:
            what = ("a raid1 with a remote leg" if obj.remote_leg is not None
                    else "a kernel journal")
            raise UserError(f"{obj.name} is {what}: its table cannot be "
                            "switched; remove the device and create it with the new table")
        if sum(line.length for line in lines) != obj.sectors:
            raise UserError(f"new table has {sum(x.length for x in lines)} sectors, "
                            f"{obj.name} has {obj.sectors}: resizing is not supported")
        self._check_lines(self._replicator_named_by(lines), lines)
        obj.inactive = lines

    def suspend(self, obj: Obj) -> None:
        for dev in self.devices_of(obj):
            if dev.suspended:
                continue
            if dev.kjournal is not None:   # (no segment swap resumes it meanwhile)
                with dev.kjournal.lock:
                    dev.kjournal.admin_suspend_locked()
                    dev.suspended = True
            else:
                if dev.mapper:
                    _kernel.suspend_mapper(dev.name)   # drains the kernel's queue first
                dev.suspended = True
            dev.export.suspend(timeout=EXPORT_SUSPEND_TIMEOUT)

    def resume(self, obj: Obj) -> None:
        if isinstance(obj, DeviceObj) and obj.inactive is not None:
            old_lines = obj.lines
            self._swap(obj)
            self._resume_devices(obj)
            if obj.mirrored:
                self._delete_mirror_logs_unused(obj, old_lines)
            return
        self._resume_devices(obj)

    def _delete_mirror_logs_unused(self, obj: DeviceObj, old_lines: list[Line]) -> None:
        """Delete the log files of ``obj``'s old lines that no line of its table,
        live now, uses (a new table that moved a line's start: a new file); the old
        table, gone with the resume, held them."""
        in_use = {self._mirror_log_file(obj.name, line) for line in obj.lines}
        for line in old_lines:
            path = self._mirror_log_file(obj.name, line)
            if path not in in_use:
                _kernel.detach_mirror_log(path, delete=True)

    def _resume_devices(self, obj: Obj) -> None:
        for dev in self.devices_of(obj):
            if not dev.suspended:
                continue
            dev.export.resume()
            if dev.kjournal is not None:
                with dev.kjournal.lock:
                    dev.kjournal.admin_resume_locked()
                    dev.suspended = False
            else:
                if dev.mapper:
                    _kernel.resume_mapper(dev.name)
                dev.suspended = False

    def _swap(self, obj: DeviceObj) -> None:
        new = obj.inactive
        assert new is not None
        was_suspended = obj.suspended
        if not was_suspended:
            self.suspend(obj)
        try:
            rep = self._replicator_named_by(new)
            old_rep = self.replicator_of(obj)
            # busy (writes not yet at every site link): nothing changed, the loaded
            # table stays for a later resume
            self._remove_engine_devs(obj, old_rep, "switch the table of")
        except BaseException:
            if not was_suspended:
                self._resume_devices(obj)
            raise
        devs: list[EngineDevice] = []
        try:
            devs = self._add_devs(rep, new)
            if obj.mirrored:
                if not self._mirrorable(devs):
                    raise UserError(f"{obj.name} is a mirror of its local devices: "
                                    "a new table's local devices must be block devices")
                assert obj.nbd is not None
                # a line at an old line's start keeps its log file (the file is
                # named by the start); the others' go once this table is live
                _kernel.load_mirror(obj.name, self._mirror_parts(obj, new, devs), obj.nbd)
        except BaseException:
            for dev in devs:
                with contextlib.suppress(Exception):
                    rep.engine.remove_device(dev.dev_nr)
            self._readd_engine_devs(obj, old_rep)   # put the old table back
            obj.inactive = None
            raise
        obj.lines, obj.devs, obj.replicator, obj.inactive = new, devs, rep.name, None
        obj.export.backend = backend_of(new, devs, journal=obj.mirrored)
        self.save()

    # -- messages ----------------------------------------------------------------

    def message_target(self, obj: Obj, sector: int) -> EngineReplicator | EngineDevice:
        """What a message to ``obj`` at ``sector`` goes to: its engine replicator, or
        the engine device of the table line holding ``sector``."""
        if isinstance(obj, ReplicatorObj):
            return obj.engine
        for i, line in enumerate(obj.lines):
            if line.start <= sector < line.start + line.length:
                return obj.devs[i]
        raise UserError(f"sector {sector} is outside {obj.name} (0..{obj.sectors - 1})")

    def check_message(self, obj: Obj, args: list[str]) -> None:
        """Refuse (UserError, nothing changed) a message that a device's kernel
        structure cannot follow.  A raid1 with a remote leg: its site link
        devices changing (``device add|del``: its writes never enter the
        replication log), its site link made asynchronous or given a fall-behind
        limit (md writes the remote synchronously, whatever the link says).  A
        kernel journal: a site link made synchronous (the kernel completes every
        write before the daemon sees it)."""
        words = [a.lower() for a in args]
        if isinstance(obj, DeviceObj):
            if obj.remote_leg is not None and words[:1] == ["device"]:
                raise UserError(f"{obj.name} is a raid1 with a remote leg: its site link "
                                "devices cannot change; remove it and create it with the "
                                "new table")
            return
        if words[:2] != ["slink", "message"]:
            return
        policy: str | None = None
        fallbehind = False
        i = 3
        while i < len(words):   # (the engine checks the grammar; this reads it only)
            if words[i] == "policy":
                policy = words[i + 1] if i + 1 < len(words) else None
                i += 2
            elif words[i] == "fallbehind":
                fallbehind |= words[i + 2:i + 3] != ["0"]
                i += 3
            else:
                i += 2
        raid1 = [d.name for d in self.devices_of(obj) if d.remote_leg is not None]
        if raid1 and (fallbehind or policy not in (None, "sync")):
            raise UserError(f"{obj.name}'s site link carries {', '.join(raid1)}, a raid1 "
                            "with a remote leg (synchronous in the kernel): it cannot "
                            "become asynchronous or fall behind; remove the device first")
        journaled = [d.name for d in self.devices_of(obj)
                     if d.kjournal is not None or d.group is not None]
        if journaled and policy == "sync":
            raise UserError(f"{obj.name}'s site link carries {', '.join(journaled)}, a "
                            "kernel journal (the kernel completes its writes before the "
                            "daemon sees them): it cannot become synchronous; remove the "
                            "device first")


def _local_only(line: Line) -> str:
    """A ``replicator-dev`` line with its local device (site link 0) only."""
    from dmrepl.replicator.table import parse_device, table_line
    config = parse_device(line.text)
    local = config.leg(0)
    assert local is not None
    return table_line(line.start, line.length, REPLICATOR_DEV,
                      " ".join([config.replicator, str(config.dev_nr), *local.params()]))
