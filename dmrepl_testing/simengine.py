"""A stand-in replicator engine: synchronous copies to every site, no journal.

It is an engine as the daemon drives one (:mod:`dmrepl.daemon._engine`'s
protocols, which mypy checks it against), so the daemon and CLI can be exercised
without the real engine (``dmrepl daemon --engine sim``).  It is not a replicator:
there is no log, no async site, no resync.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from dmrepl.blockio import BlockIO, Opener, open_store
from dmrepl.errors import UserError
from dmrepl.numbers import parse_int


def _int(word: str, what: str) -> int:
    return parse_int(word, what)


class SimReplicator:
    def __init__(self, line: str, slinks: dict[int, list[str]],
                 opener: Opener | None = None,
                 on_event: Callable[..., Any] | None = None) -> None:
        self.opener = opener or open_store
        self.on_event: Callable[..., Any] = on_event or (lambda *a, **k: None)
        self.line = line
        self.slinks = slinks
        self.devices: dict[int, SimDevice] = {}
        self.event_nr = 0
        self._cond = threading.Condition()

    @classmethod
    def from_table(cls, line: str, *, opener: Opener | None = None,
                   on_event: Callable[..., Any] | None = None,
                   **tuning: Any) -> SimReplicator:
        words = line.split()
        if len(words) < 6 or words[2] != "replicator":
            raise UserError(f"not a replicator table line: {line!r}")
        if words[3] != "ringbuffer":
            raise UserError(f"unknown replication log type {words[3]!r}")
        n = _int(words[4], "#replog_params")
        i = 5 + n
        if n not in (2, 4) or len(words) < i:
            raise UserError("ringbuffer takes 2 or 4 parameters")
        slinks: dict[int, list[str]] = {}
        while i < len(words):
            if words[i] != "blockdev":
                raise UserError(f"unknown site link type {words[i]!r}")
            if i + 1 >= len(words):
                raise UserError("site link parameter count missing")
            k = _int(words[i + 1], "#slink_params")
            params = words[i + 2:i + 2 + k]
            if k not in (1, 2, 4) or len(params) != k:
                raise UserError(f"site link takes 1, 2 or 4 parameters, got {len(params)}")
            if k >= 2 and params[1] not in ("sync", "async"):
                raise UserError(f"site link policy must be sync or async, not {params[1]!r}")
            slinks[_int(params[0], "slink_nr")] = params
            i += 2 + k
        if 0 not in slinks:
            raise UserError("site link 0 (the local site) is missing")
        return cls(line, slinks, opener, on_event)

    def check_device(self, line: str) -> None:
        self._parse_device(line)

    def add_device(self, line: str) -> SimDevice:
        dev_nr, length, paths = self._parse_device(line)
        if dev_nr in self.devices:
            raise UserError(f"device number {dev_nr} is already in use")
        try:
            stores = {s: self.opener(p) for s, p in paths.items()}
        except OSError as e:
            raise UserError(f"cannot open {e.filename or paths}: {e.strerror}") from e
        dev = SimDevice(self, dev_nr, length * 512, stores, line)
        self.devices[dev_nr] = dev
        self._bump()
        self.on_event("create", "device-add", "device", device=dev_nr, size=length * 512)
        return dev

    def _parse_device(self, line: str) -> tuple[int, int, dict[int, str]]:
        """``(dev_nr, length in sectors, path by site link)`` of a replicator-dev line."""
        words = line.split()
        if len(words) < 5 or words[2] != "replicator-dev":
            raise UserError(f"not a replicator-dev table line: {line!r}")
        length = _int(words[1], "length")
        dev_nr = _int(words[4], "dev_nr")
        i, paths = 5, {}
        while i < len(words):
            slink = _int(words[i], "slink_nr")
            if slink not in self.slinks:
                raise UserError(f"site link {slink} is not defined by the replicator")
            if words[i + 1:i + 2] != ["1"] or i + 5 > len(words):
                raise UserError("blockdev devices take exactly 1 parameter")
            paths[slink] = words[i + 2]
            dlog = words[i + 3]
            if dlog not in ("nolog", "core", "disk"):
                raise UserError(f"unknown dirty log type {dlog!r}")
            i += 5 + _int(words[i + 4], "#dlog_params")
        if 0 not in paths:
            raise UserError("the local device (site link 0) is missing")
        return dev_nr, length, paths

    def remove_device(self, dev_nr: int, *, force: bool = False) -> None:
        del force   # the stand-in copies nothing: nothing is ever pending
        dev = self.devices.pop(dev_nr)
        for store in dev.stores.values():
            store.close()
        self._bump()
        self.on_event("destroy", "device-remove", "device", device=dev_nr)

    def current_state(self) -> list[tuple[str, dict[str, Any]]]:
        """Sites are always up and in sync here (it does not replicate)."""
        return ([("slink", {"slink": nr, "link": "up", "ack": "async", "resync": "idle"})
                 for nr in sorted(self.slinks)]
                + [("device", {"device": nr, "state": "running"})
                   for nr in sorted(self.devices)])

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        for nr in list(self.devices):
            self.remove_device(nr)

    def message(self, argv: Sequence[str]) -> str:
        if list(argv[:1]) == ["ping"]:
            return "pong"
        raise UserError(f"unknown replicator message {' '.join(argv)!r}")

    def status(self, kind: str = "info") -> str:
        del kind
        return f"sim {len(self.slinks)} sites {len(self.devices)} devices"

    def table(self) -> str:
        return " ".join(self.line.split()[3:])

    def status_dict(self) -> dict[str, Any]:
        return {"engine": "sim", "slinks": sorted(self.slinks), "devices": sorted(self.devices)}

    def _bump(self) -> None:
        with self._cond:
            self.event_nr += 1
            self._cond.notify_all()

    def wait_event(self, after: int, timeout: float | None) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.event_nr > after, timeout)
            return self.event_nr


class SimDevice:
    def __init__(self, rep: SimReplicator, dev_nr: int, size: int,
                 stores: dict[int, BlockIO], line: str) -> None:
        self.rep = rep
        self.dev_nr = dev_nr
        self.size_bytes = size
        self.stores = stores
        self.line = line
        self.writes = 0

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        for store in self.stores.values():
            store.pwrite(offset, data)
            if fua:
                store.flush()
        self.writes += 1

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.stores[0].pread(offset, length))

    def flush(self) -> None:
        for store in self.stores.values():
            store.flush()

    def trim(self, offset: int, length: int) -> None:
        del offset, length

    def local_device(self) -> str:
        # replicator-dev <rep> <dev_nr> <slink#> <#dev_params> <dev_path> ...
        return self.line.split()[3:][4]

    def journal(self, *, cached: bool = False) -> SimDevice:
        # (the sim copies to every store itself: writing the local one again,
        # after the kernel did, is harmless)
        return self

    def lost_writes(self, offset: int = 0, length: int | None = None) -> None:
        """The sim has no remote site: nothing to resynchronise."""

    def remote_in_sync(self) -> bool:
        return True

    def behind_limit(self, ios: int = 0, nbytes: int = 0, since: float | None = None) -> bool:
        return False

    def fallbehind_limited(self) -> bool:
        return False

    def message(self, argv: Sequence[str]) -> str:
        if list(argv[:1]) == ["ping"]:
            return "pong"
        raise UserError(f"unknown device message {' '.join(argv)!r}")

    def status(self, kind: str = "info") -> str:
        del kind
        return f"sim writes={self.writes}"

    def status_dict(self) -> dict[str, Any]:
        return {"engine": "sim", "dev_nr": self.dev_nr, "writes": self.writes,
                "size_bytes": self.size_bytes, "slinks": {}}

    def table(self) -> str:
        return " ".join(self.line.split()[3:])
