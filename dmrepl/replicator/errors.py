"""The replicator's exceptions; each class says what the caller must do.

* :class:`TableError` / :class:`MessageError` (``UserError``): the table line or the
  message is wrong; nothing was changed; fix it and retry.
* :class:`LocalIOError`: a local (site link 0) device failed the I/O; the write was
  not acknowledged (it may or may not be on the device); the device is marked failed.
* :class:`ReplogIOError`: the replication log's backing store failed; the write was
  not acknowledged; the log is unusable until the replicator is closed and reopened.
* :class:`ReplogCorrupt`: the on-disk log did not validate (CRC, magic, version); the
  log was not opened; nothing was written.
* :class:`ReplicatorClosed`: the replicator (or device) is closed; stop using it.
* :class:`DeviceBusy`: a device cannot be removed yet (writes not copied to every
  site link); nothing was changed; retry once they drained (or wait longer).
"""

from __future__ import annotations

from dmrepl.errors import Busy, DmreplError, UserError


class ReplicatorError(DmreplError):
    """Base of the replicator's failures."""


class TableError(UserError):
    """A bad ``replicator``/``replicator-dev`` table line: nothing was changed."""


class MessageError(UserError):
    """A bad message: nothing was changed."""


class LocalIOError(ReplicatorError, OSError):
    """A local device failed: the write/read failed and nothing was acknowledged."""


class ReplogIOError(LocalIOError):
    """The replication log's store failed: the write was not acknowledged; the log
    stops accepting writes (close and reopen the replicator to replay it)."""


class ReplogCorrupt(ReplicatorError):
    """The on-disk log failed validation: it was not opened and nothing was written."""


class ReplicatorClosed(ReplicatorError):
    """The replicator or device was closed: open it again to continue."""


class DeviceBusy(ReplicatorError, Busy):
    """The device still has writes that some site link has not copied: it was not
    removed and keeps serving; retry when they drained (or wait longer)."""
