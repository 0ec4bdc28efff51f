"""The daemon's persisted state: the live tables of its objects, in creation order.

``<state-dir>/state.json`` is replaced atomically (a temporary file, fsync,
rename, fsync of the directory) on every change, before the change is
acknowledged; a daemon started on the directory recreates the objects from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class SavedObject:
    """One object as persisted: enough to create it again."""

    name: str
    kind: str
    uuid: str | None
    table: list[str]          # its live table lines
    nbd: str | None = None    # the /dev/nbdN it was attached to (a stale one to detach)
    structure: str = "auto"   # what its creator asked /dev/mapper/NAME to be

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "uuid": self.uuid,
                "table": self.table, "nbd": self.nbd, "structure": self.structure}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> SavedObject:
        return cls(entry["name"], entry.get("kind", ""), entry.get("uuid"),
                   list(entry["table"]), entry.get("nbd"), entry.get("structure", "auto"))


class StateFile:
    """``<state_dir>/state.json``: :meth:`save` replaces it whole, :meth:`load` reads it."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)

    def save(self, objects: Iterable[SavedObject]) -> None:
        state = {"version": STATE_VERSION, "objects": [o.to_json() for o in objects]}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dirfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def load(self) -> list[dict[str, Any]]:
        """The saved objects' entries (``[]`` if there is no state file yet); each is
        read by :meth:`SavedObject.from_json` when it is recreated."""
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return []
        entries: list[dict[str, Any]] = state.get("objects", [])
        return entries
