"""Entry point of the ``dmrepl`` command.

``run()`` returns a function of argv so tests call ``run()(argv)``; it returns the
exit code (see :class:`dmrepl.cli._exit.ExitCode`).  Every failure goes through
one funnel, :func:`dmrepl.cli._error_reporting.handle_error`: one line on
stderr, a stable exit code; ``--propagate`` re-raises instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from dmrepl.cli._error_reporting import handle_error
from dmrepl.cli._exit import ExitCode
from dmrepl.cli._parser import gen_parser
from dmrepl.numbers import ArgumentRefused


def run() -> Callable[[Sequence[str]], int]:
    parser = gen_parser()

    def the_func(argv: Sequence[str]) -> int:
        try:
            ns = parser.parse_args(list(argv))
        except ArgumentRefused as refused:   # a bad number: an invalid argument
            if "--propagate" in argv:
                raise refused.error from None
            return int(handle_error(refused.error))
        try:
            code = ns.func(ns)
        except (KeyboardInterrupt, BrokenPipeError, SystemExit):
            raise
        except Exception as err:
            if ns.propagate:
                raise
            return int(handle_error(err))
        return int(code or ExitCode.OK)

    return the_func


def main(argv: Sequence[str] | None = None) -> None:
    try:
        sys.exit(run()(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(ExitCode.ERROR)


if __name__ == "__main__":
    main()
