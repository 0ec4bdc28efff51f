"""Status of both targets: the ``dmsetup status`` lines (INFO and TABLE) and the
machine-readable dictionary of the replicator."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dmrepl.errors import UserError
from dmrepl.replicator.slink.link import Queued

if TYPE_CHECKING:
    from dmrepl.replicator.device import Leg, ReplicatedDevice
    from dmrepl.replicator.slink.link import Slink
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


def queued_locked(rep: Replicator, s: Slink) -> dict[int, Queued]:
    """Per device, the writes site link ``s`` still has to apply: as the site link
    keeps count (:attr:`Slink.queued`), counted again by a walk of its outstanding
    entries when it has no count or one that disagrees with its lag."""
    queued = s.queued
    if queued is None or sum(q.writes for q in queued.values()) != s.out_ios \
            or sum(q.bytes for q in queued.values()) != s.out_bytes:
        queued = s.queued = _count_queued_locked(rep, s)
    return queued


def _count_queued_locked(rep: Replicator, s: Slink) -> dict[int, Queued]:
    out: dict[int, Queued] = {}
    for dev_nr, d in rep.devices.items():
        leg = d.legs.get(s.nr)
        out[dev_nr] = Queued(region_bytes=leg.dlog.region_size * SECTOR
                             if leg is not None and leg.dlog is not None else 0)
    entries = rep.ring.entries
    first = entries[0].seq if entries else rep.ring.next_seq
    # (in order from the first outstanding entry: a deque's index is not O(1))
    for e in itertools.islice(entries, max(0, s.applied + 1 - first), None):
        if s.nr not in e.slinks or e.lost:
            continue
        q = out.get(e.dev)
        if q is None:   # (a device not (yet) added: no regions to count)
            q = out[e.dev] = Queued()
        q.count(e, 1)
    return out


@dataclass
class LegSync:
    """A remote leg's regions as its device line shows them."""

    regions: int
    in_sync: int  # in sync per the dirty log, less the regions with writes queued
    region_bytes: int


def leg_sync_locked(leg: Leg, queued: Queued | None) -> LegSync:
    assert leg.dlog is not None
    with leg.lock:
        total = leg.dlog.region_count
        in_sync = leg.dlog.get_sync_count()
        if queued is not None and queued.regions:
            in_sync -= sum(1 for r in queued.regions
                           if r < total and leg.dlog.in_sync(r))
    return LegSync(total, in_sync, leg.dlog.region_size * SECTOR)


def percent(part: int, whole: int) -> float:
    return 100.0 if whole == 0 else round(100.0 * part / whole, 1)


def replicator_status_dict(rep: Replicator) -> dict[str, Any]:
    """Machine-readable state (see the keys).  Per site link: ``lag_writes``,
    ``lag_bytes``, ``lag_seconds`` (age of the oldest outstanding write); ``sync``:
    regions and bytes in sync (writes queued count as out of sync), ``in_sync_percent``,
    the resync's ``resync_rate_bps`` (measured; None before a first measure) and
    ``resync_eta_seconds`` (None without a rate)."""
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
            queued = queued_locked(rep, s)
            regions = in_sync = bytes_out = 0
            for d in rep.devices.values():
                leg = d.legs.get(nr)
                if leg is not None:
                    out_of_sync += leg.out_of_sync()
                    if leg.dlog is not None:
                        ls = leg_sync_locked(leg, queued.get(d.dev_nr))
                        regions += ls.regions
                        in_sync += ls.in_sync
                        bytes_out += (ls.regions - ls.in_sync) * ls.region_bytes
            s.resync_meter.update(s.resync_bytes, rep.clock())
            rate = s.resync_meter.rate if s.resyncing else None
            eta = (bytes_out / rate) if rate else None
            out["slinks"][nr] = {
                "policy": s.cfg.policy,
                "fallbehind": {"type": s.cfg.fallbehind.kind,
                               "value": s.cfg.fallbehind.value},
                "state": "up" if s.up else "down",
                "error": s.error,
                "forced_sync": s.forced,
                "lag_ios": s.out_ios,
                "lag_writes": s.out_ios,
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
                "regions": regions,
                "regions_in_sync": in_sync,
                "in_sync_percent": percent(in_sync, regions),
                "bytes_out_of_sync": bytes_out,
                "resync_rate_bps": rate,
                "resync_eta_seconds": eta,
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
                # a region with writes queued for the site link is not in sync there
                s = dev.rep.slinks.get(nr)
                ls = leg_sync_locked(leg, None if s is None else
                                     queued_locked(dev.rep, s).get(dev.dev_nr))
                sync, total = ls.in_sync, ls.regions
                plus = "+" if s is not None and s.resyncing and sync < total else ""
                words.append(f"{state},{sync}{plus}/{total}")
        return " ".join(words)


def device_status_dict(dev: ReplicatedDevice) -> dict[str, Any]:
    """A device's machine-readable state: per site link (its leg) the link's state,
    the device's writes queued for it, and its regions in sync (writes queued count
    as out of sync, as on the INFO line)."""
    rep = dev.rep
    with rep.lock:
        legs: dict[int, dict[str, Any]] = {}
        for nr, leg in sorted(dev.legs.items()):
            s = rep.slinks.get(nr)
            q = Queued() if s is None else queued_locked(rep, s).get(dev.dev_nr, Queued())
            info: dict[str, Any] = {
                "path": leg.cfg.dev_path,
                "error": leg.error or None,
                "link": None if s is None else ("up" if s.up else "down"),
                "queued_writes": q.writes,
                "queued_bytes": q.bytes,
            }
            if leg.dlog is not None:
                ls = leg_sync_locked(leg, q)
                info.update(regions=ls.regions, regions_in_sync=ls.in_sync,
                            in_sync_percent=percent(ls.in_sync, ls.regions),
                            resyncing=bool(s is not None and s.resyncing
                                           and ls.in_sync < ls.regions),
                            resynced_regions=leg.resynced)
            legs[nr] = info
        return {"replicator": dev.cfg.replicator, "dev_nr": dev.dev_nr,
                "size_bytes": dev.size_bytes, "running": dev.running,
                "slinks": legs}
