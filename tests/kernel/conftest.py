"""Shared fixtures of the kernel tier: dm control, loop devices, unique dm names.

Everything a test creates is undone at its teardown, and a session guard fails the
run if any ``dmrepl-test-*`` device is still there at the end (it removes them too,
so the next run starts clean).

Fixtures:

``dm`` (session)
    A ``DmControl`` on ``/dev/mapper/control``.
``loop_device`` (function)
    Factory ``loop_device(size_mb=16) -> "/dev/loopN"``: a sparse file under
    ``$TMPDIR`` attached with ``losetup --find --show``; detached and deleted at
    teardown.
``dm_name`` (function)
    Factory ``dm_name(tag="") -> "dmrepl-test-<tag>-<random>"``: a fresh device name;
    any device of that name left at teardown is removed (with its node).  It
    depends on ``loop_device``, so dm devices go before the loops under them.
``dmsetup``
    Function ``dmsetup(*args) -> stdout``: the oracle, run with ``check=True``.

Probing happens inside fixtures only: on a host without device-mapper the tier's
tests are skipped (or failed under ``--require-kernel``) by tests/conftest.py
before these run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dmrepl.dm import DmControl, DmIoctlError

TEST_PREFIX = "dmrepl-test-"

LoopFactory = Callable[..., str]
NameFactory = Callable[..., str]


def dmsetup(*args: str) -> str:
    """Run ``dmsetup`` (the reference implementation) and return its stdout."""
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"dmsetup {' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()}")
    return proc.stdout


def _dm_available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/mapper/control")


def remove_test_device(dm: DmControl, name: str) -> None:
    """Remove ``name`` if it exists; a device still open is reported, not ignored."""
    if not dm.exists(name):
        # A node could be left by a test that removed the device behind our back.
        with contextlib.suppress(FileNotFoundError):
            path = dm.node_path(name)
            if os.path.exists(path) or os.path.islink(path):
                os.unlink(path)
        return
    with contextlib.suppress(DmIoctlError):
        if dm.info(name).suspended:
            dm.resume(name)  # a suspended device with queued I/O cannot go otherwise
    try:
        dm.remove(name, retry_busy=10.0)
    except DmIoctlError as err:
        if err.errno != errno.ENXIO:
            raise


@pytest.fixture(scope="session")
def dm() -> Iterator[DmControl]:
    control = DmControl()
    try:
        yield control
    finally:
        control.close()


@pytest.fixture(scope="session", autouse=True)
def no_test_devices_left() -> Iterator[None]:
    """Fail the session if a ``dmrepl-test-*`` device outlives the tests (and remove it)."""
    yield
    if not _dm_available():
        return
    with DmControl() as control:
        leftovers = [dev.name for dev in control.list_devices()
                     if dev.name.startswith(TEST_PREFIX)]
        for name in leftovers:
            remove_test_device(control, name)
    assert not leftovers, f"test devices left behind after the session: {leftovers}"


@pytest.fixture
def loop_device() -> Iterator[LoopFactory]:
    attached: list[tuple[str, str]] = []

    def make(size_mb: int = 16) -> str:
        fd, backing = tempfile.mkstemp(prefix="dmrepl-loop-", suffix=".img")
        try:
            os.ftruncate(fd, size_mb * 1024 * 1024)
        finally:
            os.close(fd)
        proc = subprocess.run(["losetup", "--find", "--show", backing],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(backing)
            raise AssertionError(f"losetup --find --show failed: {proc.stderr.strip()}")
        device = proc.stdout.strip()
        attached.append((device, backing))
        return device

    try:
        yield make
    finally:
        errors = []
        for device, backing in reversed(attached):
            proc = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"losetup -d {device}: {proc.stderr.strip()}")
            os.unlink(backing)
        assert not errors, errors


@pytest.fixture
def dm_name(dm: DmControl, loop_device: LoopFactory) -> Iterator[NameFactory]:
    names: list[str] = []

    def make(tag: str = "") -> str:
        middle = f"{tag}-" if tag else ""
        name = f"{TEST_PREFIX}{middle}{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(names):
            remove_test_device(dm, name)


@pytest.fixture(name="dmsetup")
def dmsetup_fixture() -> Callable[..., str]:
    return dmsetup


# -- the dmrepl daemon and a remote site, shared by the test_dmrepl_* modules ----
#
# Starting Python (the daemon) and a site (a network namespace, a veth link and a
# qemu-nbd per disk) costs tens of seconds each under TCG: the session has one of
# each.  Every test takes remote disks of its own from the site (never reused),
# creates its own local and log disks, and gets the site's link up at 20 ms and
# the daemon running (restarted if a test killed it) before it starts.

DMREPL_SITE_DISKS = 32  # one per test that takes one (26 today), and spares
DMREPL_SITE_DISK_MB = 16


@pytest.fixture(scope="session")
def dmrepl_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from dmrepl_testing.daemon import DaemonProcess, KernelLab
    with KernelLab("k") as lab:
        disks = [lab.disk(f"{TEST_PREFIX}site-r{i}", DMREPL_SITE_DISK_MB)
                 for i in range(DMREPL_SITE_DISKS)]
        site = lab.site(disks, delay_ms=20)
        daemon = DaemonProcess(tmp_path_factory.mktemp("dmrepl"),
                               engine=os.environ.get("DMREPL_ENGINE", "auto"),
                               tuning={"retry_interval": 1}).start()
        try:
            yield daemon, site
        finally:
            rc = daemon.stop()
            assert rc == 0, daemon.log()


@pytest.fixture
def dmrepl(dmrepl_session: Any) -> Iterator[Any]:
    """``(daemon, site, lab)``: the shared daemon (running) and site (link up, 20 ms),
    and a KernelLab for the test's own disks (removed after it)."""
    from dmrepl_testing.daemon import KernelLab
    daemon, site = dmrepl_session
    if daemon.proc is None or daemon.proc.poll() is not None:
        daemon.start()
    site.reset(20)
    with KernelLab("t") as lab:
        yield daemon, site, lab
