"""DmControl against the real kernel, with ``dmsetup`` as the oracle for what it reads."""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dmrepl.dm import DeviceRef, DmControl, DmIoctlError, Table, TableError, Target
from dmrepl.dm.ioctl import encode_targets
from dmrepl.errors import UserError

SECTORS_PER_MB = 2048


def dmsetup_info(dmsetup: Callable[..., str], name: str) -> dict[str, str]:
    fields = {}
    for line in dmsetup("info", name).splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def dmsetup_targets(text: str) -> list[Target]:
    return [Target.parse(line) for line in text.splitlines() if line.strip()]


def udev_settle() -> None:
    """Wait until udev handled the events queued so far: a create's event handled
    after a rename would make a link under the old name (udev knows only the name
    the kernel sent with it)."""
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)


@pytest.fixture(autouse=True)
def _udev_idle() -> Iterator[None]:
    """Each test starts and ends with udev idle: its handling of another test's
    events (a /dev/mapper link made or removed) must not race this test's own
    node checks, which are of DmControl's nodes, made without udev."""
    udev_settle()
    yield
    udev_settle()


def devno(path: str) -> tuple[int, int]:
    ref = DeviceRef.parse(path).resolve()
    assert ref.major is not None and ref.minor is not None
    return ref.major, ref.minor


def linear_table(loop: str, mb: int) -> Table:
    return Table([Target(0, mb * SECTORS_PER_MB, "linear", f"{loop} 0")])


def assert_agrees_with_dmsetup(dm: DmControl, dmsetup: Callable[..., str], name: str) -> None:
    """info, table, status, deps and ls of ``name`` as DmControl and dmsetup see them."""
    info = dm.info(name)
    theirs = dmsetup_info(dmsetup, name)
    assert theirs["Name"] == name
    assert theirs["State"] == ("SUSPENDED" if info.suspended else "ACTIVE")
    assert int(theirs["Open count"]) == info.open_count
    assert int(theirs["Event number"]) == info.event_nr
    assert theirs["Major, minor"] == f"{info.major}, {info.minor}"
    present = [slot for slot, there in (("LIVE", info.live_table),
                                        ("INACTIVE", info.inactive_table)) if there]
    assert theirs["Tables present"] == (" & ".join(present) or "None")
    if info.live_table:
        assert int(theirs["Number of targets"]) == info.target_count
    assert theirs.get("UUID", "") == info.uuid

    table_text = dmsetup("table", name)
    assert dm.table(name) == dmsetup_targets(table_text)
    if table_text.strip():
        assert Table.parse(table_text).format().rstrip() == \
            "\n".join(line.rstrip() for line in table_text.splitlines())
    assert dm.status(name) == dmsetup_targets(dmsetup("status", name))

    deps_text = dmsetup("deps", name)
    theirs_deps = sorted((int(a), int(b)) for a, b in re.findall(r"\((\d+), (\d+)\)", deps_text))
    assert sorted(dm.deps(name)) == theirs_deps

    listed = {entry.name: entry for entry in dm.list_devices()}
    assert name in listed
    assert (listed[name].major, listed[name].minor) == (info.major, info.minor)
    ls = {}
    for line in dmsetup("ls").splitlines():
        match = re.match(r"^(\S+)\s+\((\d+)[:,]\s*(\d+)\)", line)
        if match:
            ls[match.group(1)] = (int(match.group(2)), int(match.group(3)))
    assert {n: (e.major, e.minor) for n, e in listed.items()} == ls


def test_version_and_targets_agree_with_dmsetup(dm: DmControl, dmsetup) -> None:
    version = dm.version()
    assert version[0] == 4
    assert f"Driver version:    {'.'.join(map(str, version))}" in dmsetup("version")
    ours = {t.name: t.version for t in dm.list_targets()}
    theirs = {}
    for line in dmsetup("targets").splitlines():
        name, ver = line.split()
        theirs[name] = tuple(int(n) for n in ver.lstrip("v").split("."))
    assert ours == theirs
    assert {"linear", "mirror", "error"} <= set(ours)


