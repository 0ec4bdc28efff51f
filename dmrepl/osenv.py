"""What the process takes from its environment: variables (an empty one means the
default, as for an unset one), the package version, and systemd's readiness
notification (shared by ``dmrepl daemon`` and ``ulogd run``)."""

from __future__ import annotations

import logging
import os
import socket
from importlib import metadata

log = logging.getLogger("dmrepl")

PACKAGE = "dmrepl"


def env_or(name: str, default: str) -> str:
    """``$name``, or ``default`` if it is unset or empty (``VAR= cmd`` clears a
    setting rather than naming the path "")."""
    return os.environ.get(name) or default


def version() -> str:
    """The installed package's version (``--version`` of both commands)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown (the dmrepl package is not installed)"


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd's ``$NOTIFY_SOCKET``; False if
    there is none.  A failure is logged, not raised: a service manager that went
    away must not stop the daemon."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):   # an abstract socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), path)
        except OSError as e:
            log.warning("sd_notify %r failed: %s", message, e)
            return False
    return True
