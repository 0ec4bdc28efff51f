"""The remote leg: /dev/mapper/NAME as a dm ``raid1`` of the local device and the
remote site's NBD export, for a synchronous site link.

A device whose replicator's only remote site link is ``sync`` and whose remote
device is an NBD export needs every write on the remote before it is
acknowledged: that is what a raid1 does.  The kernel's nbd client attaches the
remote export as /dev/nbdN (the kernel holds the socket) and ``raid raid1``
(md's raid1 through dm-raid) writes each write to both legs and completes it
once both have it; reads stay on the local leg (``write_mostly 1``).  No write
or read crosses the daemon, so its death changes nothing for the device.

md's write-intent bitmap (on a small metadata file of the daemon's per leg,
attached to a loop device) marks each region before it is written and clears
it once both legs have it.  What each failure costs:

* the daemon dies: nothing; the next daemon finds the device and adopts it;
* the remote leg fails (the link or the site is down; the kernel gives a
  request up after the ``remote_timeout`` knob's seconds, 10 by default): md
  goes on with the local leg, the bitmap keeping every region written
  meanwhile; the daemon attaches the export again once it answers and loads
  it as the leg, and md copies the marked regions (the remote is inconsistent
  until then, as a DRBD SyncTarget);
* the whole primary crashes (or the daemon stops): before the device is made
  again, the daemon reads both bitmaps and md's recovery positions from the
  metadata files, copies every region they name from the local device to the
  remote, and starts md on new metadata (``nosync``: both legs equal).

Files live in the daemon's state directory (``raid/``): ``NAME.meta0``,
``NAME.meta1`` and ``NAME.raid`` (the device was made with this structure)."""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

from dmrepl.daemon import _kernel
from dmrepl.dm import mdraid
from dmrepl.errors import DmreplError, UserError

log = logging.getLogger(__name__)

#: Region of md's write-intent bitmap (sectors): what a remote outage
#: resynchronises per region written meanwhile (4 MiB, the mirror's region).
REGION_SECTORS = _kernel.MIRROR_REGION_SECTORS
#: Bytes of each leg's metadata file: dm-raid's superblock (4 KiB), md's bitmap.
META_BYTES = 4 << 20
#: Seconds the kernel waits for a request to the remote before giving it up
#: (md then fails the leg and goes on with the local device).
REQUEST_TIMEOUT = 10
#: Seconds a reconnection's TCP probe waits for the site (not nbd-client's
#: minutes of SYN retries against a site that is down).
PROBE_TIMEOUT = 3.0
COPY_CHUNK = 1 << 20
SECTOR = 512

class RemoteLegError(DmreplError):
    """The remote leg of a device cannot be made or attached; the message says why."""


def remote_address(url: str) -> tuple[str | tuple[str, int], str]:
    """``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``: the
    address for nbd-client (a socket path or (host, port)) and the export."""
    parsed = urlparse(url)
    export = parsed.path.lstrip("/")
    if parsed.scheme == "nbd":
        if not parsed.hostname:
            raise UserError(f"{url}: no host")
        return (parsed.hostname, parsed.port or 10809), export
    if parsed.scheme == "nbd+unix":
        sockets = parse_qs(parsed.query).get("socket")
        if not sockets:
            raise UserError(f"{url}: no socket=PATH")
        return sockets[0], export
    raise UserError(f"{url}: not an NBD URL (nbd:// or nbd+unix://)")


@dataclass(frozen=True)
class RaidStatus:
    """``raid1 2 AA 262144/262144 idle 0 0 -``: per leg A (alive, in sync), a
    (alive, not in sync), D (dead) or - (missing: started without it); sectors in
    sync / all; md's action."""

    health: str
    done: int
    total: int
    action: str

    @property
    def remote_failed(self) -> bool:
        return self.health[1:2] in ("D", "-")

    @property
    def in_sync(self) -> bool:
        return self.health == "AA" and self.done >= self.total and self.action == "idle"


def parse_raid_status(params: str) -> RaidStatus:
    words = params.split()
    try:
        done, total = words[3].split("/")
        return RaidStatus(words[2], int(done), int(total), words[4] if len(words) > 4 else "")
    except (ValueError, IndexError) as e:
        raise RemoteLegError(f"unexpected raid status {params!r}") from e


