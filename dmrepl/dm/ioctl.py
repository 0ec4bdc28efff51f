"""Device-mapper control through the ioctls on ``/dev/mapper/control``.

``DmControl`` is what ``dmsetup`` does through libdevmapper, without either:
each method fills one ``struct dm_ioctl`` buffer (declared in
``cdefs.dm_ioctl``), issues one ioctl and decodes the kernel's answer from the
same buffer.  Answers that do not fit come back with ``DM_BUFFER_FULL_FLAG`` and
are retried with a buffer twice as large.

udev: the kernel sends uevents for create/remove/rename/resume; on a system with
udev the dm rules create ``/dev/mapper/NAME``.  We pass cookie 0 (``event_nr``)
with those requests, so no udev flags and no DM_COOKIE semaphore are involved and
nothing waits for udev.  Where udev is absent (the test VM), ``ensure_node``
creates the node the way ``dmsetup mknodes`` does, and ``remove`` deletes a node
we would have created.

Failures raise ``DmIoctlError`` (an ``OSError`` with ``errno``) naming the
operation and the device; invalid names and tables raise ``UserError`` before
any ioctl is issued.
"""

from __future__ import annotations

import errno as errno_mod
import os
import select
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cdefs.dm_ioctl import IOCTLS, ffi, lib
from dmrepl.dm.table import Table, Target
from dmrepl.errors import DmreplError, UserError

CONTROL_PATH = "/dev/mapper/control"
MAPPER_DIR = "/dev/mapper"

#: The interface version we send: major must equal the kernel's; the kernel
#: refuses a minor newer than its own.  4.27 brought deferred remove, the newest
#: feature we rely on (DM_DATA_OUT_FLAG is 4.22).
REQUIRED_VERSION = (lib.DM_VERSION_MAJOR, 27, 0)

_HEADER_SIZE: int = ffi.sizeof("struct dm_ioctl")
_SPEC_SIZE: int = ffi.sizeof("struct dm_target_spec")
_INITIAL_BUFFER = 16 * 1024
_MAX_BUFFER = 64 * 1024 * 1024

#: Why an operation commonly fails, for the error message: (operation, errno) or
#: (None, errno) for any operation.
_HINTS: dict[tuple[str | None, int], str] = {
    ("DM_TABLE_LOAD", errno_mod.EINVAL):
        "the kernel log (dmesg) names the bad table argument",
    ("DM_TABLE_LOAD", errno_mod.ENXIO):
        "a device in the table does not exist (or the dm device is gone)",
    ("DM_TABLE_LOAD", errno_mod.ENODEV):
        "a device in the table does not exist; dmesg names it",
    ("DM_TABLE_LOAD", errno_mod.ENOENT):
        "a device path in the table does not exist",
    ("DM_TABLE_LOAD", errno_mod.EBUSY):
        "a device in the table is held exclusively by someone else",
    ("DM_DEV_CREATE", errno_mod.EBUSY):
        "a device with this name or uuid already exists",
    ("DM_DEV_REMOVE", errno_mod.EBUSY):
        "the device is open (mounted, or used by another device); close it or remove "
        "with deferred=True",
    ("DM_TARGET_MSG", errno_mod.EINVAL):
        "the target rejected the message (or does not take messages); dmesg may say why",
    ("DM_DEV_SUSPEND", errno_mod.EINVAL):
        "resume needs a table: load one first (dmesg may say more)",
    (None, errno_mod.ENXIO): "no such device-mapper device",
    (None, errno_mod.EPERM): "device-mapper control needs root (CAP_SYS_ADMIN)",
    (None, errno_mod.EACCES): "device-mapper control needs root (CAP_SYS_ADMIN)",
    (None, errno_mod.ENOTTY): "not a device-mapper control node",
}


