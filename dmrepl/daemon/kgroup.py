"""A replicator's devices in one kernel journal: their write order across devices.

A kernel journal (:mod:`dmrepl.daemon.kjournal`) logs one device's writes in
the order they completed.  Several devices of one replicator keep that order
*across* them (a database's log on one, its tables on another) when one journal
logs them all: the replicator's *group*::

    /dev/mapper/NAME      (each member) linear: its slice of
    /dev/mapper/.REP.jN   log-writes: the group's kernel journal, over
    /dev/mapper/..REP.jN.era   era: what a crash resynchronises, over
    /dev/mapper/.REP.lN   linear: the members' local devices back to back

The daemon drains the group's journal as it drains one device's; each write goes
to the member its slice falls in (:class:`GroupTarget`), in the journal's order.
Reads and writes never leave the kernel.  What a slice costs over a device's own
journal, measured by ``tools/bench/dm-layers`` (its ``slice`` row): writes
about the same, reads a dm layer more.

A member joins or leaves by a *regroup* (:meth:`dmrepl.daemon.objects.Objects`):
a new group, generation N+1, is built beside the old one; every live member is
switched to its slice of the new group at once (all suspended, then resumed: no
write reaches the new journal before every write in flight under the old
structure completed); the old journal is drained into the replication log, and
only then the new one.  Writers wait a moment; nothing fails.

The group's membership is saved in ``.REP.members`` (the journal directory):
its generation and its members in order.  A restart puts the group back (or
takes over the live one a dead daemon left) once all of them are back.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dmrepl.daemon import _kernel
from dmrepl.daemon._engine import EngineDevice
from dmrepl.daemon.exports import SECTOR, ConcatBackend
from dmrepl.daemon.kjournal import JournalError, JournalTarget, KernelJournal
from dmrepl.nbd.backend import Backend

_T = TypeVar("_T")


class GroupTarget:
    """What a group's journal drains into: its members' engine devices, back to
    back in the group's order (offsets are the group's)."""

    def __init__(self, members: Sequence[tuple[int, EngineDevice]]) -> None:
        self.parts: list[tuple[int, int, EngineDevice]] = []   # (start, bytes, device)
        start = 0
        for sectors, dev in members:
            self.parts.append((start, sectors * SECTOR, dev))
            start += sectors * SECTOR
        self.size_bytes = start

    def journal(self, *, cached: bool = False) -> Backend:
        # (a drained batch has no flush inside: the order of its writes across
        # members is free, as within one device's; a flush ends the batch.  What a
        # member's full ring leaves is written before the batch returns, as the
        # drainer does for one device: its acknowledgements may go unwaited)
        return ConcatBackend([(start, size, dev.journal(cached=cached))
                              for start, size, dev in self.parts],
                             left_now=True)

    def lost_writes(self, offset: int = 0, length: int | None = None) -> None:
        end = self.size_bytes if length is None else offset + length
        for start, size, dev in self.parts:
            lo, hi = max(offset, start), min(end, start + size)
            if lo < hi:
                dev.lost_writes(lo - start, hi - lo)

    def remote_in_sync(self) -> bool:
        return all(dev.remote_in_sync() for _s, _n, dev in self.parts)

    def behind_limit(self, ios: int = 0, nbytes: int = 0, since: float | None = None) -> bool:
        # (the members share their replicator's site links: one answers for all)
        return any(dev.behind_limit(ios, nbytes, since) for _s, _n, dev in self.parts)

    def fallbehind_limited(self) -> bool:
        return any(dev.fallbehind_limited() for _s, _n, dev in self.parts)


@dataclass
class Member:
    """One device of a group: its slice is ``sectors`` long."""

    name: str
    sectors: int
    local: str
    dev: EngineDevice


#: Makes a group's kernel journal: (dm name, sectors, device under it, target).
JournalFactory = Callable[[str, int, str, JournalTarget], KernelJournal]


class KernelGroup:
    """The group of one replicator, one generation (see the module's doc)."""

    def __init__(self, rep: str, gen: int, members: list[Member], directory: str,
                 make_journal: JournalFactory) -> None:
        self.rep = rep
        self.gen = gen
        self.members = members
        self.directory = directory
        self.sectors = sum(m.sectors for m in members)
        self.journal = make_journal(self.dm_name, self.sectors,
                                    f"/dev/mapper/{self.locals_name}",
                                    GroupTarget([(m.sectors, m.dev) for m in members]))

    @property
    def dm_name(self) -> str:
        return f".{self.rep}.j{self.gen}"

    @property
    def locals_name(self) -> str:
        return f".{self.rep}.l{self.gen}"

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def slice(self, name: str) -> _kernel.LinearParts:
        """The linear table of member ``name``: its slice of the group's journal."""
        start = 0
        for m in self.members:
            if m.name == name:
                return [(m.sectors, f"/dev/mapper/{self.dm_name}", start)]
            start += m.sectors
        raise KeyError(name)

    # -- kernel devices ---------------------------------------------------------------

    def open(self, *, start: bool) -> None:
        """The locals' concatenation and the journal over it (made, or a dead
        daemon's taken over); draining starts if ``start`` (else :meth:`start`)."""
        made = not _kernel.mapper_exists(self.locals_name)
        _kernel.place_linear(self.locals_name,
                             [(m.sectors, m.local, 0) for m in self.members])
        try:
            self.journal.open(None, start=start)
        except BaseException:
            with contextlib.suppress(Exception):
                self.journal.close(keep=True)
            if made:
                with contextlib.suppress(Exception):
                    _kernel.remove_mapper(self.locals_name)
            raise

    def start(self) -> None:
        self.journal.start()

    def clear_stale(self) -> None:
        """Remove what a daemon that died building this generation left (its
        devices, its files): a new group starts from nothing."""
        _kernel.remove_mapper(self.dm_name)
        _kernel.remove_mapper(f".{self.dm_name}.era")
        _kernel.remove_mapper(self.locals_name)
        prefix = f"{self.dm_name}."
        for entry in os.listdir(self.directory):
            if entry.startswith(prefix):
                _kernel.detach_file_loop(os.path.join(self.directory, entry), delete=True)

    def retire(self) -> None:
        """After every member went over to another structure: :meth:`close`, the
        files gone, and if draining fails the members resynchronise."""
        self.close(keep=False, resync_on_failure=True)

    def close(self, *, keep: bool, resync_on_failure: bool = False) -> None:
        """Remove the journal's device (its target logs what it held), drain it,
        then the rest (``keep``: its files stay for the next start).  No member
        may be over it any more (their slices are gone or switched).
        ``resync_on_failure``: a failed drain marks the members' writes for
        resync (else it is logged, and the files say the journal was live)."""
        self.journal.stop()
        _kernel.remove_mapper(self.dm_name)
        if resync_on_failure:
            self.journal.drain_replaced_or_resync()
        self.journal.close(keep=keep)
        _kernel.remove_mapper(self.locals_name)

    # -- membership ---------------------------------------------------------------------

    def save(self, replacing: Replacing | None = None) -> None:
        """Save the membership; ``replacing``: the journals this generation is
        replacing, whose content is not yet in the replication log."""
        save_members(self.directory, self.rep, self.gen, self.names, replacing)

    def describe(self) -> dict[str, object]:
        return {**self.journal.describe(), "group": self.names, "device": self.dm_name}


def _members_path(directory: str, rep: str) -> str:
    return os.path.join(directory, f".{rep}.members")


@dataclass
class Replacing:
    """The journals a regroup replaces (saved while it drains them): the old
    group's generation (None: none), the members that were journals of their own."""

    group: int | None
    alone: list[str]


def save_members(directory: str, rep: str, gen: int, names: list[str],
                 replacing: Replacing | None = None) -> None:
    path = _members_path(directory, rep)
    tmp = path + ".tmp"
    saved: dict[str, object] = {"generation": gen, "members": names}
    if replacing is not None:
        saved["replacing"] = {"group": replacing.group, "alone": replacing.alone}
    with open(tmp, "w") as f:
        json.dump(saved, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_saved(directory: str | None, rep: str, parse: Callable[[Any], _T]) -> _T | None:
    """``parse`` of ``rep``'s saved membership (None: none saved); a file it
    cannot read or parse says what to do."""
    if directory is None:
        return None
    path = _members_path(directory, rep)
    try:
        with open(path) as f:
            return parse(json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise JournalError(f"{rep}: kernel journal group state {path} unreadable ({e}): "
                           "remove the replicator's devices and create them again") from e


def saved_members(directory: str | None, rep: str) -> tuple[int, list[str]] | None:
    """The generation and members saved for ``rep``'s group (None: none)."""
    return _read_saved(directory, rep, lambda saved: (
        int(saved["generation"]), [str(n) for n in saved["members"]]))


def _replacing(saved: Any) -> Replacing | None:
    replacing = saved.get("replacing")
    if replacing is None:
        return None
    group = replacing["group"]
    return Replacing(None if group is None else int(group),
                     [str(n) for n in replacing["alone"]])


def saved_replacing(directory: str | None, rep: str) -> Replacing | None:
    """What the regroup that saved ``rep``'s membership was replacing, if it did
    not finish (None: it finished, or there is no group)."""
    return _read_saved(directory, rep, _replacing)


def forget_members(directory: str, rep: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_members_path(directory, rep))
