"""One funnel from any exception to one line on stderr and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from dmrepl.cli._exit import KIND_CODES, ExitCode
from dmrepl.daemon._engine import EngineUnavailable
from dmrepl.daemon._proto import ControlError
from dmrepl.daemon.client import DaemonUnreachable
from dmrepl.errors import InUse, UserError


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def interpret(err: BaseException) -> tuple[ExitCode, str]:
    for e in _chain(err):
        if isinstance(e, DaemonUnreachable):
            return ExitCode.NO_DAEMON, str(e)
        if isinstance(e, ControlError):
            return KIND_CODES.get(e.kind, ExitCode.INTERNAL), e.message
        if isinstance(e, UserError):
            return ExitCode.INVALID, str(e)
        if isinstance(e, InUse):
            return ExitCode.IN_USE, str(e)
        if isinstance(e, EngineUnavailable):
            return ExitCode.ERROR, str(e)
        if isinstance(e, OSError):
            where = f" ({e.filename})" if e.filename else ""
            return ExitCode.ERROR, f"{e.strerror or e}{where}"
    return ExitCode.INTERNAL, (f"unexpected {type(err).__name__}: {err}; please report this "
                               "(rerun with --propagate for the traceback)")


def handle_error(err: BaseException) -> ExitCode:
    code, message = interpret(err)
    message = " ".join(message.split())   # one line, always
    print(f"dmrepl: error: {message}", file=sys.stderr)
    return code