def test_linear_lifecycle(dm: DmControl, dmsetup, loop_device, dm_name) -> None:
    loop = loop_device(8)
    name = dm_name("linear")
    table = linear_table(loop, 8)

    created = dm.create(name, uuid=f"DMREPL-TEST-{name}")
    assert created.exists and not created.live_table
    loaded = dm.load(name, table)
    assert loaded.inactive_table and not loaded.live_table
    assert dm.table(name, inactive=True) == list(table.resolve_devices())
    assert_agrees_with_dmsetup(dm, dmsetup, name)

    resumed = dm.resume(name)
    assert resumed.live_table and not resumed.inactive_table and not resumed.suspended
    assert dm.table(name) == list(table.resolve_devices())
    assert dm.deps(name) == [devno(loop)]
    assert_agrees_with_dmsetup(dm, dmsetup, name)

    assert dm.suspend(name).suspended
    assert dm.info(name).suspended
    assert_agrees_with_dmsetup(dm, dmsetup, name)
    assert not dm.resume(name).suspended

    entry = next(e for e in dm.list_devices() if e.name == name)
    assert entry.event_nr == dm.info(name).event_nr
    if dm.version() >= (4, 45, 0):  # older kernels do not list uuids
        assert entry.uuid == f"DMREPL-TEST-{name}"

    assert dm.remove(name) is True
    assert not dm.info(name).exists
    assert name not in dmsetup("ls")


def test_suspend_noflush_and_skip_lockfs(dm: DmControl, dmsetup, loop_device, dm_name) -> None:
    name = dm_name("flags")
    dm.create_device(name, linear_table(loop_device(4), 4))
    assert dm.suspend(name, noflush=True, skip_lockfs=True).suspended
    assert dmsetup_info(dmsetup, name)["State"] == "SUSPENDED"
    dm.resume(name)
    assert dmsetup_info(dmsetup, name)["State"] == "ACTIVE"


def test_zero_and_error_targets(dm: DmControl, dmsetup, dm_name) -> None:
    zero, error = dm_name("zero"), dm_name("error")
    dm.create_device(zero, [Target(0, 4096, "zero")])
    dm.create_device(error, [Target(0, 4096, "error")])
    udev_settle()
    for name in (zero, error):
        assert_agrees_with_dmsetup(dm, dmsetup, name)
    fd = os.open(dm.node_path(zero), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 4096 * 100) == bytes(4096)
        assert dm.info(zero).open_count == 1
    finally:
        os.close(fd)
    fd = os.open(dm.node_path(error), os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as excinfo:
            os.preadv(fd, [mmap.mmap(-1, 4096)], 0)  # page-aligned, as O_DIRECT needs
        assert excinfo.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_reload_clear_and_inactive_table(dm: DmControl, dmsetup, dm_name) -> None:
    name = dm_name("reload")
    dm.create_device(name, [Target(0, 2048, "zero")])
    dm.load(name, [Target(0, 1024, "zero"), Target(1024, 3072, "error")])
    info = dm.info(name)
    assert info.live_table and info.inactive_table
    assert dm.table(name, inactive=True) == [Target(0, 1024, "zero"),
                                             Target(1024, 3072, "error")]
    assert dm.info(name, inactive=True).target_count == 2
    assert_agrees_with_dmsetup(dm, dmsetup, name)
    assert dmsetup_targets(dmsetup("table", "--inactive", name)) == dm.table(name, inactive=True)

    assert not dm.clear(name).inactive_table
    assert dm.table(name) == [Target(0, 2048, "zero")]

    dm.load(name, [Target(0, 1024, "zero"), Target(1024, 3072, "error")])
    dm.suspend(name)
    dm.resume(name)
    assert [t.target_type for t in dm.table(name)] == ["zero", "error"]
    assert_agrees_with_dmsetup(dm, dmsetup, name)


def mirror_in_sync(status: list[Target]) -> bool:
    # mirror status: <#legs> <dev>... <synced>/<total> <resync> <log status...>
    match = re.search(r"\b(\d+)/(\d+)\b", status[0].params)
    assert match, status
    return match.group(1) == match.group(2)


def test_mirror_resync_event_status_and_messages(dm: DmControl, dmsetup, loop_device,
                                                 dm_name) -> None:
    legs = [loop_device(16), loop_device(16)]
    name = dm_name("mirror")
    table = Table([Target(0, 16 * SECTORS_PER_MB, "mirror",
                          f"core 1 1024 2 {legs[0]} 0 {legs[1]} 0")])
    dm.create(name)
    dm.load(name, table)
    before = dm.info(name).event_nr
    dm.resume(name)
    dm.ensure_node(name)

    # Wait for resync by events, without a lost wake-up: read the counter, then
    # the status, then wait for a counter change past what we read.
    seen = before
    for _ in range(20):
        if mirror_in_sync(dm.status(name)):
            break
        seen = dm.wait_event(name, seen, timeout=60).event_nr
    assert mirror_in_sync(dm.status(name))
    assert dm.info(name).event_nr > before, "the resync completion is an event"

    assert dm.table(name) == list(table.resolve_devices())
    assert sorted(dm.deps(name)) == sorted(devno(leg) for leg in legs)
    assert_agrees_with_dmsetup(dm, dmsetup, name)

    # dm core messages work on any device and reply through DM_DATA_OUT_FLAG.
    region = dm.message(name, 0, "@stats_create - /2")
    assert region.strip().isdigit()
    listing = dm.message(name, 0, "@stats_list")
    assert listing == dmsetup("message", name, "0", "@stats_list")
    assert listing.startswith(f"{region.strip()}: 0+")
    assert dm.message(name, 0, f"@stats_delete {region.strip()}") == ""
    assert dm.message(name, 0, "@stats_list") == ""

    # A message the target does not understand is the kernel's EINVAL, clearly reported.
    with pytest.raises(DmIoctlError) as excinfo:
        dm.message(name, 0, "no-such-message")
    assert excinfo.value.errno == errno.EINVAL
    assert excinfo.value.operation == "DM_TARGET_MSG" and excinfo.value.device == name
    assert f"DM_TARGET_MSG on '{name}' failed" in str(excinfo.value)


def test_wait_event_returns_at_once_when_counter_already_moved(dm: DmControl, dm_name) -> None:
    name = dm_name("wait")
    dm.create_device(name, [Target(0, 8, "zero")])
    info = dm.info(name)
    assert dm.wait_event(name, info.event_nr + 1).event_nr == info.event_nr


def test_wait_event_times_out_without_an_event(dm: DmControl, dm_name) -> None:
    name = dm_name("quiet")
    dm.create_device(name, [Target(0, 8, "zero")])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=repr(name)):
        dm.wait_event(name, dm.info(name).event_nr, timeout=0.5)
    assert time.monotonic() - started >= 0.5