class DmIoctlError(DmreplError, OSError):
    """A device-mapper ioctl failed; the kernel left the device as it was before it.

    ``errno`` is the kernel's error, ``operation`` the ioctl (``DM_TABLE_LOAD``) and
    ``device`` the dm device name (``None`` for global operations).
    """

    def __init__(self, code: int, operation: str, device: str | None,
                 hint: str | None = None) -> None:
        super().__init__(code, os.strerror(code))
        self.operation = operation
        self.device = device
        self.hint = hint if hint is not None else (
            _HINTS.get((operation, code)) or _HINTS.get((None, code)))

    def __str__(self) -> str:
        where = f" on {self.device!r}" if self.device is not None else ""
        code = self.errno or 0
        name = errno_mod.errorcode.get(code, str(code))
        text = f"{self.operation}{where} failed: {self.strerror} ({name})"
        return f"{text}; {self.hint}" if self.hint else text


class DmProtocolError(DmreplError):
    """The kernel's answer could not be decoded (a bug on one side); nothing to retry."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What ``dmsetup info`` shows for one device (``exists=False``: no such device)."""

    name: str
    exists: bool
    uuid: str = ""
    suspended: bool = False
    readonly: bool = False
    open_count: int = 0
    event_nr: int = 0
    major: int = 0
    minor: int = 0
    live_table: bool = False
    inactive_table: bool = False
    target_count: int = 0
    deferred_remove: bool = False

    @property
    def dev(self) -> int:
        """``dev_t`` of the dm block device."""
        return os.makedev(self.major, self.minor)


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device of ``list_devices()`` (``dmsetup ls``); ``uuid`` is None if not reported."""

    name: str
    dev: int
    event_nr: int | None = None
    uuid: str | None = None

    @property
    def major(self) -> int:
        return os.major(self.dev)

    @property
    def minor(self) -> int:
        return os.minor(self.dev)


@dataclass(frozen=True, slots=True)
class TargetVersion:
    """One loaded target type of ``list_targets()`` (``dmsetup targets``)."""

    name: str
    version: tuple[int, int, int]


IoctlFn = Callable[[int, int, bytearray, bool], Any]


def libc_ioctl(fd: int, request: int, buf: bytearray, mutate: bool = True) -> int:
    """ioctl(2) on ``buf`` in place, without holding the GIL (``fcntl.ioctl``'s signature).

    ``fcntl.ioctl`` keeps the GIL while the kernel works on buffers over 1 KiB, so a
    blocking DM_DEV_WAIT or a slow suspend would stop every other thread.
    """
    while True:
        ret = int(lib.ioctl(fd, request, ffi.cast("void *", ffi.from_buffer(buf))))
        if ret >= 0:
            return ret
        code = ffi.errno
        if code != errno_mod.EINTR:
            raise OSError(code, os.strerror(code))


def check_name(name: str) -> bytes:
    """The encoded dm device name, or ``UserError`` if the kernel would refuse it."""
    raw = name.encode()
    if not name:
        raise UserError("device name must not be empty")
    if len(raw) >= lib.DM_NAME_LEN:
        raise UserError(f"device name {name!r} is {len(raw)} bytes; the limit is "
                        f"{lib.DM_NAME_LEN - 1}")
    if "/" in name or "\0" in name or name in (".", ".."):
        raise UserError(f"device name {name!r} must not contain '/' or NUL, nor be '.'/'..'")
    return raw


def check_uuid(uuid: str) -> bytes:
    """The encoded dm uuid, or ``UserError`` if it is too long or contains NUL."""
    raw = uuid.encode()
    if len(raw) >= lib.DM_UUID_LEN:
        raise UserError(f"device uuid {uuid!r} is {len(raw)} bytes; the limit is "
                        f"{lib.DM_UUID_LEN - 1}")
    if "\0" in uuid:
        raise UserError(f"device uuid {uuid!r} must not contain NUL")
    return raw


def _align8(value: int) -> int:
    return (value + 7) & ~7


def _cstring(buf: bytearray, offset: int, end: int | None = None) -> str:
    stop = buf.find(b"\0", offset, end if end is not None else len(buf))
    if stop < 0:
        raise DmProtocolError(f"unterminated string at offset {offset} in the kernel's answer")
    return buf[offset:stop].decode(errors="replace")


def encode_targets(targets: Iterable[Target]) -> tuple[int, bytes]:
    """(count, payload) of ``DM_TABLE_LOAD``: each spec + params + NUL, padded to 8 bytes.

    ``next`` of each spec is the distance from it to the following spec.
    """
    chunks: list[bytes] = []
    for target in targets:
        params = target.params.encode() + b"\0"
        size = _align8(_SPEC_SIZE + len(params))
        spec = ffi.new("struct dm_target_spec *")
        spec.sector_start = target.start
        spec.length = target.length
        spec.next = size
        spec.target_type = target.target_type.encode()
        chunk = bytes(ffi.buffer(spec)) + params
        chunks.append(chunk + b"\0" * (size - len(chunk)))
    return len(chunks), b"".join(chunks)


class Reply:
    """The kernel's answer: the header fields and decoders for the data area."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.header = ffi.from_buffer("struct dm_ioctl *", buf)

    @property
    def flags(self) -> int:
        return int(self.header.flags)

    @property
    def data_start(self) -> int:
        return int(self.header.data_start)

    @property
    def data_end(self) -> int:
        return min(int(self.header.data_size), len(self.buf))

    def info(self, name: str) -> DeviceInfo:
        h = self.header
        flags = self.flags
        dev = int(h.dev)
        return DeviceInfo(
            name=ffi.string(h.name).decode(errors="replace") or name,
            exists=True,
            uuid=ffi.string(h.uuid).decode(errors="replace"),
            suspended=bool(flags & lib.DM_SUSPEND_FLAG),
            readonly=bool(flags & lib.DM_READONLY_FLAG),
            open_count=int(h.open_count),
            event_nr=int(h.event_nr),
            major=os.major(dev),
            minor=os.minor(dev),
            live_table=bool(flags & lib.DM_ACTIVE_PRESENT_FLAG),
            inactive_table=bool(flags & lib.DM_INACTIVE_PRESENT_FLAG),
            target_count=int(h.target_count),
            deferred_remove=bool(flags & lib.DM_DEFERRED_REMOVE),
        )

    def targets(self) -> list[Target]:
        """``DM_TABLE_STATUS``/``DM_DEV_WAIT``: ``next`` counts from the first spec."""
        first = self.data_start
        offset = first
        result: list[Target] = []
        for _ in range(int(self.header.target_count)):
            if offset + _SPEC_SIZE > self.data_end:
                raise DmProtocolError(f"target spec at offset {offset} is past the data end")
            spec = ffi.cast("struct dm_target_spec *", ffi.from_buffer(self.buf) + offset)
            params = _cstring(self.buf, offset + _SPEC_SIZE, self.data_end)
            result.append(Target(int(spec.sector_start), int(spec.length),
                                 ffi.string(spec.target_type).decode(), params.strip()))
            offset = first + int(spec.next)
        return result

    def name_list(self) -> list[DeviceEntry]:
        """``DM_LIST_DEVICES``: records chained by ``next`` (from each record's start)."""
        offset = self.data_start
        end = self.data_end
        entries: list[DeviceEntry] = []
        if offset + 16 > end:
            return entries
        base = ffi.from_buffer(self.buf)
        while True:
            record = ffi.cast("struct dm_name_list *", base + offset)
            if not entries and int(record.dev) == 0:
                return entries  # the kernel marks an empty list with dev 0
            step = int(record.next)
            record_end = offset + step if step else end
            name_at = offset + ffi.offsetof("struct dm_name_list", "name")
            name = _cstring(self.buf, name_at, record_end)
            # Since 4.37 event_nr and flags follow the name, 8-byte aligned; since
            # 4.45 the flags say whether a uuid follows them.
            extra = _align8(name_at + len(name.encode()) + 1)
            event_nr: int | None = None
            uuid: str | None = None
            if extra + 8 <= record_end:
                nums = ffi.cast("uint32_t *", base + extra)
                event_nr = int(nums[0])
                if int(nums[1]) & lib.DM_NAME_LIST_FLAG_HAS_UUID:
                    uuid = _cstring(self.buf, extra + 8, record_end)
                elif int(nums[1]) & lib.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID:
                    uuid = ""
            entries.append(DeviceEntry(name, int(record.dev), event_nr, uuid))
            if not step:
                return entries
            offset += step
            if offset + 16 > end:
                raise DmProtocolError(f"name list record at offset {offset} is past the end")

    def versions(self) -> list[TargetVersion]:
        """``DM_LIST_VERSIONS``: records chained by ``next`` (from each record's start)."""
        offset = self.data_start
        base = ffi.from_buffer(self.buf)
        name_offset = ffi.offsetof("struct dm_target_versions", "name")
        result: list[TargetVersion] = []
        while offset + name_offset < self.data_end:
            record = ffi.cast("struct dm_target_versions *", base + offset)
            name = _cstring(self.buf, offset + name_offset, self.data_end)
            result.append(TargetVersion(name, (int(record.version[0]), int(record.version[1]),
                                               int(record.version[2]))))
            if not record.next:
                break
            offset += int(record.next)
        return result

    def deps(self) -> list[int]:
        """``DM_TABLE_DEPS``: a count and that many ``dev_t``."""
        offset = self.data_start
        if offset + 8 > self.data_end:
            return []
        deps = ffi.cast("struct dm_target_deps *", ffi.from_buffer(self.buf) + offset)
        count = int(deps.count)
        if offset + 8 + 8 * count > self.data_end:
            raise DmProtocolError(f"{count} dependencies do not fit the kernel's answer")
        return [int(deps.dev[i]) for i in range(count)]

    def text(self) -> str:
        """``DM_TARGET_MSG`` output (empty unless the kernel set ``DM_DATA_OUT_FLAG``)."""
        if not self.flags & lib.DM_DATA_OUT_FLAG:
            return ""
        return _cstring(self.buf, self.data_start, self.data_end)


class DmControl:
    """The device-mapper control node: one method per ``dmsetup`` operation.

    ``DmControl()`` opens ``/dev/mapper/control``; ``DmControl(fd=n)`` uses an open
    descriptor (not closed by us).  ``ioctl`` replaces ``fcntl.ioctl`` (a fake
    kernel in tests; default ``libc_ioctl``) and ``mapper_dir`` the directory of the
    device nodes.
    Methods are safe to call from several threads (each call has its own buffer).
    """

    def __init__(self, path: str = CONTROL_PATH, fd: int | None = None, *,
                 ioctl: IoctlFn | None = None, mapper_dir: str = MAPPER_DIR) -> None:
        self.mapper_dir = mapper_dir
        self.path = path
        self._ioctl: IoctlFn = ioctl if ioctl is not None else libc_ioctl
        if fd is not None:
            self.fd, self._owns_fd = fd, False
        else:
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as err:
                raise DmIoctlError(err.errno or errno_mod.EIO, f"open {path}", None,
                                   "is the dm-mod module loaded and are we root?") from err
            self._owns_fd = True

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        # Callers that make a DmControl per operation should not leak descriptors.
        if getattr(self, "_owns_fd", False) and getattr(self, "fd", -1) >= 0:
            os.close(self.fd)

    def __enter__(self) -> DmControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one place that talks to the kernel --------------------------------

    def call(self, operation: str, name: str | None = None, *, uuid: str | None = None,
             flags: int = 0, event_nr: int = 0, payload: bytes = b"",
             target_count: int = 0, retry_full: bool = True) -> Reply:
        """One raw ioctl (``operation`` names it, as in :data:`IOCTLS`), with no
        check of ours before it: what the kernel answers.  The operations below are
        built on it; use it directly only to reach the kernel's own checks.
        :class:`DmIoctlError` carries the errno the kernel returned."""
        raw_name = check_name(name) if name is not None else b""
        raw_uuid = check_uuid(uuid) if uuid is not None else b""
        request = IOCTLS[operation]
        size = max(_INITIAL_BUFFER, _align8(_HEADER_SIZE + len(payload)) + 4096)
        while True:
            buf = bytearray(size)
            header = ffi.from_buffer("struct dm_ioctl *", buf)
            header.version = list(REQUIRED_VERSION)
            header.data_size = size
            header.data_start = _HEADER_SIZE
            header.target_count = target_count
            header.flags = flags
            header.event_nr = event_nr
            header.name = raw_name
            header.uuid = raw_uuid
            buf[_HEADER_SIZE:_HEADER_SIZE + len(payload)] = payload
            try:
                self._ioctl(self.fd, request, buf, True)
            except OSError as err:
                raise DmIoctlError(err.errno or errno_mod.EIO, operation, name) from err
            reply = Reply(buf)
            if not (retry_full and reply.flags & lib.DM_BUFFER_FULL_FLAG):
                return reply
            if size >= _MAX_BUFFER:
                raise DmIoctlError(errno_mod.ENOBUFS, operation, name,
                                   f"the answer does not fit {_MAX_BUFFER} bytes")
            size *= 2

    # -- global operations ----------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """The kernel's dm-ioctl interface version, e.g. (4, 47, 0)."""
        header = self.call("DM_VERSION").header
        return int(header.version[0]), int(header.version[1]), int(header.version[2])

    def list_devices(self) -> list[DeviceEntry]:
        """Every dm device (``dmsetup ls``), in the kernel's order."""
        # DM_UUID_FLAG asks kernels >= 4.45 to add each uuid; older ones ignore it.
        return self.call("DM_LIST_DEVICES", flags=lib.DM_UUID_FLAG).name_list()

    def list_targets(self) -> list[TargetVersion]:
        """Every loaded target type with its version (``dmsetup targets``)."""
        return self.call("DM_LIST_VERSIONS").versions()

    # -- device lifecycle -----------------------------------------------------

    def create(self, name: str, uuid: str | None = None, readonly: bool = False) -> DeviceInfo:
        """Create a device with no table (``dmsetup create --notable``)."""
        flags = lib.DM_READONLY_FLAG if readonly else 0
        return self.call("DM_DEV_CREATE", name, uuid=uuid, flags=flags).info(name)

    def load(self, name: str, targets: Iterable[Target], readonly: bool = False) -> DeviceInfo:
        """Load ``targets`` into the inactive slot (``dmsetup load``); ``resume`` activates it.

        The targets are validated as a ``Table`` first (``UserError`` on gaps/overlaps).
        """
        table = targets if isinstance(targets, Table) else Table(targets)
        count, payload = encode_targets(table)
        flags = lib.DM_READONLY_FLAG if readonly else 0
        return self.call("DM_TABLE_LOAD", name, flags=flags, payload=payload,
                          target_count=count).info(name)

    def resume(self, name: str) -> DeviceInfo:
        """Swap in the inactive table if any and resume I/O (``dmsetup resume``)."""
        return self.call("DM_DEV_SUSPEND", name).info(name)

    def suspend(self, name: str, noflush: bool = False, skip_lockfs: bool = False) -> DeviceInfo:
        """Suspend I/O (``dmsetup suspend [--noflush] [--nolockfs]``)."""
        flags = lib.DM_SUSPEND_FLAG
        if noflush:
            flags |= lib.DM_NOFLUSH_FLAG
        if skip_lockfs:
            flags |= lib.DM_SKIP_LOCKFS_FLAG
        return self.call("DM_DEV_SUSPEND", name, flags=flags).info(name)

    def remove(self, name: str, deferred: bool = False, retry_busy: float = 0.0) -> bool:
        """Remove the device (``dmsetup remove [--deferred] [--retry]``) and our node.

        Returns True when the device is gone; False when ``deferred`` left an open
        device in place, to disappear at its last close.  ``retry_busy`` seconds: keep
        retrying while the device is busy, as ``dmsetup --retry`` does, because udev's
        probe of a new device (blkid) holds it open for a moment after creation.
        """
        before = self.info(name)
        flags = lib.DM_DEFERRED_REMOVE if deferred else 0
        deadline = time.monotonic() + retry_busy
        pause = 0.05
        while True:
            try:
                self.call("DM_DEV_REMOVE", name, flags=flags)
                break
            except DmIoctlError as err:
                if err.errno != errno_mod.EBUSY or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # nothing to wait on: udev's open is invisible to us
            pause = min(pause * 2, 0.5)
        # The kernel echoes DM_DEFERRED_REMOVE either way: ask whether it is gone.
        gone = not deferred or not self.info(name).exists
        if gone:
            self._remove_node(name, before.dev if before.exists else None)
        return gone

    def clear(self, name: str) -> DeviceInfo:
        """Drop the inactive table (``dmsetup clear``)."""
        return self.call("DM_TABLE_CLEAR", name).info(name)

    def rename(self, name: str, new_name: str) -> DeviceInfo:
        """Rename the device (``dmsetup rename``); a node we made follows the name."""
        raw = check_name(new_name)
        before = self.info(name)
        info = self.call("DM_DEV_RENAME", name, payload=raw + b"\0").info(new_name)
        if before.exists and self._remove_node(name, before.dev):
            self.ensure_node(new_name)
        return info

    def set_uuid(self, name: str, uuid: str) -> DeviceInfo:
        """Give a device without uuid one (``dmsetup rename --setuuid``)."""
        raw = check_uuid(uuid)
        return self.call("DM_DEV_RENAME", name, flags=lib.DM_UUID_FLAG,
                          payload=raw + b"\0").info(name)

    def create_device(self, name: str, targets: Iterable[Target], uuid: str | None = None,
                      readonly: bool = False) -> DeviceInfo:
        """create + load + resume + ``ensure_node`` (``dmsetup create``), all or nothing.

        If the load or resume fails the half-made device is removed again, and the
        original error is raised.
        """
        table = targets if isinstance(targets, Table) else Table(targets)
        self.create(name, uuid=uuid, readonly=readonly)
        try:
            self.load(name, table, readonly=readonly)
            self.resume(name)
            self.ensure_node(name)
        except BaseException:
            try:
                self.remove(name)
            except DmIoctlError as cleanup:
                if cleanup.errno != errno_mod.ENXIO:
                    raise
            raise
        return self.info(name)

    # -- queries ----------------------------------------------------------------

    def info(self, name: str, inactive: bool = False) -> DeviceInfo:
        """``dmsetup info``; a missing device gives ``exists=False`` instead of an error.

        ``inactive`` reports the inactive table's target count and mode.
        """
        flags = lib.DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0
        try:
            return self.call("DM_DEV_STATUS", name, flags=flags).info(name)
        except DmIoctlError as err:
            if err.errno == errno_mod.ENXIO:
                return DeviceInfo(name=name, exists=False)
            raise

    def exists(self, name: str) -> bool:
        return self.info(name).exists

    def table(self, name: str, inactive: bool = False) -> list[Target]:
        """The loaded table (``dmsetup table [--inactive]``); devices as ``major:minor``."""
        flags = lib.DM_STATUS_TABLE_FLAG
        if inactive:
            flags |= lib.DM_QUERY_INACTIVE_TABLE_FLAG
        return self.call("DM_TABLE_STATUS", name, flags=flags).targets()

    def status(self, name: str, inactive: bool = False) -> list[Target]:
        """Each target's status line (``dmsetup status``); ``params`` is the status text."""
        flags = lib.DM_QUERY_INACTIVE_TABLE_FLAG if inactive else 0
        return self.call("DM_TABLE_STATUS", name, flags=flags).targets()

    def deps(self, name: str) -> list[tuple[int, int]]:
        """(major, minor) of every device the live table uses (``dmsetup deps``)."""
        return [(os.major(dev), os.minor(dev))
                for dev in self.call("DM_TABLE_DEPS", name).deps()]

    def message(self, name: str, sector: int, text: str) -> str:
        """Send ``text`` to the target at ``sector`` (``dmsetup message``); returns its reply.

        Messages starting with ``@`` go to dm core (``@stats_list``...).  A reply too
        large for the buffer makes us resend the message with a bigger one, as
        libdevmapper does: use messages whose effect is idempotent or whose reply is
        short.
        """
        if not text or "\0" in text:
            raise UserError(f"message must be non-empty text without NUL: {text!r}")
        if sector < 0:
            raise UserError(f"message sector must not be negative (got {sector})")
        msg = ffi.new("struct dm_target_msg *")
        msg.sector = sector
        payload = bytes(ffi.buffer(msg, ffi.sizeof("struct dm_target_msg")))
        return self.call("DM_TARGET_MSG", name, payload=payload + text.encode() + b"\0").text()

    def wait_event(self, name: str, event_nr: int, timeout: float | None = None) -> DeviceInfo:
        """Block until the device's event counter differs from ``event_nr`` (``dmsetup wait``).

        Returns at once if it already differs, so read ``info().event_nr`` before
        doing what will cause the event.  Events: target events (a mirror finishing
        resync or losing a leg, ...) and table changes.  Without ``timeout`` this is
        one blocking DM_DEV_WAIT; with one, it polls a private control descriptor
        armed with DM_DEV_ARM_POLL and raises ``TimeoutError`` when time runs out.
        """
        if timeout is None:
            return self.call("DM_DEV_WAIT", name, event_nr=event_nr,
                              retry_full=False).info(name)
        deadline = time.monotonic() + timeout
        # Arming is per open file: a descriptor of our own cannot be re-armed (and
        # its wake-up lost) by another thread's wait.
        with DmControl(self.path, ioctl=self._ioctl, mapper_dir=self.mapper_dir) as own:
            poller = select.poll()
            poller.register(own.fd, select.POLLIN)
            while True:
                own.call("DM_DEV_ARM_POLL")
                info = own.call("DM_DEV_STATUS", name).info(name)
                if info.event_nr != event_nr:
                    return info
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no event on dm device {name!r} within {timeout} s "
                                       f"(event_nr still {event_nr})")
                poller.poll(left * 1000)

    # -- device nodes -----------------------------------------------------------

    def node_path(self, name: str) -> str:
        check_name(name)
        return os.path.join(self.mapper_dir, name)

    def ensure_node(self, name: str) -> str:
        """Make ``/dev/mapper/NAME`` exist for the device (``dmsetup mknodes NAME``).

        Without udev nothing creates the node.  An existing block node with another
        ``dev_t`` is replaced; a symlink left by udev that resolves to the device is
        kept.  Returns the path.
        """
        info = self.info(name)
        if not info.exists:
            raise DmIoctlError(errno_mod.ENXIO, "ensure_node", name)
        path = self.node_path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == info.dev:
                return path
            os.unlink(path)
        os.makedirs(self.mapper_dir, exist_ok=True)
        try:
            os.mknod(path, 0o600 | stat.S_IFBLK, info.dev)
        except FileExistsError:
            # udev won the race; accept its node if it is the right device.
            st = os.stat(path)
            if not (stat.S_ISBLK(st.st_mode) and st.st_rdev == info.dev):
                raise
        return path

    def _remove_node(self, name: str, dev: int | None) -> bool:
        """Unlink ``/dev/mapper/NAME`` if it is a block node (of ``dev`` when known)."""
        path = self.node_path(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISBLK(st.st_mode) or (dev is not None and st.st_rdev != dev):
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
