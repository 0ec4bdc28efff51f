"""The root of dmrepl's exceptions.

Every exception class says what the caller must do.  Subsystems derive their own
hierarchies from these two roots:

* ``UserError``: the input (a table line, a message, a CLI argument) is wrong;
  nothing was changed; fix the input and retry.
* ``DmreplError``: an operation failed for a reason outside the input (kernel,
  device, peer); what changed is described by the subclass.
"""

from __future__ import annotations


class DmreplError(Exception):
    """Base of all dmrepl failures."""


class UserError(DmreplError, ValueError):
    """Bad input: nothing was changed; correct the input and try again."""


class InUse(DmreplError):
    """Another process owns this state directory, socket or device: nothing was
    touched; stop that process (or choose another path) and try again."""


class Busy(DmreplError):
    """Not now: the object still has work in flight (e.g. writes not yet copied to
    every site); nothing was changed; retry once it drained (or wait longer)."""