def test_wait_event_blocks_until_mirror_event(dm: DmControl, loop_device, dm_name) -> None:
    """A blocking DM_DEV_WAIT started before resume is woken by the resync event.

    The waiter blocks in the kernel while this thread resumes the device: the ioctl
    must not hold the GIL.
    """
    legs = [loop_device(8), loop_device(8)]
    name = dm_name("waiter")
    dm.create(name)
    dm.load(name, [Target(0, 8 * SECTORS_PER_MB, "mirror",
                          f"core 1 1024 2 {legs[0]} 0 {legs[1]} 0")])
    start = dm.info(name).event_nr
    woken: list[int] = []
    waiter = threading.Thread(target=lambda: woken.append(dm.wait_event(name, start).event_nr))
    waiter.start()
    dm.resume(name)
    waiter.join(timeout=120)
    assert not waiter.is_alive(), "wait_event did not return after the resync event"
    assert woken and woken[0] > start


def test_bad_table_unknown_target(dm: DmControl, dm_name) -> None:
    name = dm_name("bad")
    with pytest.raises(DmIoctlError) as excinfo:
        dm.create_device(name, [Target(0, 8, "no-such-target")])
    err = excinfo.value
    assert err.operation == "DM_TABLE_LOAD" and err.device == name
    assert err.errno == errno.EINVAL
    assert str(err) == (f"DM_TABLE_LOAD on '{name}' failed: Invalid argument (EINVAL); "
                        "the kernel log (dmesg) names the bad table argument")
    assert not dm.exists(name)
    assert not os.path.lexists(dm.node_path(name))


@pytest.mark.parametrize("params", ["{loop}", "{loop} 0 extra", "/dev/dmrepl-no-such-dev 0"],
                         ids=["too-few-args", "too-many-args", "missing-device"])
def test_bad_table_rejected_by_kernel_leaves_nothing(dm: DmControl, loop_device, dm_name,
                                                     params: str) -> None:
    name = dm_name("bad")
    target = Target(0, 8, "linear", params.format(loop=loop_device(1)))
    with pytest.raises(DmIoctlError) as excinfo:
        dm.create_device(name, [target])
    assert excinfo.value.operation == "DM_TABLE_LOAD"
    assert excinfo.value.errno in (errno.EINVAL, errno.ENXIO, errno.ENODEV, errno.ENOENT)
    assert f"DM_TABLE_LOAD on '{name}' failed" in str(excinfo.value)
    assert not dm.exists(name)
    assert name not in {e.name for e in dm.list_devices()}


