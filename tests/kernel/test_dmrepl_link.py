"""Site links over a real (namespaced, netem'd) network: fall-behind, cut and resync."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import pytest

from dmrepl.daemon.testing import DaemonProcess, KernelLab, Replicated, trace

ENGINE = os.environ.get("DMREPL_ENGINE", "auto")
MB = 1 << 20


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon for the module: starting Python in the TCG VM is slow."""
    with tempfile.TemporaryDirectory() as work:
        d = DaemonProcess(work, engine=ENGINE, tuning={"retry_interval": 1}).start()
        try:
            yield d
        finally:
            rc = d.stop()
            assert rc == 0, d.log()


@pytest.fixture
def lab(daemon: DaemonProcess) -> Iterator[tuple[KernelLab, DaemonProcess]]:
    with KernelLab("ln") as lab:
        yield lab, daemon


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


def test_cut_link_writes_continue_dirty_regions_resync(
        lab: tuple[KernelLab, DaemonProcess]) -> None:
    klab, d = lab
    # a small log: while the link is cut the ring fills, entries for the down site
    # are dropped to its dirty log (regions out of sync), writers carry on
    r = Replicated(klab, d, "dmrepl-test-cut", size_mb=16, log_mb=4,
                   remote_policy="async ios 100000", delay_ms=20, region_sectors=512)
    try:
        dd_write(r.mapper(), 0, 2, bs="64k")
        r.wait_converged()
        trace("cutting the link")
        r.site.cut()
        dd_write(r.mapper(), 2, 8, bs="256k", timeout=240)   # must not block on the cut link
        trace("8 MiB written with the link cut")
        st = r.wait_for("the cut site link to be down with regions out of sync",
                        lambda st: st["slinks"]["1"]["state"] == "down"
                        and st["slinks"]["1"]["regions_out_of_sync"] > 0, timeout=120)
        assert not st["slinks"]["1"]["consistent"]
        # the local copy is complete already
        dd_write(r.mapper(), 12, 2)
        trace("restoring the link")
        r.site.restore()
        r.wait_converged(timeout=300)
        subprocess.run(["sync"], check=True)
        cmp_devices(r.mapper(), r.remotes[0])
        cmp_devices(r.locals[0], r.remotes[0])
    finally:
        r.remove()


def test_async_link_falls_behind_forced_sync_and_returns(
        lab: tuple[KernelLab, DaemonProcess]) -> None:
    klab, d = lab
    r = Replicated(klab, d, "dmrepl-test-lag", size_mb=16, log_mb=32,
                   remote_policy="async ios 64", delay_ms=20)
    try:
        # a slow, lossy-free but long link: 400 ms round trips
        r.site.netem(400)
        writer = threading.Thread(target=dd_write, args=(r.mapper(), 0, 2))
        writer.start()
        st = r.wait_for("the async link to fall behind and be forced sync",
                        lambda st: st["slinks"]["1"]["forced_sync"], timeout=120)
        assert st["slinks"]["1"]["lag_ios"] > 64
        r.site.netem(20)
        writer.join(300)
        assert not writer.is_alive()
        st = r.wait_converged()
        assert not st["slinks"]["1"]["forced_sync"]
        assert st["slinks"]["1"]["lag_ios"] == 0
        cmp_devices(r.mapper(), r.remotes[0])
    finally:
        r.remove()
