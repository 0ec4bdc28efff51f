"""Status of both targets: the ``dmsetup status`` lines (INFO and TABLE) and the
machine-readable dictionary of the replicator."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dmrepl.errors import UserError

if TYPE_CHECKING:
    from dmrepl.replicator.device import ReplicatedDevice
    from dmrepl.replicator.target import Replicator

VERSION = "1.0.0"
SECTOR = 512


def replicator_status(rep: Replicator, kind: str = "info") -> str:
    """``info``: ``[v= r= w= rs= ws= nc= c= ]<S|A>,<ios>,<sectors> ... <entries>/
    <sectors used>/<log sectors> <slink>:<up|down>[:resync][:rate=<N>k|m|g] ...``;
    ``table``: the parameters, which parse back to the same configuration."""
    if kind == "table":
        return rep.table()
    if kind != "info":
        raise UserError(f"invalid status type {kind!r}: expected info or table")
    with rep.lock:
        words = []
        if rep.statistics:
            st = rep.stats
            words.append(f"v={VERSION} r={st['r']} w={st['w']} rs={st['rs']} "
                         f"ws={st['ws']} nc={st['nc']} c={st['c']}")
        for nr in sorted(rep.slinks):
            s = rep.slinks[nr]
            words.append(f"{'S' if s.forced else 'A'},{s.out_ios},"
                         f"{s.out_bytes // SECTOR}")
        words.append(rep.replog.status_locked())
        for nr in sorted(rep.slinks):
            s = rep.slinks[nr]
            words.append(s.ops.status(s))
        error = rep.replog.error_status_locked()
        if error is not None:
            # a word of its own, last: the other words keep their places
            words.append(error)
        return " ".join(words)


def replicator_status_dict(rep: Replicator) -> dict[str, Any]:
    """Machine-readable state (see the keys)."""
    now = time.monotonic()
    with rep.lock:
        out: dict[str, Any] = {
            "version": VERSION,
            "running": rep.running,
            "event_nr": rep.event_nr,
            "ring": rep.replog.status_dict_locked(),
            "slinks": {},
            "devices": {},
            "stats": dict(rep.stats),
            "notes": list(rep.messages[-10:]),
            "errors": [],
        }
        report = rep.replog.lost_report()
        if report is not None:
            out["errors"].append(report)
        for nr, s in sorted(rep.slinks.items()):
            ts = rep.replog.oldest_ts_locked(s)
            out_of_sync = 0
            for d in rep.devices.values():
                leg = d.legs.get(nr)
                if leg is not None:
                    out_of_sync += leg.out_of_sync()
            out["slinks"][nr] = {
                "policy": s.cfg.policy,
                "fallbehind": {"type": s.cfg.fallbehind.kind,
                               "value": s.cfg.fallbehind.value},
                "state": "up" if s.up else "down",
                "error": s.error,
                "forced_sync": s.forced,
                "lag_ios": s.out_ios,
                "lag_bytes": s.out_bytes,
                "lag_seconds": 0.0 if ts is None else now - ts,
                "applied_seq": s.applied,
                "durable_seq": s.durable,
                "persisted_seq": s.persisted,
                "drops": s.drops,
                "failures": s.failures,
                "copies": s.copies,
                "copied_bytes": s.copied_bytes,
                "batches": s.batches,
                "copies_in_flight_max": s.inflight_max,
                "resyncing": s.resyncing,
                "resync_rate": s.cfg.resync_rate,
                "resync_throttled": s.resync_throttled,
                "resync_bytes": s.resync_bytes,
                "regions_out_of_sync": out_of_sync,
                "consistent": out_of_sync == 0,
            }
        for nr, d in sorted(rep.devices.items()):
            legs = {}
            for snr, leg in sorted(d.legs.items()):
                info: dict[str, Any] = {"path": leg.cfg.dev_path, "error": leg.error}
                if leg.dlog is not None:
                    with leg.lock:
                        info["regions"] = leg.dlog.region_count
                        info["in_sync"] = leg.dlog.get_sync_count()
                    info["resynced"] = leg.resynced
                legs[snr] = info
            out["devices"][nr] = {"size_bytes": d.size_bytes, "running": d.running,
                                  "legs": legs}
        return out


def device_status(dev: ReplicatedDevice, kind: str = "info") -> str:
    """``info``: ``<replicator> <dev_nr>`` then per site link ``<R|W|RW|A>,-`` (local)
    or ``<R|W|RW|A>,<in_sync>[+]/<regions>``; ``table``: the device's parameters."""
    if kind == "table":
        return dev.table()
    if kind != "info":
        raise UserError(f"invalid status type {kind!r}: expected info or table")
    with dev.rep.lock:
        words = [dev.cfg.replicator, str(dev.dev_nr)]
        for nr, leg in sorted(dev.legs.items()):
            state = leg.error or "A"
            if leg.dlog is None:
                words.append(f"{state},-")
            else:
                s = dev.rep.slinks.get(nr)
                with leg.lock:
                    sync, total = leg.dlog.get_sync_count(), leg.dlog.region_count
                plus = "+" if s is not None and s.resyncing and sync < total else ""
                words.append(f"{state},{sync}{plus}/{total}")
        return " ".join(words)