@pytest.mark.parametrize("targets, words", [
    ([Target(0, 16, "zero"), Target(8, 16, "zero")], "overlaps"),
    ([Target(0, 8, "zero"), Target(16, 8, "zero")], "gap"),
    ([Target(8, 8, "zero")], "gap"),
], ids=["overlap", "gap", "not-from-zero"])
def test_bad_layout_refused_before_any_ioctl(dm: DmControl, dm_name, targets: list[Target],
                                             words: str) -> None:
    name = dm_name("layout")
    with pytest.raises(TableError, match=words):
        dm.create_device(name, targets)
    assert not dm.exists(name)


def test_layout_errors_from_kernel_too(dm: DmControl, dm_name) -> None:
    """The kernel refuses a gapped table as well (our check is not the only guard)."""
    name = dm_name("kgap")
    dm.create(name)
    count, payload = encode_targets([Target(0, 8, "zero"), Target(16, 8, "zero")])
    with pytest.raises(DmIoctlError) as excinfo:
        dm.call("DM_TABLE_LOAD", name, payload=payload, target_count=count)
    assert excinfo.value.errno == errno.EINVAL
    assert not dm.info(name).inactive_table


def test_duplicate_name_and_missing_device_errors(dm: DmControl, dm_name) -> None:
    name = dm_name("dup")
    dm.create_device(name, [Target(0, 8, "zero")])
    with pytest.raises(DmIoctlError) as excinfo:
        dm.create(name)
    assert excinfo.value.errno == errno.EBUSY
    assert "already exists" in str(excinfo.value)

    missing = dm_name("missing")
    assert not dm.info(missing).exists
    for call in (lambda: dm.resume(missing), lambda: dm.table(missing),
                 lambda: dm.remove(missing), lambda: dm.message(missing, 0, "@stats_list")):
        with pytest.raises(DmIoctlError) as excinfo:
            call()
        assert excinfo.value.errno == errno.ENXIO
        assert repr(missing) in str(excinfo.value)


def test_names_validated_before_the_kernel(dm: DmControl) -> None:
    with pytest.raises(UserError, match="limit is 127"):
        dm.create("x" * 128)
    with pytest.raises(UserError, match="limit is 128"):
        dm.create("dmrepl-test-uuid", uuid="u" * 129)
    with pytest.raises(UserError):
        dm.create("dmrepl-test-a/b")
    assert not dm.exists("x" * 127)


def test_ensure_node_rename_and_remove(dm: DmControl, dm_name) -> None:
    name, new_name = dm_name("node"), dm_name("renamed")
    info = dm.create_device(name, [Target(0, 8, "zero")])
    udev_settle()
    path = dm.node_path(name)
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == info.dev

    os.unlink(path)
    assert dm.ensure_node(name) == path
    assert os.stat(path).st_rdev == info.dev
    assert dm.ensure_node(name) == path  # idempotent

    dm.rename(name, new_name)
    udev_settle()
    assert not dm.exists(name) and dm.exists(new_name)
    assert not os.path.lexists(path)
    assert os.stat(dm.node_path(new_name)).st_rdev == info.dev

    assert dm.remove(new_name)
    assert not os.path.lexists(dm.node_path(new_name))

    with pytest.raises(DmIoctlError) as excinfo:
        dm.ensure_node(new_name)
    assert excinfo.value.errno == errno.ENXIO


def test_deferred_remove_waits_for_last_close(dm: DmControl, dm_name) -> None:
    name = dm_name("deferred")
    dm.create_device(name, [Target(0, 8, "zero")])
    fd = os.open(dm.node_path(name), os.O_RDONLY)
    try:
        with pytest.raises(DmIoctlError) as excinfo:
            dm.remove(name)
        assert excinfo.value.errno == errno.EBUSY
        assert dm.remove(name, deferred=True) is False
        assert dm.info(name).deferred_remove
    finally:
        os.close(fd)
    # The kernel removes it from a work item after the last close: wait for that.
    deadline = time.monotonic() + 30
    while dm.exists(name):
        assert time.monotonic() < deadline, "deferred removal did not happen after close"
        time.sleep(0.05)


def test_set_uuid(dm: DmControl, dmsetup, dm_name) -> None:
    name = dm_name("uuid")
    dm.create_device(name, [Target(0, 8, "zero")])
    dm.set_uuid(name, f"DMREPL-TEST-{name}")
    assert dm.info(name).uuid == f"DMREPL-TEST-{name}"
    assert dmsetup_info(dmsetup, name)["UUID"] == f"DMREPL-TEST-{name}"
