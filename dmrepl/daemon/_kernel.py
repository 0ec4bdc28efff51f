"""Present a replicated device as a kernel block device, /dev/mapper/NAME.

The device's NBD export is attached with ``nbd-client`` (netlink mode: the kernel
holds the socket, nbd-client exits) as /dev/nbdN, and NAME is made through
:class:`dmrepl.dm.DmControl`, one target per ``replicator-dev`` table line:

* a local device that is a block device: a dm ``mirror`` (:func:`mirror_target`)
  whose default leg is the local device (every read, and the local copy of every
  write, at the kernel's speed) and whose second leg is /dev/nbdN, the *journal
  leg*: the export logs each write for the remote site links.  Its dirty log is
  the kernel's ``disk`` log on a loop device over a file of the daemon's
  (:func:`attach_mirror_log`).  ``handle_errors keep_log``: when the journal leg
  fails (the daemon died), writes go on to the local device and their regions
  stay marked in the log; a restarted daemon loads the mirror again with a new
  journal leg, and the mirror's recovery copies those regions into it, so into
  the log and to the remote sites.
* otherwise (a file): a ``linear`` target over /dev/nbdN (all I/O through the
  daemon; it fails while the daemon is down).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmrepl.errors import DmreplError

log = logging.getLogger(__name__)


#: What /dev/mapper/NAME of a replicated device may be (``dmrepl create
#: --structure``, the ``structure`` of its status); "auto": the daemon chooses the
#: fastest one its table and site links allow.
STRUCTURES = ("auto", "log-writes", "mirror", "raid1")


class KernelDeviceError(DmreplError):
    """Attaching or detaching a kernel device failed; the message says which step."""


def _nbd_size(index: int) -> int:
    try:
        with open(f"/sys/block/nbd{index}/size") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _nbd_busy(index: int) -> bool:
    return _nbd_size(index) > 0 or os.path.exists(f"/sys/block/nbd{index}/pid")


def nbd_indexes() -> list[int]:
    return sorted(int(p.rsplit("nbd", 1)[1]) for p in glob.glob("/sys/block/nbd*"))


#: Seconds the kernel waits for a request of an nbd device that carries all of a
#: device's I/O (``linear`` over it) before giving it up.
NBD_REQUEST_TIMEOUT = 120


def attach_nbd(server: str | tuple[str, int], export: str, size: int, avoid: set[int],
               timeout: float = 30.0, request_timeout: int | None = None) -> str:
    """Attach ``export`` of ``server`` (a Unix socket's path, or host and port) to
    a free /dev/nbdN and wait until the kernel sees its size.

    ``request_timeout``: seconds after which the kernel gives up a request (with a
    dead daemon: the requests that were in flight when it died; the others fail at
    once)."""
    if not nbd_indexes():
        raise KernelDeviceError("no /dev/nbd* devices: is the nbd module loaded?")
    block = 4096 if size % 4096 == 0 else 512
    last = "no free nbd device"
    for index in nbd_indexes():
        if index in avoid or _nbd_busy(index):
            continue
        path = f"/dev/nbd{index}"
        if not os.path.exists(path):
            continue
        where = (["-u", server] if isinstance(server, str)
                 else [server[0], str(server[1])])
        argv = ["nbd-client", "-N", export, *where, path, "-b", str(block),
                "-t", str(request_timeout or NBD_REQUEST_TIMEOUT)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise KernelDeviceError(f"nbd-client {path}: no answer in {timeout}s") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
            last = f"{path}: {tail[0]}"
            log.info("nbd-client %s failed: %s", path, last)
            continue
        deadline = time.monotonic() + timeout
        while _nbd_size(index) * 512 < size:
            if time.monotonic() > deadline:
                detach_nbd(path)
                raise KernelDeviceError(f"{path} did not show the export's size in {timeout}s")
            time.sleep(0.02)
        return path
    raise KernelDeviceError(f"cannot attach export {export!r}: {last}")


def detach_nbd(path: str) -> None:
    proc = subprocess.run(["nbd-client", "-d", path], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        log.warning("nbd-client -d %s: %s", path, proc.stderr.strip())


def _dm() -> Any:
    from dmrepl.dm import DmControl  # imported late: kernel-free daemons never need it
    return DmControl()


#: The mirror's features: a failed journal leg degrades the mirror (regions marked
#: out of sync, writes go on to the local leg) instead of failing writes, and the
#: regions stay marked in the log; a failed *log* fails writes (nothing would
#: remember what the journal leg missed).
MIRROR_FEATURES = ("handle_errors", "keep_log")
#: Region size of the mirror's dirty log (sectors, a power of two): what a daemon
#: outage resynchronises per region written meanwhile.  4 MiB, DRBD's activity-log
#: extent: fewer log writes than 512 KiB (tools/bench/mirror-ceiling: +12% 4 KiB
#: random writes with qemu-nbd as the second leg).
MIRROR_REGION_SECTORS = 8192
#: Seconds the kernel waits for a journal-leg request before giving it up (a dead
#: daemon's requests in flight; a live daemon answers long before).
JOURNAL_REQUEST_TIMEOUT = 10


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class MirrorPart:
    """One table line of a device as a mirror: sectors [start, start+length) of
    /dev/mapper/NAME; its local device (leg 0, from its sector 0); its dirty log's
    device; the journal leg is /dev/nbdN from sector ``start``."""

    start: int
    length: int
    local: str
    log: str
    #: the log was just made: it starts with every region in sync
    new_log: bool = False


def mirror_target(part: MirrorPart, nbd: str, region: int = MIRROR_REGION_SECTORS) -> Any:
    """``mirror disk 2|3 LOG REGION [nosync] 2 LOCAL 0 NBD START 2 handle_errors keep_log``.

    A new log is loaded with ``nosync``: every region in sync (the remote sites
    get the local data by their own resync, not through the journal).  A log that
    exists is loaded without it: the kernel takes *any* explicit ``sync`` or
    ``nosync`` as "start a new log" and would forget the regions it recorded."""
    from dmrepl.dm.table import Target
    log_args = [part.log, str(region)] + (["nosync"] if part.new_log else [])
    params = (f"disk {len(log_args)} {' '.join(log_args)} 2 {part.local} 0 {nbd} "
              f"{part.start} {len(MIRROR_FEATURES)} {' '.join(MIRROR_FEATURES)}")
    return Target(part.start, part.length, "mirror", params)


def _linear(sectors: int, nbd: str) -> list[Any]:
    from dmrepl.dm.table import Target
    return [Target(0, sectors, "linear", f"{nbd} 0")]


def _place(name: str, targets: list[Any], uuid: str | None) -> str:
    dm = _dm()
    try:
        if dm.exists(name):
            # it survived the daemon: point it at the new nbd device.  skip_lockfs:
            # freezing a filesystem would flush through the dead journal leg
            dm.suspend(name, skip_lockfs=True)
            try:
                dm.load(name, targets)
            finally:
                dm.resume(name)
        else:
            dm.create_device(name, targets, uuid=uuid)
        dm.ensure_node(name)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {e}") from e
    return f"/dev/mapper/{name}"


def create_mapper(name: str, sectors: int, nbd: str, uuid: str | None = None) -> str:
    """Create (or, when it survived a daemon crash, retarget) /dev/mapper/NAME as
    a linear target over /dev/nbdN."""
    return _place(name, _linear(sectors, nbd), uuid)


MAPPER_DIR = "/dev/mapper"

#: A linear table's pieces: (sectors, device, sector on the device), back to back.
LinearParts = list[tuple[int, str, int]]


def _table_ref(dev: str) -> str:
    """``dev`` as a table names it: a device-mapper device (``/dev/mapper/X``) by
    its ``major:minor``, from device-mapper itself.  Its node is udev's to
    replace, and a late udev event of a removed device whose minor X took can
    remove it: a table naming the path would not load then."""
    name = dev.removeprefix(f"{MAPPER_DIR}/")
    if name != dev and "/" not in name:
        info = _dm().info(name)
        if info.exists:
            return f"{info.major}:{info.minor}"
    return dev


def _linear_parts(parts: LinearParts) -> list[Any]:
    from dmrepl.dm.table import Target
    targets, start = [], 0
    for sectors, dev, offset in parts:
        targets.append(Target(start, sectors, "linear", f"{_table_ref(dev)} {offset}"))
        start += sectors
    return targets


def place_linear(name: str, parts: LinearParts, uuid: str | None = None) -> str:
    """Create /dev/mapper/NAME as the linear ``parts``, or leave it as it is if it
    exists (a dead daemon's, taken over)."""
    if mapper_exists(name):
        with contextlib.suppress(OSError):
            _dm().ensure_node(name)
        return f"/dev/mapper/{name}"
    return _create(name, _linear_parts(parts), uuid)


def switch_linear(changes: list[tuple[str, LinearParts]]) -> None:
    """Point live devices at new linear tables together: every new table loaded
    first (inactive), then every device suspended, then each resumed: no write
    reaches a new table before the writes in flight of every device completed
    under its old one.  If a load or a suspend fails, every device keeps its old
    table (resumed)."""
    dm = _dm()
    loaded: list[str] = []
    suspended: list[str] = []
    try:
        for name, parts in changes:
            dm.load(name, _linear_parts(parts))
            loaded.append(name)
        for name, _parts in changes:
            # skip_lockfs: no filesystem freeze (its flush would go through the old
            # tables meanwhile); the writes in flight complete all the same
            dm.suspend(name, skip_lockfs=True)
            suspended.append(name)
    except OSError as e:
        for name in loaded:
            with contextlib.suppress(OSError):
                dm.clear(name)
        for name in suspended:
            with contextlib.suppress(OSError):
                dm.resume(name)
        raise KernelDeviceError(f"device-mapper: switching {', '.join(n for n, _ in changes)}"
                                f" to new tables: {e}") from e
    failed: list[str] = []
    for name, _parts in changes:
        try:
            dm.resume(name)
        except OSError as e:
            failed.append(f"{name}: {e}")
    if failed:
        raise KernelDeviceError("device-mapper: resuming after a table switch: "
                                + "; ".join(failed))


def create_mirror(name: str, parts: list[MirrorPart], nbd: str,
                  uuid: str | None = None) -> str:
    """Create (or, when it survived a daemon crash, load with the new journal
    leg) /dev/mapper/NAME as mirrors of its local devices and /dev/nbdN."""
    return _place(name, [mirror_target(p, nbd) for p in parts], uuid)


def load_mirror(name: str, parts: list[MirrorPart], nbd: str) -> None:
    """Load a new mirror table as NAME's inactive table (a resume switches)."""
    try:
        _dm().load(name, [mirror_target(p, nbd) for p in parts])
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {e}") from e


def mirror_log_size(sectors: int, region: int = MIRROR_REGION_SECTORS) -> int:
    """Bytes of a ``disk`` log for a mirror of ``sectors``: header and bitmap."""
    from dmrepl.dirtylog.format import area_size
    return max(1 << 20, -(-area_size(-(-sectors // region)) // 4096) * 4096)


def _loop_of(path: str) -> str | None:
    real = os.path.realpath(path)
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                if f.read().strip() == real:
                    return "/dev/" + backing.split("/")[3]
        except OSError:
            continue
    return None


def attach_mirror_log(path: str, sectors: int) -> tuple[str, bool]:
    """The loop device over the mirror log file ``path`` (see
    :func:`attach_file_loop`), and whether the file was made now."""
    return attach_file_loop(path, mirror_log_size(sectors))


def attach_file_loop(path: str, size: int) -> tuple[str, bool]:
    """The loop device over the daemon's file ``path`` (made, zeroed, ``size``
    bytes, if it does not exist; grown to ``size`` if smaller; reused if a loop
    device already holds it: its kernel device survived a daemon crash), and
    whether the file was made now."""
    made = False
    try:
        if not os.path.exists(path):
            made = True
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif os.path.getsize(path) < size:
            os.truncate(path, size)
    except OSError as e:
        raise KernelDeviceError(f"{path}: {e.strerror or e}") from e
    found = _loop_of(path)
    if found:
        return found, made
    proc = subprocess.run(["losetup", "--find", "--show", path], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise KernelDeviceError(f"cannot attach {path} to a loop device: "
                                f"{proc.stderr.strip()}")
    return proc.stdout.strip(), made


def detach_mirror_log(path: str, *, delete: bool) -> None:
    """Detach the loop device over a mirror log file (and delete the file)."""
    detach_file_loop(path, delete=delete)


def detach_file_loop(path: str, *, delete: bool) -> None:
    """Detach the loop device over a file of the daemon's (and delete the file)."""
    loop = _loop_of(path)
    if loop:
        proc = subprocess.run(["losetup", "-d", loop], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            log.warning("losetup -d %s: %s", loop, proc.stderr.strip())
    if delete:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@dataclass(frozen=True)
class MirrorStatus:
    """One mirror target's INFO status."""

    in_sync: int   # regions in sync on every leg
    regions: int
    health: str    # one letter per leg: A alive, D write failure, S sync failure, ...

    @property
    def journal_leg_failed(self) -> bool:
        return self.health[1:2] != "A"


def parse_mirror_status(params: str) -> MirrorStatus:
    """``2 LOCAL NBD IN/TOTAL 1 HEALTH <log status>`` (dm-raid1's INFO status)."""
    words = params.split()
    try:
        n = int(words[0])
        done, total = words[1 + n].split("/")
        return MirrorStatus(int(done), int(total), words[3 + n])
    except (ValueError, IndexError) as e:
        raise KernelDeviceError(f"unexpected mirror status {params!r}") from e


def mirror_status(name: str) -> list[MirrorStatus]:
    """The status of each mirror target of NAME ([] if it is not a mirror or gone)."""
    try:
        targets = _dm().status(name)
    except OSError:
        return []
    return [parse_mirror_status(t.params) for t in targets if t.target_type == "mirror"]


def mapper_open_count(name: str) -> int:
    """How many openers /dev/mapper/NAME has (0 when it does not exist).

    An ``O_EXCL`` probe open is not enough: it only conflicts with other exclusive
    openers (mounts), not with a plain ``open(O_RDWR)``."""
    info = _dm().info(name)
    return int(info.open_count) if info.exists else 0


def remove_mapper(name: str) -> None:
    dm = _dm()
    if not dm.exists(name):
        return
    for attempt in range(50):
        try:
            dm.remove(name)
            break
        except OSError as e:
            if attempt == 49:
                raise KernelDeviceError(f"cannot remove /dev/mapper/{name}: "
                                        f"{e.strerror or e}") from e
            time.sleep(0.1)   # udev-less: an opener may still be closing
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/mapper/{name}")


def suspend_mapper(name: str, *, skip_lockfs: bool = False) -> None:
    """Suspend NAME (``skip_lockfs``: without freezing a filesystem on it)."""
    _dm().suspend(name, skip_lockfs=skip_lockfs)


def resume_mapper(name: str) -> None:
    _dm().resume(name)


# -- the kernel journal (dm log-writes; see dmrepl.daemon.kjournal) -------------------

def devno(path: str) -> str:
    """``major:minor`` of a block device node (as the kernel writes tables)."""
    from dmrepl.dm.table import DeviceRef
    return DeviceRef(path=path).resolve().devno


def _logwrites(sectors: int, local: str, segment: str) -> list[Any]:
    from dmrepl.dm import logwrites
    from dmrepl.dm.table import Target
    return [Target(0, sectors, "log-writes",
                   logwrites.target_params(_table_ref(local), segment))]


def _create(name: str, targets: list[Any], uuid: str | None = None) -> str:
    """Create /dev/mapper/NAME with ``targets`` (its node made); its path."""
    dm = _dm()
    try:
        dm.create_device(name, targets, uuid=uuid)
        dm.ensure_node(name)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {e}") from e
    return f"/dev/mapper/{name}"


def create_logwrites(name: str, sectors: int, local: str, segment: str,
                     uuid: str | None = None) -> str:
    """Create /dev/mapper/NAME as ``log-writes LOCAL SEGMENT``."""
    return _create(name, _logwrites(sectors, local, segment), uuid)


def place_logwrites(name: str, sectors: int, local: str, segment: str) -> str:
    """Make the live /dev/mapper/NAME (a mirror) ``log-writes LOCAL SEGMENT`` in
    place (suspend: the writes in flight complete through the old table; load;
    resume).  The old table stays live if the load fails."""
    return _place(name, _logwrites(sectors, local, segment), None)


def logwrites_logdev(name: str) -> str | None:
    """The log device (``major:minor``) of NAME's live log-writes table; None if
    NAME does not exist.  Raises KernelDeviceError if NAME is something else."""
    dm = _dm()
    try:
        if not dm.exists(name):
            return None
        targets = dm.table(name)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {e}") from e
    if len(targets) != 1 or targets[0].target_type != "log-writes":
        raise KernelDeviceError(f"/dev/mapper/{name} exists and is not a kernel journal "
                                f"({', '.join(t.target_type for t in targets)}): remove it")
    return targets[0].params.split()[1]


def resume_if_suspended(name: str) -> bool:
    """Resume NAME if it is suspended (a daemon that died while it was left so,
    writers waiting); True if it was."""
    dm = _dm()
    try:
        if not dm.info(name).suspended:
            return False
        dm.resume(name)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {e}") from e
    return True


def finish_half_swap(name: str) -> bool:
    """Resume NAME if it is suspended or has a table loaded (a daemon that died in
    the middle of a segment swap left it so, writers waiting): the swap completes
    (the loaded table becomes live), so the live table read afterwards is the one
    the kernel journals to, and no later resume switches it behind the daemon's
    back.  True if there was something to finish."""
    dm = _dm()
    try:
        info = dm.info(name)
        if not (info.suspended or info.inactive_table):
            return False
        dm.resume(name)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {e}") from e
    return True


def target_status(name: str, target_type: str, parse: Callable[[str], Any]) -> Any:
    """The parsed status of NAME's first ``target_type`` target; None if NAME is
    gone or has none."""
    try:
        targets = _dm().status(name)
    except OSError:
        return None
    for t in targets:
        if t.target_type == target_type:
            return parse(t.params)
    return None


def logwrites_status(name: str) -> Any:
    """NAME's log-writes status (a ``LogWritesStatus``), None if it is gone."""
    from dmrepl.dm import logwrites
    return target_status(name, "log-writes", logwrites.parse_status)


def swap_logwrites(name: str, sectors: int, local: str, segment: str) -> Any:
    """Journal NAME to ``segment`` from now on (load, suspend, resume: the old
    target, destroyed by the resume, logs what it held and its super block before
    the call returns).  Returns the old target's last status (``disabled``: its
    log filled up)."""
    dm = _dm()
    try:
        dm.load(name, _logwrites(sectors, local, segment))
        # skip_lockfs: no filesystem freeze, the writes in flight complete (and
        # are logged by the old target) before the swap
        dm.suspend(name, skip_lockfs=True)
        try:
            status = logwrites_status(name)
        finally:
            dm.resume(name)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: swapping the journal segment: "
                                f"{e}") from e
    return status


def mapper_exists(name: str) -> bool:
    return bool(_dm().exists(name))


def mapper_write_stat(name: str) -> tuple[int, int]:
    """Writes, discards and flushes NAME completed so far, and the bytes they
    covered (its /sys stat; (-1, -1): no such device)."""
    # (the device's number from device-mapper, not from /dev/mapper/NAME: udev
    # handling a late event of a removed device whose minor NAME took can remove
    # that node, and a missing node must not read as "nothing written")
    try:
        info = _dm().info(name)
        if not info.exists:
            return -1, -1
        with open(f"/sys/dev/block/{info.major}:{info.minor}/stat") as f:
            fields = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return -1, -1
    # write I/Os; discard I/Os; flush I/Os (when the kernel counts them); sectors
    # written; sectors discarded
    return (sum(fields[i] for i in (4, 11, 15) if i < len(fields)),
            512 * sum(fields[i] for i in (6, 13) if i < len(fields)))


def mapper_writes(name: str) -> int:
    """Writes, discards and flushes NAME completed so far (its /sys stat)."""
    return mapper_write_stat(name)[0]


# -- the written-block record under a kernel journal (dm era; see dmrepl.daemon.erarecord)

def create_era(name: str, sectors: int, metadata: str, origin: str,
               block_sectors: int) -> str:
    """Create /dev/mapper/NAME as ``era METADATA ORIGIN BLOCK_SECTORS`` (the
    kernel formats new metadata, opens existing metadata)."""
    from dmrepl.dm import era
    from dmrepl.dm.table import Target
    return _create(name, [Target(0, sectors, "era",
                                 era.target_params(metadata, _table_ref(origin),
                                                   block_sectors))])


def era_status(name: str) -> Any:
    """NAME's era status (an ``EraStatus``), None if it is gone or no era target."""
    from dmrepl.dm import era
    return target_status(name, "era", era.parse_status)


def era_message(name: str, text: str) -> None:
    """Send an era target message (``checkpoint``, ``take_metadata_snap``,
    ``drop_metadata_snap``)."""
    try:
        _dm().message(name, 0, text)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {text}: {e}") from e


def logwrites_origin(name: str) -> str | None:
    """The origin device (``major:minor``) of NAME's live log-writes table."""
    try:
        targets = _dm().table(name)
    except OSError:
        return None
    return targets[0].params.split()[0] if targets else None


def live_target_type(name: str) -> str | None:
    """The target type of NAME's live table (its first target; None if NAME does
    not exist or has no table)."""
    try:
        targets = _dm().table(name)
    except OSError:
        return None
    return str(targets[0].target_type) if targets else None


def mapper_devno(name: str) -> str | None:
    """``major:minor`` of /dev/mapper/NAME (None if it does not exist)."""
    info = _dm().info(name)
    if not info.exists:
        return None
    return f"{info.major}:{info.minor}"
