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
