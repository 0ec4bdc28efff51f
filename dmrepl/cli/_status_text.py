"""The human lines of ``dmrepl status``: under each target's dmsetup-style line
(kept as dmsetup prints it), one indented line per site link saying how far
(lag, in sync), how fast (resync rate) and how long (ETA), in human units."""

from __future__ import annotations

from typing import Any

DASH = "\u2014"  # no rate yet: no ETA


def human_bytes(n: float) -> str:
    """``1.8 MiB``; bytes below 1 KiB as ``512 B``."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def human_duration(seconds: float | None) -> str:
    """``0:01:10`` (h:mm:ss); None: a dash."""
    if seconds is None:
        return DASH
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def slink_line(nr: str, s: dict[str, Any]) -> str:
    """``slink 1: down, async; lag 455 writes, 1.8 MiB, 2.3 s; in sync 97.0%;
    resync 41.2% (12.0 MiB/s, ETA 0:01:10)``."""
    words = [f"slink {nr}: {s['state']}, {s['policy']}"]
    if s.get("forced_sync"):
        words[0] += " (forced sync)"
    words.append(f"lag {s['lag_writes']} writes, {human_bytes(s['lag_bytes'])}, "
                 f"{s['lag_seconds']:.1f} s")
    if s.get("regions"):
        words.append(f"in sync {s['in_sync_percent']:.1f}%")
    if s.get("resyncing"):
        rate = s.get("resync_rate_bps")
        speed = DASH if rate is None else f"{human_bytes(rate)}/s"
        words.append(f"resync {s['in_sync_percent']:.1f}% ({speed}, ETA "
                     f"{human_duration(s.get('resync_eta_seconds'))})")
    return "; ".join(words)


def device_leg_line(nr: str, leg: dict[str, Any]) -> str:
    """``slink 1: down; queued 455 writes, 1.8 MiB; in sync 75.0% (3/4 regions)``."""
    words = [f"slink {nr}: {leg.get('link') or DASH}"
             + (f" (device error {leg['error']})" if leg.get("error") else "")]
    words.append(f"queued {leg['queued_writes']} writes, {human_bytes(leg['queued_bytes'])}")
    if "regions" in leg:
        words.append(f"in sync {leg['in_sync_percent']:.1f}% "
                     f"({leg['regions_in_sync']}/{leg['regions']} regions)"
                     + (", resyncing" if leg.get("resyncing") else ""))
    return "; ".join(words)


def human_lines(desc: dict[str, Any]) -> list[str]:
    """The indented lines under one object of the status op's answer."""
    detail = desc.get("detail")
    lines: list[str] = []
    if desc.get("type") == "replicator" and isinstance(detail, dict):
        for nr, s in detail.get("slinks", {}).items():
            if "lag_writes" in s:
                lines.append("  " + slink_line(nr, s))
    elif isinstance(detail, list):
        journal = desc.get("journal")
        if journal:
            state = ("in sync" if journal["in_sync"] >= journal["regions"]
                     else "copying what the journal leg missed")
            lines.append(f"  journal leg {desc.get('nbd') or DASH}: {state} "
                         f"({journal['in_sync']}/{journal['regions']} regions)")
        remote = desc.get("remote_leg")
        if remote:
            state = ("failed: the remote is down, writes go to the local device only"
                     if remote["failed"] else "in sync" if remote["in_sync"]
                     else f"copying what the remote missed ({remote['action']})")
            lines.append(f"  remote leg {remote.get('device') or DASH} "
                         f"({remote['url']}): {state} "
                         f"({remote['in_sync_sectors']}/{remote['sectors']} sectors)")
        for dev in detail:
            for nr, leg in dev.get("slinks", {}).items():
                if nr != "0" and "queued_writes" in leg:
                    lines.append("  " + device_leg_line(nr, leg))
    return lines
