"""Present an NBD export as a kernel block device: /dev/nbdN, then /dev/mapper/NAME.

The export is attached with ``nbd-client`` (netlink mode: the kernel holds the
socket, nbd-client exits), and NAME is a dm ``linear`` target over /dev/nbdN,
made through :class:`dmrepl.dm.DmControl`.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import subprocess
import time
from typing import Any

from dmrepl.errors import DmreplError

log = logging.getLogger(__name__)


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


def attach_nbd(socket_path: str, export: str, size: int, avoid: set[int],
               timeout: float = 30.0) -> str:
    """Attach ``export`` to a free /dev/nbdN and wait until the kernel sees its size."""
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
        argv = ["nbd-client", "-N", export, "-u", socket_path, path, "-b", str(block),
                "-t", "120"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
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


def _linear(sectors: int, nbd: str) -> list[Any]:
    from dmrepl.dm.table import Target
    return [Target(0, sectors, "linear", f"{nbd} 0")]


def create_mapper(name: str, sectors: int, nbd: str, uuid: str | None = None) -> str:
    """Create (or, when it survived a daemon crash, retarget) /dev/mapper/NAME."""
    dm = _dm()
    try:
        if dm.exists(name):
            dm.load(name, _linear(sectors, nbd))
            dm.resume(name)
        else:
            dm.create_device(name, _linear(sectors, nbd), uuid=uuid)
        dm.ensure_node(name)
    except OSError as e:
        raise KernelDeviceError(f"device-mapper {name}: {e}") from e
    return f"/dev/mapper/{name}"


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


def suspend_mapper(name: str) -> None:
    _dm().suspend(name)


def resume_mapper(name: str) -> None:
    _dm().resume(name)
