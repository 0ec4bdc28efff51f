"""CLI-side errors.  Everything an action raises is funnelled through
:func:`dmrepl.cli._error_reporting.handle_error`."""

from __future__ import annotations

from dmrepl.errors import DmreplError, UserError


class CliError(DmreplError):
    """Base of errors raised by the CLI itself."""


class CliUserError(CliError, UserError):
    """A bad argument detected before talking to the daemon (e.g. unreadable table file)."""
