"""DmControl's encoding and decoding, against an in-memory kernel speaking real buffers.

``FakeKernel`` is injected as ``DmControl(fd=-1, ioctl=fake)``: it reads and writes
``struct dm_ioctl`` buffers the way drivers/md/dm-ioctl.c lays them out (name lists
and versions chained from each record, status specs chained from the first spec,
``DM_BUFFER_FULL_FLAG`` when the answer does not fit).  The real kernel is the
oracle in tests/kernel/test_dm_control.py.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from cdefs.dm_ioctl import IOCTLS, ffi, lib
from dmrepl.dm import DmControl, DmIoctlError, Table, Target
from dmrepl.dm.ioctl import encode_targets
from dmrepl.errors import DmreplError, UserError

OPERATIONS = {number: name for name, number in IOCTLS.items()}
HEADER = ffi.sizeof("struct dm_ioctl")
SPEC = ffi.sizeof("struct dm_target_spec")


def align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class FakeDevice:
    minor: int
    uuid: str = ""
    live: list[Target] = field(default_factory=list)
    inactive: list[Target] | None = None
    suspended: bool = False
    event_nr: int = 0


class FakeKernel:
    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.calls: list[str] = []
        self.sizes: list[int] = []
        self.fail: dict[str, int] = {}
        self.next_minor = 0

    def __call__(self, fd: int, request: int, buf: bytearray, mutate: bool) -> int:
        op = OPERATIONS[request]
        self.calls.append(op)
        self.sizes.append(len(buf))
        assert mutate
        h = ffi.from_buffer("struct dm_ioctl *", buf)
        assert h.version[0] == 4 and h.data_size == len(buf) and h.data_start == HEADER
        if op in self.fail:
            raise OSError(self.fail[op], os.strerror(self.fail[op]))
        name = ffi.string(h.name).decode()
        h.version = [4, 47, 0]
        getattr(self, op.lower())(h, buf, name)
        return 0

    # helpers -----------------------------------------------------------------

    def device(self, name: str) -> FakeDevice:
        if name not in self.devices:
            raise OSError(errno.ENXIO, "No such device or address")
        return self.devices[name]

    @staticmethod
    def output(h: Any, buf: bytearray, data: bytes) -> None:
        if h.data_start + len(data) > h.data_size:
            h.flags |= lib.DM_BUFFER_FULL_FLAG
            return
        buf[h.data_start:h.data_start + len(data)] = data
        h.data_size = h.data_start + len(data)

    def fill_info(self, h: Any, name: str) -> None:
        dev = self.devices[name]
        h.dev = os.makedev(254, dev.minor)
        h.event_nr = dev.event_nr
        h.open_count = 0
        h.flags &= ~(lib.DM_SUSPEND_FLAG | lib.DM_ACTIVE_PRESENT_FLAG
                     | lib.DM_INACTIVE_PRESENT_FLAG)
        h.flags |= (lib.DM_SUSPEND_FLAG if dev.suspended else 0) \
            | (lib.DM_ACTIVE_PRESENT_FLAG if dev.live else 0) \
            | (lib.DM_INACTIVE_PRESENT_FLAG if dev.inactive is not None else 0)
        h.target_count = len(dev.live)
        h.uuid = dev.uuid.encode()

    # operations ----------------------------------------------------------------

    def dm_version(self, h: Any, buf: bytearray, name: str) -> None:
        pass

    def dm_list_devices(self, h: Any, buf: bytearray, name: str) -> None:
        out = bytearray()
        if not self.devices:
            out += bytes(16)  # dev 0 marks the empty list
        for index, (dev_name, dev) in enumerate(self.devices.items()):
            start = len(out)
            record = ffi.new("struct dm_name_list *")
            record.dev = os.makedev(254, dev.minor)
            out += bytes(ffi.buffer(record, 12)) + dev_name.encode() + b"\0"
            # Kernel offsets are relative to the ioctl buffer: align there.
            pad = align8(HEADER + len(out)) - (HEADER + len(out))
            out += bytes(pad)
            has = lib.DM_NAME_LIST_FLAG_HAS_UUID if dev.uuid else \
                lib.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID
            out += dev.event_nr.to_bytes(4, "little") + has.to_bytes(4, "little")
            if dev.uuid:
                out += dev.uuid.encode() + b"\0"
            out += bytes(align8(len(out)) - len(out))
            last = index == len(self.devices) - 1
            out[start + 8:start + 12] = (0 if last else len(out) - start).to_bytes(4, "little")
        self.output(h, buf, bytes(out))

    def dm_list_versions(self, h: Any, buf: bytearray, name: str) -> None:
        out = bytearray()
        types = [("linear", (1, 4, 0)), ("mirror", (1, 14, 0))]
        for index, (type_name, version) in enumerate(types):
            body = b"".join(n.to_bytes(4, "little") for n in version) + type_name.encode() + b"\0"
            size = align8(4 + len(body))
            nxt = 0 if index == len(types) - 1 else size
            out += (nxt.to_bytes(4, "little") + body).ljust(size, b"\0")
        self.output(h, buf, bytes(out))

    def dm_dev_create(self, h: Any, buf: bytearray, name: str) -> None:
        if name in self.devices:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.devices[name] = FakeDevice(self.next_minor, ffi.string(h.uuid).decode())
        self.next_minor += 1
        self.fill_info(h, name)

    def dm_table_load(self, h: Any, buf: bytearray, name: str) -> None:
        dev = self.device(name)
        offset, targets = h.data_start, []
        for _ in range(h.target_count):
            spec = ffi.cast("struct dm_target_spec *", ffi.from_buffer(buf) + offset)
            assert offset % 8 == 0
            end = buf.index(b"\0", offset + SPEC)
            targets.append(Target(spec.sector_start, spec.length,
                                  ffi.string(spec.target_type).decode(),
                                  buf[offset + SPEC:end].decode()))
            offset += spec.next  # relative to this spec on load
        if any(t.target_type == "bad" for t in targets):
            raise OSError(errno.EINVAL, "Invalid argument")
        dev.inactive = targets
        self.fill_info(h, name)

    def dm_dev_suspend(self, h: Any, buf: bytearray, name: str) -> None:
        dev = self.device(name)
        if h.flags & lib.DM_SUSPEND_FLAG:
            dev.suspended = True
        else:
            if dev.inactive is not None:
                dev.live, dev.inactive = dev.inactive, None
                dev.event_nr += 1
            dev.suspended = False
        self.fill_info(h, name)

    def dm_dev_status(self, h: Any, buf: bytearray, name: str) -> None:
        self.device(name)
        self.fill_info(h, name)

    def dm_dev_remove(self, h: Any, buf: bytearray, name: str) -> None:
        self.device(name)
        del self.devices[name]

    def dm_table_status(self, h: Any, buf: bytearray, name: str) -> None:
        dev = self.device(name)
        out = bytearray()
        for target in dev.live:
            text = target.params if h.flags & lib.DM_STATUS_TABLE_FLAG else "A 1/1"
            raw = text.encode() + b"\0"
            size = align8(SPEC + len(raw))
            spec = ffi.new("struct dm_target_spec *")
            spec.sector_start, spec.length = target.start, target.length
            spec.target_type = target.target_type.encode()
            spec.next = len(out) + size  # on output, counted from the first spec
            out += (bytes(ffi.buffer(spec)) + raw).ljust(size, b"\0")
        self.fill_info(h, name)
        self.output(h, buf, bytes(out))

    def dm_table_deps(self, h: Any, buf: bytearray, name: str) -> None:
        self.device(name)
        devs = [os.makedev(7, 0), os.makedev(259, 70000)]
        data = len(devs).to_bytes(4, "little") + bytes(4) + \
            b"".join(d.to_bytes(8, "little") for d in devs)
        self.fill_info(h, name)
        self.output(h, buf, data)

    def dm_target_msg(self, h: Any, buf: bytearray, name: str) -> None:
        self.device(name)
        msg = ffi.cast("struct dm_target_msg *", ffi.from_buffer(buf) + h.data_start)
        text = ffi.string(msg.message).decode()
        if text == "quiet":
            return
        h.flags |= lib.DM_DATA_OUT_FLAG
        self.output(h, buf, f"sector {msg.sector}: {text}".encode() + b"\0")

    def dm_dev_wait(self, h: Any, buf: bytearray, name: str) -> None:
        dev = self.device(name)
        assert dev.event_nr != h.event_nr, "the fake cannot block"
        self.fill_info(h, name)

    def dm_dev_rename(self, h: Any, buf: bytearray, name: str) -> None:
        dev = self.device(name)
        new = buf[h.data_start:buf.index(b"\0", h.data_start)].decode()
        if h.flags & lib.DM_UUID_FLAG:
            dev.uuid = new
        else:
            self.devices[new] = self.devices.pop(name)
            name = new
        self.fill_info(h, name)

    def dm_table_clear(self, h: Any, buf: bytearray, name: str) -> None:
        self.device(name).inactive = None
        self.fill_info(h, name)


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def dm(kernel: FakeKernel, tmp_path: Any) -> DmControl:
    return DmControl(fd=-1, ioctl=kernel, mapper_dir=str(tmp_path / "mapper"))


def test_encode_targets_layout() -> None:
    count, payload = encode_targets([Target(0, 8, "zero"), Target(8, 8, "linear", "7:0 0")])
    assert count == 2
    first = ffi.cast("struct dm_target_spec *", ffi.from_buffer(payload))
    assert (first.sector_start, first.length, first.next) == (0, 8, 48)
    assert ffi.string(first.target_type) == b"zero"
    second = ffi.cast("struct dm_target_spec *", ffi.from_buffer(payload) + 48)
    assert (second.sector_start, second.length) == (8, 8)
    assert payload[48 + SPEC:].rstrip(b"\0") == b"7:0 0"
    assert len(payload) % 8 == 0 and second.next == len(payload) - 48


def test_create_load_resume_and_read_back(dm: DmControl, kernel: FakeKernel) -> None:
    table = Table.parse("0 8 zero\n8 100 linear 7:0 0\n")
    assert dm.version() == (4, 47, 0)
    created = dm.create("m1", uuid="U-1")
    assert created.exists and created.uuid == "U-1" and (created.major, created.minor) == (254, 0)
    loaded = dm.load("m1", table)
    assert loaded.inactive_table and not loaded.live_table
    info = dm.resume("m1")
    assert info.live_table and not info.inactive_table and info.target_count == 2
    assert dm.table("m1") == list(table)
    assert dm.status("m1") == [Target(0, 8, "zero", "A 1/1"), Target(8, 100, "linear", "A 1/1")]
    assert dm.suspend("m1").suspended
    assert not dm.resume("m1").suspended
    assert dm.deps("m1") == [(7, 0), (259, 70000)]
    assert [(v.name, v.version) for v in dm.list_targets()] == \
        [("linear", (1, 4, 0)), ("mirror", (1, 14, 0))]
    assert kernel.calls[:4] == ["DM_VERSION", "DM_DEV_CREATE", "DM_TABLE_LOAD", "DM_DEV_SUSPEND"]


def test_list_devices_decodes_names_event_numbers_and_uuids(dm: DmControl,
                                                            kernel: FakeKernel) -> None:
    assert dm.list_devices() == []
    for name, uuid in (("a", ""), ("bb-longer-name", "UUID-bb"), ("c" * 127, "u" * 128)):
        dm.create(name, uuid=uuid or None)
    kernel.devices["a"].event_nr = 7
    entries = dm.list_devices()
    assert [(e.name, e.major, e.minor, e.event_nr, e.uuid) for e in entries] == [
        ("a", 254, 0, 7, ""), ("bb-longer-name", 254, 1, 0, "UUID-bb"),
        ("c" * 127, 254, 2, 0, "u" * 128)]


def test_answers_that_do_not_fit_are_retried_with_a_bigger_buffer(
        dm: DmControl, kernel: FakeKernel) -> None:
    for i in range(300):
        dm.create(f"device-with-a-long-name-{i:04d}-" + "x" * 60, uuid=f"UUID-{i}-" + "y" * 60)
    kernel.calls.clear()
    kernel.sizes.clear()
    entries = dm.list_devices()
    assert len(entries) == 300 and entries[299].uuid == "UUID-299-" + "y" * 60
    assert kernel.calls.count("DM_LIST_DEVICES") >= 2
    assert kernel.sizes == sorted(kernel.sizes) and kernel.sizes[-1] > kernel.sizes[0]


def test_big_tables_get_a_big_enough_buffer(dm: DmControl) -> None:
    targets = [Target(i * 8, 8, "linear", f"7:{i} 0 " + "p" * 200) for i in range(200)]
    dm.create("big")
    dm.load("big", targets)
    dm.resume("big")
    assert dm.table("big") == targets


def test_message_reply_and_no_reply(dm: DmControl) -> None:
    dm.create("m")
    assert dm.message("m", 1024, "@stats_list") == "sector 1024: @stats_list"
    assert dm.message("m", 0, "quiet") == ""
    with pytest.raises(UserError):
        dm.message("m", 0, "")
    with pytest.raises(UserError):
        dm.message("m", -1, "x")


def test_create_device_removes_the_half_made_device(dm: DmControl, kernel: FakeKernel) -> None:
    with pytest.raises(DmIoctlError) as excinfo:
        dm.create_device("m1", [Target(0, 8, "bad")])
    err = excinfo.value
    assert isinstance(err, OSError) and isinstance(err, DmreplError)
    assert err.errno == errno.EINVAL and err.operation == "DM_TABLE_LOAD" and err.device == "m1"
    assert str(err) == ("DM_TABLE_LOAD on 'm1' failed: Invalid argument (EINVAL); "
                        "the kernel log (dmesg) names the bad table argument")
    assert kernel.devices == {}
    assert kernel.calls[-1] == "DM_DEV_REMOVE"

    kernel.fail["DM_DEV_SUSPEND"] = errno.EIO
    with pytest.raises(DmIoctlError) as excinfo:
        dm.create_device("m2", [Target(0, 8, "zero")])
    assert excinfo.value.operation == "DM_DEV_SUSPEND"
    assert kernel.devices == {}


def test_invalid_input_never_reaches_the_kernel(dm: DmControl, kernel: FakeKernel) -> None:
    for bad in ("", "a/b", ".", "..", "x" * 128, "nul\0"):
        with pytest.raises(UserError):
            dm.create(bad)
    with pytest.raises(UserError, match="limit is 128"):
        dm.create("ok", uuid="u" * 129)
    with pytest.raises(UserError, match="overlaps"):
        dm.create_device("ok", [Target(0, 8, "zero"), Target(4, 8, "zero")])
    with pytest.raises(UserError, match="gap"):
        dm.load("ok", [Target(0, 8, "zero"), Target(9, 8, "zero")])
    assert kernel.calls == []
    dm.create("x" * 127, uuid="u" * 128)  # the longest accepted


def test_errors_and_missing_devices(dm: DmControl, kernel: FakeKernel) -> None:
    assert dm.info("nope") == type(dm.info("nope"))(name="nope", exists=False)
    assert not dm.exists("nope")
    with pytest.raises(DmIoctlError) as excinfo:
        dm.table("nope")
    assert str(excinfo.value) == ("DM_TABLE_STATUS on 'nope' failed: No such device or "
                                  "address (ENXIO); no such device-mapper device")
    dm.create("dup")
    with pytest.raises(DmIoctlError, match="already exists") as excinfo:
        dm.create("dup")
    assert excinfo.value.errno == errno.EBUSY
    kernel.fail["DM_VERSION"] = errno.EACCES
    with pytest.raises(DmIoctlError, match=r"^DM_VERSION failed: .*needs root"):
        dm.version()


def test_rename_set_uuid_clear_wait_and_remove(dm: DmControl, kernel: FakeKernel) -> None:
    dm.create("old")
    dm.load("old", [Target(0, 8, "zero")])
    assert dm.clear("old").inactive_table is False
    dm.load("old", [Target(0, 8, "zero")])
    before = dm.info("old").event_nr
    dm.resume("old")
    assert dm.wait_event("old", before).event_nr == before + 1
    dm.rename("old", "new")
    assert set(kernel.devices) == {"new"}
    assert dm.set_uuid("new", "NEW-UUID").uuid == "NEW-UUID"
    assert dm.remove("new") is True
    assert kernel.devices == {}


def test_libc_ioctl_reports_errno() -> None:
    from dmrepl.dm.ioctl import libc_ioctl
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(OSError) as excinfo:
            libc_ioctl(fd, IOCTLS["DM_VERSION"], bytearray(HEADER))
        assert excinfo.value.errno == errno.ENOTTY
        with pytest.raises(DmIoctlError, match=r"DM_VERSION failed: .*ENOTTY.*not a device-mapper"):
            DmControl(fd=fd).version()
    finally:
        os.close(fd)


def test_remove_retries_a_transiently_busy_device_only_when_asked(kernel: FakeKernel,
                                                                   tmp_path: Any) -> None:
    busy_left = [2]

    def udev_probing(fd: int, request: int, buf: bytearray, mutate: bool) -> int:
        if OPERATIONS[request] == "DM_DEV_REMOVE" and busy_left[0] > 0:
            busy_left[0] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy")
        return kernel(fd, request, buf, mutate)

    dm = DmControl(fd=-1, ioctl=udev_probing, mapper_dir=str(tmp_path / "mapper"))
    dm.create("probed")
    with pytest.raises(DmIoctlError) as excinfo:
        dm.remove("probed")
    assert excinfo.value.errno == errno.EBUSY and dm.exists("probed")
    assert dm.remove("probed", retry_busy=5.0)
    assert busy_left == [0] and not dm.exists("probed")
    kernel.fail["DM_DEV_REMOVE"] = errno.EBUSY  # really open: the retry gives up
    dm.create("held")
    with pytest.raises(DmIoctlError):
        dm.remove("held", retry_busy=0.2)
