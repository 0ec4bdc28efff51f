"""Site links over a real (namespaced, netem'd) network: fall-behind, cut and resync.

The daemon and the remote site are the session's (``dmrepl`` in conftest.py); each
test has remote disks of its own."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

from dmrepl_testing.daemon import Replicated, trace

MB = 1 << 20


def dd_write(dev: str, offset_mb: int, count_mb: int, bs: str = "4k",
             timeout: float = 300) -> None:
    proc = subprocess.run(["dd", "if=/dev/urandom", f"of={dev}", f"bs={bs}",
                           f"seek={offset_mb}M", "oflag=direct,seek_bytes",
                           f"count={count_mb}M", "iflag=count_bytes", "status=none"],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr


def cmp_devices(a: str, b: str) -> None:
    proc = subprocess.run(["cmp", a, b], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"cmp {a} {b}: {proc.stdout}{proc.stderr}"


def test_cut_link_writes_continue_dirty_regions_resync(dmrepl: Any) -> None:
    d, site, lab = dmrepl
    # a small log: while the link is cut the ring fills, entries for the down site
    # are dropped to its dirty log (regions out of sync), writers carry on
    with Replicated(lab, d, "dmrepl-test-cut", size_mb=16, log_mb=3,
                    remote_policy="async ios 100000", delay_ms=20, region_sectors=512,
                    site=site, site_disks=site.take()) as r:
        dd_write(r.mapper(), 0, 1, bs="64k")
        r.wait_converged()
        trace("cutting the link")
        site.cut()
        dd_write(r.mapper(), 2, 6, bs="256k", timeout=240)   # twice the log; must not block
        trace("6 MiB written with the link cut")
        st = r.wait_for("the cut site link to be down with regions out of sync",
                        lambda st: st["slinks"]["1"]["state"] == "down"
                        and st["slinks"]["1"]["regions_out_of_sync"] > 0, timeout=120)
        assert not st["slinks"]["1"]["consistent"]
        # the local copy is complete already
        dd_write(r.mapper(), 12, 1)
        trace("restoring the link")
        site.restore()
        r.wait_converged(timeout=300)
        subprocess.run(["sync"], check=True)
        cmp_devices(r.mapper(), r.remotes[0])
        cmp_devices(r.locals[0], r.remotes[0])


def test_async_link_falls_behind_forced_sync_and_returns(dmrepl: Any) -> None:
    d, site, lab = dmrepl
    with Replicated(lab, d, "dmrepl-test-lag", size_mb=16, log_mb=8,
                    structure="mirror", remote_policy="async ios 64", delay_ms=20,
                    site=site, site_disks=site.take()) as r:
        # a slow, lossy-free but long link: 400 ms round trips
        site.netem(400)
        writer = threading.Thread(target=dd_write, args=(r.mapper(), 0, 2))
        writer.start()
        st = r.wait_for("the async link to fall behind and be forced sync",
                        lambda st: st["slinks"]["1"]["forced_sync"], timeout=120)
        assert st["slinks"]["1"]["lag_ios"] > 64
        site.netem(20)
        writer.join(300)
        assert not writer.is_alive()
        st = r.wait_converged()
        assert not st["slinks"]["1"]["forced_sync"]
        assert st["slinks"]["1"]["lag_ios"] == 0
        cmp_devices(r.mapper(), r.remotes[0])
