"""Status of both targets: the ``dmsetup status`` lines (INFO and TABLE) and the
machine-readable dictionary of the replicator."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dmrepl.errors import UserError
from dmrepl.replicator.replog import LOST_CLEAR_MESSAGE
from dmrepl.replicator.table import format_rate

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
        words.append(f"{len(rep.ring.entries)}/{rep.ring.used_bytes() // SECTOR}/"
                     f"{rep.ring.log_size}")
        for nr in sorted(rep.slinks):
            s = rep.slinks[nr]
            words.append(f"{nr}:{'up' if s.up else 'down'}"
                         + (":resync" if s.resyncing else "")
                         + (f":rate={format_rate(s.cfg.resync_rate)}"
                            if s.cfg.resync_rate else ""))
        lost = rep.ring.lost
        if lost["entries"]:
            # a word of its own, last: the other words keep their places
            words.append(f"ERROR:acknowledged_writes_lost={lost['entries']}:"
                         f"{lost['first_seq']}-{lost['last_seq']}")
        return " ".join(words)


def replicator_status_dict(rep: Replicator) -> dict[str, Any]:
    """Machine-readable state (see the keys)."""
    now = time.monotonic()
    with rep.lock:
        ring = rep.ring
        out: dict[str, Any] = {
            "version": VERSION,
            "running": rep.running,
            "event_nr": rep.event_nr,
            "ring": {
                "log_size_sectors": ring.log_size,
                "ring_bytes": ring.ring_end - ring.ring_start,
                "used_bytes": ring.used_bytes(),
                "entries": len(ring.entries),
                "next_seq": ring.next_seq,
                "durable_seq": ring.durable_seq,
                "head_seq": ring.head_seq,
                "replayed_at_open": ring.replayed,
                "created": ring.created,
                "failed": None if ring.failed is None else str(ring.failed),
                **ring.stats,
            },
            "slinks": {},
            "devices": {},
            "stats": dict(rep.stats),
            "notes": list(rep.messages[-10:]),
            "errors": [],
        }
        lost = ring.lost
        out["ring"]["acknowledged_writes_lost"] = (
            {"entries": lost["entries"], "first_seq": lost["first_seq"],
             "last_seq": lost["last_seq"], "whole_devices": bool(lost["whole"]),
             "clear_with": LOST_CLEAR_MESSAGE} if lost["entries"] else None)
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
