"""Path or URL -> an open block store, one module per kind, chosen by URL scheme
(as ovirt-imageio picks its backends).

A path (absolute, or relative without a ``scheme://``) and a ``file:`` URL open
:class:`dmrepl.blockio.file.FileBlockIO`; ``nbd://HOST:PORT/EXPORT`` and
``nbd+unix:///EXPORT?socket=PATH`` the NBD client of a remote site.  Each kind's
module is imported only when a store of its kind is opened.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING

from dmrepl.errors import UserError

if TYPE_CHECKING:
    from dmrepl.blockio import BlockIO

#: URL scheme -> "module:function" opening a URL of that scheme.
SCHEMES = {
    "file": "dmrepl.blockio.file:open_file",
    "nbd": "dmrepl.nbd.client:open_url",
    "nbd+unix": "dmrepl.nbd.client:open_url",
}

# RFC 3986 scheme, then "://" (or the "file:" forms): "7:2" and "dir/a:b" are paths.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?://|(?<=^file:))")


class UnknownScheme(UserError):
    """The URL's scheme names no kind of store: use a path, file:, nbd:// or nbd+unix://."""


def scheme_of(path: str) -> str:
    """The URL scheme of ``path`` (lower case), or ``""`` for a plain path."""
    m = _URL.match(path)
    return m.group("scheme").lower() if m else ""


def open_store(path: str) -> BlockIO:
    """Open ``path`` (a file or block device path, or a URL) as a block store."""
    scheme = scheme_of(path) or "file"
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}:" for s in SCHEMES)
        raise UnknownScheme(f"{path}: unknown URL scheme {scheme!r} (known: a path, {known})")
    module, function = target.split(":")
    opened: BlockIO = getattr(importlib.import_module(module), function)(path)
    return opened


def open_store_beside_the_kernel(path: str) -> BlockIO:
    """As :func:`open_store`, but a block device is read past the page cache: the
    daemon's opener when it makes kernel devices, whose mirrors write the local
    devices behind the page cache of the daemon's own descriptors."""
    if (scheme_of(path) or "file") == "file":
        from dmrepl.blockio.file import open_file
        return open_file(path, direct_reads=True)
    return open_store(path)