def raid_params(local_meta: str, local: str, remote_meta: str | None, remote: str | None,
                *, nosync: bool, rebuild: bool = False, recovery_rate: int = 0) -> str:
    """``raid1 N 0 [nosync] [rebuild 1] region_size R [max_recovery_rate KIB]
    [write_mostly 1] 2 META0 LOCAL META1 REMOTE``; without a remote (None), ``- -``
    in its place: md starts degraded.  ``recovery_rate``: bytes a second md may
    copy to the remote (the site link's ``resync_rate``; 0: md's default)."""
    params = ["0", *(["nosync"] if nosync else []), *(["rebuild", "1"] if rebuild else []),
              "region_size", str(REGION_SECTORS)]
    if recovery_rate:
        params += ["max_recovery_rate", str(max(1, recovery_rate // 1024))]
    if remote is not None:
        params += ["write_mostly", "1"]
    return (f"raid1 {len(params)} {' '.join(params)} "
            f"2 {local_meta} {local} {remote_meta or '-'} {remote or '-'}")


def dirty_ranges(metas: list[bytes], sectors: int) -> list[tuple[int, int]]:
    """The byte ranges ``(offset, length)`` of the device that may differ between
    the legs, from each leg's metadata (its device's first bytes,
    :func:`dmrepl.dm.mdraid.read_metadata`): every chunk set in a bitmap, and
    from any recovery or resync position to the end.  Metadata that is not
    dm-raid's (never written, or damaged) makes the whole device."""
    size = sectors * SECTOR
    marked: set[int] = set()
    chunk = REGION_SECTORS * SECTOR
    tail = size
    for data in metas:
        leg = mdraid.read_metadata(data, size)
        if leg is None:
            return [(0, size)]
        if leg.recovering_from is not None:
            tail = min(tail, leg.recovering_from * SECTOR)
        chunk = leg.chunk
        marked |= leg.dirty
    ranges = [(i * chunk, min(chunk, size - i * chunk)) for i in sorted(marked)
              if i * chunk < tail]
    if tail < size:
        ranges.append((tail - tail % chunk, size - (tail - tail % chunk)))
    return ranges


def _devno(path: str) -> str | None:
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return None
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _answers(path: str) -> bool:
    """The block device reads its first 4 KiB (a remote that is down fails or
    is gone; one reconnecting is given the kernel's own timeout)."""
    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [buf], 0) == 4096
        finally:
            os.close(fd)
    except OSError:
        return False


def copy_ranges(source: str, target: str, ranges: list[tuple[int, int]]) -> int:
    """Copy ``ranges`` of ``source`` to ``target`` (O_DIRECT both, then a flush of
    ``target``); bytes copied."""
    copied = 0
    buf = mmap.mmap(-1, COPY_CHUNK)
    src = os.open(source, os.O_RDONLY | os.O_DIRECT)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_DIRECT)
        try:
            for offset, length in ranges:
                end = offset + length
                while offset < end:
                    n = min(COPY_CHUNK, end - offset)
                    view = memoryview(buf)[:n]
                    got = os.preadv(src, [view], offset)
                    if got != n:
                        raise RemoteLegError(f"{source}: short read at {offset}")
                    if os.pwritev(dst, [view], offset) != n:
                        raise RemoteLegError(f"{target}: short write at {offset}")
                    offset += n
                    copied += n
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return copied


@dataclass
class RemoteLeg:
    """The remote leg of one single-line device (see the module's doc)."""

    name: str
    sectors: int
    local: str
    url: str
    directory: str
    #: the device is new and its remote is to be taken as equal to the local
    #: device (its dirty log said ``nosync``); otherwise md copies all of it
    assume_in_sync: bool = False
    #: the remote leg's kernel block device (an nbd device the daemon attached, or
    #: the remote device itself when it is a block device)
    device: str | None = None
    resynced_bytes: int = 0
    rejoins: int = 0
    #: the remote leg is to be copied whole when it joins (the device was started
    #: without it after a crash: what it missed is no longer in a bitmap)
    rebuild: bool = False
    #: bytes a second md may copy to the remote (its site link's resync_rate)
    recovery_rate: int = 0
    #: the site link whose copies the kernel writes through this leg
    slink_nr: int = 1
    #: seconds the kernel's nbd client waits for the remote to answer a request
    request_timeout: int = REQUEST_TIMEOUT

    # -- files ----------------------------------------------------------------------

    def _path(self, suffix: str) -> str:
        return os.path.join(self.directory, f"{self.name}.{suffix}")

    def _metas(self) -> list[str]:
        return [self._path("meta0"), self._path("meta1")]

    def made_before(self) -> bool:
        """The device was made with this structure (its files say so)."""
        return os.path.exists(self._path("raid"))

    def _attach_metas(self, fresh: bool) -> list[str]:
        if fresh:
            for path in self._metas():
                _kernel.detach_file_loop(path, delete=True)
        return [_kernel.attach_file_loop(path, META_BYTES)[0] for path in self._metas()]

    def _read_metas(self) -> list[bytes]:
        out = []
        for path in self._metas():
            try:
                with open(path, "rb") as f:
                    out.append(f.read(META_BYTES))
            except FileNotFoundError:
                out.append(b"")
        return out

    # -- the remote's block device ----------------------------------------------------

    @property
    def remote_is_block_device(self) -> bool:
        """The remote device is a block device the host reaches by itself (an
        NVMe/TCP namespace, an iSCSI disk): the raid1's leg as it is; else an NBD
        export the daemon attaches with the kernel's nbd client."""
        return not self.url.startswith(("nbd://", "nbd+unix://"))

    def reachable(self) -> bool:
        """Does the remote answer (a TCP connection to the site, a read of the
        block device)?  Seconds where the site drops packets: the caller holds no
        lock the daemon's requests need."""
        if self.remote_is_block_device:
            return _kernel.is_block_device(self.url) and _answers(self.url)
        address, _export = remote_address(self.url)
        if not isinstance(address, tuple):
            return True   # (a local socket: attaching says at once)
        try:
            socket.create_connection(address, timeout=PROBE_TIMEOUT).close()
        except OSError:
            return False
        return True

    def _attach_remote(self, avoid: set[int]) -> str:
        if self.remote_is_block_device:
            if not _kernel.is_block_device(self.url) or not _answers(self.url):
                raise RemoteLegError(f"{self.name}: the remote {self.url} does not answer "
                                     "(not a block device, or it fails reads)")
            self.device = self.url
            return self.device
        address, export = remote_address(self.url)
        if isinstance(address, tuple):
            try:
                socket.create_connection(address, timeout=PROBE_TIMEOUT).close()
            except OSError as e:
                raise RemoteLegError(f"{self.name}: the remote {self.url} does not answer: "
                                     f"{e.strerror or e}") from e
        try:
            self.device = _kernel.attach_nbd(address, export, self.sectors * SECTOR, avoid,
                                          request_timeout=self.request_timeout)
        except _kernel.KernelDeviceError as e:
            raise RemoteLegError(f"{self.name}: attaching the remote {self.url}: {e}") from e
        return self.device

    def _detach_remote(self) -> None:
        if self.device and not self.remote_is_block_device:
            _kernel.detach_nbd(self.device)
        self.device = None

    # -- the device -------------------------------------------------------------------

    def _target(self, metas: list[str], nosync: bool, degraded: bool = False) -> Any:
        from dmrepl.dm.table import Target
        assert degraded or self.device is not None
        return Target(0, self.sectors, "raid", raid_params(
            metas[0], self.local, None if degraded else metas[1],
            None if degraded else self.device, nosync=nosync,
            rebuild=self.rebuild and not degraded, recovery_rate=self.recovery_rate))

    def _adopt(self) -> bool:
        """A device that outlived its daemon: take its remote nbd device from its
        table.  False if NAME does not exist."""
        dm = _kernel._dm()
        try:
            if not dm.exists(self.name):
                return False
            targets = dm.table(self.name)
        except OSError as e:
            raise RemoteLegError(f"device-mapper {self.name}: {e}") from e
        if len(targets) != 1 or targets[0].target_type != "raid":
            raise RemoteLegError(f"/dev/mapper/{self.name} exists and is not a raid1 "
                                 f"({', '.join(t.target_type for t in targets)}): remove it")
        remote = targets[0].params.split()[-1]
        if remote == "-":
            self.device = None
        elif self.remote_is_block_device and _devno(self.url) == remote:
            self.device = self.url   # (the table's name for it is /dev/dm-N or so)
        else:
            self.device = "/dev/" + os.path.basename(
                os.path.realpath(f"/sys/dev/block/{remote}"))
        _kernel.resume_if_suspended(self.name)
        return True

    def open(self, uuid: str | None, avoid: set[int]) -> str:
        """/dev/mapper/NAME: adopted if it outlived the daemon, else made (after
        copying to the remote what an earlier life left marked)."""
        if self._adopt():
            self._load_made()
            log.info("%s: adopted the raid1 with remote leg %s", self.name, self.device)
            return f"/dev/mapper/{self.name}"
        before = self.made_before()
        if before:
            self._load_made()
        ranges = (dirty_ranges(self._read_metas(), self.sectors) if before else [])
        try:
            self._attach_remote(avoid)
        except RemoteLegError as e:
            if not before:
                raise RemoteLegError(
                    f"{e}: a new device of a sync site link starts with its remote (a "
                    "raid1 of the two): start the remote's NBD server first, or run "
                    "the daemon with --tuning remote_leg=0 (a mirror, remote later)") from e
            return self._open_degraded(uuid, e)
        try:
            if ranges:
                log.warning("%s: copying %d range(s) that may differ (%d MiB) to the "
                            "remote before starting", self.name, len(ranges),
                            sum(n for _, n in ranges) >> 20)
                assert self.device is not None
                self.resynced_bytes += copy_ranges(self.local, self.device, ranges)
            # the legs are equal now (or, new, md copies all unless told not to)
            metas = self._attach_metas(fresh=True)
            nosync = before or self.assume_in_sync
            dm = _kernel._dm()
            dm.create_device(self.name, [self._target(metas, nosync)], uuid=uuid)
            dm.ensure_node(self.name)
            self._mark_made()
        except BaseException:
            self._detach_remote()
            raise
        return f"/dev/mapper/{self.name}"

    def _open_degraded(self, uuid: str | None, why: RemoteLegError) -> str:
        """Start without the remote (it does not answer): the local device at once,
        the remote copied whole when it joins (what it missed before is in metadata
        that md's new start replaces)."""
        local_meta = self._read_metas()[0]
        if mdraid.read_metadata(local_meta, self.sectors * SECTOR) is None:
            # (dm-raid takes no new array with a leg missing)
            raise RemoteLegError(f"{why}; and {self._metas()[0]} holds no md metadata "
                                 "to start the device without it") from why
        log.warning("%s: %s; starting without it (it will be copied whole when it "
                    "answers again)", self.name, why)
        # md on its earlier metadata, the remote leg missing.  When it joins, md
        # is told to rebuild it whole: after a start without it md finds its
        # bitmap out of date, and a plain re-add left the legs differing (VM,
        # Debian 6.1, by hand)
        self.rebuild = True
        self._mark_made()
        metas = self._attach_metas(fresh=False)
        dm = _kernel._dm()
        try:
            dm.create_device(self.name, [self._target(metas, False, degraded=True)],
                             uuid=uuid)
            dm.ensure_node(self.name)
        except OSError as e:
            raise RemoteLegError(f"device-mapper {self.name}: {e}") from e
        return f"/dev/mapper/{self.name}"

    def _mark_made(self) -> None:
        tmp = self._path("raid.tmp")
        with open(tmp, "w") as f:
            json.dump({"url": self.url, "local": self.local, "rebuild": self.rebuild}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path("raid"))

    def _load_made(self) -> None:
        try:
            with open(self._path("raid")) as f:
                self.rebuild = bool(json.load(f).get("rebuild"))
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s: %s unreadable (%s): the remote will be copied whole",
                        self.name, self._path("raid"), e)
            self.rebuild = True

    def settle(self) -> None:
        """Once md has the remote leg in sync, a whole copy it needed is done."""
        if self.rebuild:
            st = self.status()
            if st is not None and st.in_sync:
                self.rebuild = False
                self._mark_made()
                log.info("%s: the remote leg has the whole device", self.name)

    def status(self) -> RaidStatus | None:
        status: RaidStatus | None = _kernel.target_status(self.name, "raid", parse_raid_status)
        return status

    def rejoin(self, avoid: set[int]) -> str:
        """The remote leg failed: attach the export again and load it as the
        leg (md then copies the regions its bitmap marked)."""
        old = self.device
        self._detach_remote()   # fails what still waits on it
        # (not onto the old device: the raid1's live table still holds it open)
        self._attach_remote(avoid | ({int(old[8:])} if old and old.startswith("/dev/nbd")
                                     else set()))
        metas = self._attach_metas(fresh=False)
        dm = _kernel._dm()
        try:
            dm.load(self.name, [self._target(metas, nosync=False)])
            dm.suspend(self.name, skip_lockfs=True)
            dm.resume(self.name)
        except OSError as e:
            raise RemoteLegError(f"device-mapper {self.name}: loading the remote leg: "
                                 f"{e}") from e
        self.rejoins += 1
        log.warning("%s: remote leg %s replaced by %s", self.name, old, self.device)
        return self.device or ""

    def describe(self) -> dict[str, Any]:
        st = self.status()
        return {"url": self.url, "device": self.device, "rejoins": self.rejoins,
                "resynced_bytes": self.resynced_bytes,
                "health": st.health if st else None,
                "in_sync_sectors": st.done if st else 0, "sectors": self.sectors,
                "action": st.action if st else None,
                "in_sync": bool(st and st.in_sync), "failed": bool(st and st.remote_failed)}

    def close(self, *, keep: bool) -> None:
        """After NAME is removed: detach the remote and the metadata (``keep``:
        the files stay for the next start, else they go)."""
        self._detach_remote()
        for path in self._metas():
            _kernel.detach_file_loop(path, delete=not keep)
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path("raid"))
