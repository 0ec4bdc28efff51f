"""The one parser of numbers written as text: tables, messages, tuning, CLI arguments.

Every number a user types goes through :func:`parse_int` or :func:`parse_decimal`,
so every bad one is refused the same way: one line, ``invalid <what> <text>:
<reason>``, as a :class:`~dmrepl.errors.UserError` (or the subclass the caller
names).  The text is bounded before any conversion: Python's ``int()`` refuses
more than 4300 digits with a bare ``ValueError`` (and converts long ones in
quadratic time), and ``float()`` turns long ones into ``inf``; no value any
grammar here accepts needs more than :data:`MAX_DIGITS` digits.

Grammar: ASCII decimal digits only (no sign unless ``negative`` is allowed, no
``0x``, no ``_``, no spaces, no non-ASCII digits that ``str.isdigit`` accepts);
where the grammar has units, one unit letter after the digits (either case).
Decimals (:func:`parse_decimal`) take an optional fraction (``1.5``, ``.5``)
but no exponent, ``inf`` or ``nan``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from dmrepl.errors import UserError

MAX_DIGITS = 24       # 2**64 has 20 digits; a few leading zeros are tolerated
_SHOWN_CHARS = 24     # a longer text is cut in error messages (one readable line)

_INT = re.compile(r"(-?)([0-9]+)([A-Za-z]?)")
_DECIMAL = re.compile(r"(-?)([0-9]*)(?:\.([0-9]*))?")

E = TypeVar("E", bound=UserError)


def shown(text: str) -> str:
    """``text`` for an error message: its repr, cut (with its length) when long."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS // 2]!r}... ({len(text)} characters)"


def _refuse(error: type[UserError], what: str, text: str, reason: str) -> UserError:
    return error(f"invalid {what} {shown(text)}: {reason}")


def _syntax(text: str, negative: bool, whole: bool = False) -> str:
    if text[:1] in ("+", "-") and not negative:
        return "not a decimal number (it takes no sign)"
    if whole and "." in text and text.isascii() and _DECIMAL.fullmatch(text) and text != ".":
        return "not a whole number"
    return "not a decimal number"


def _range(value: float, lo: float | None, hi: float | None) -> str | None:
    if (lo is None or value >= lo) and (hi is None or value <= hi):
        return None
    if lo is not None and hi is not None:
        return f"must be {lo:g}..{hi:g}"
    return f"must be >= {lo:g}" if lo is not None else f"must be <= {hi:g}"


def parse_int(text: str, what: str, *, lo: int | None = 0, hi: int | None = None,
              units: Mapping[str, int] | None = None, negative: bool = False,
              error: type[UserError] = UserError) -> int:
    """A whole number (times its unit's multiplier, if ``units`` are given) within
    ``lo..hi`` (``None``: unbounded); else ``error`` naming ``what``."""
    if not isinstance(text, str):
        raise error(f"invalid {what} {text!r}: not a decimal number")
    m = _INT.fullmatch(text) if text.isascii() else None
    if m is None or (m.group(1) and not negative):
        raise _refuse(error, what, text, _syntax(text, negative, whole=True))
    sign, digits, unit = m.groups()
    if len(digits) > MAX_DIGITS:
        raise _refuse(error, what, text, f"{len(digits)} digits, too large")
    mult = 1
    if unit:
        if units is None:
            raise _refuse(error, what, text, "not a decimal number (takes no unit)")
        found = units.get(unit.lower())
        if found is None:
            raise _refuse(error, what, text, f"unknown unit {unit!r} (expected one of "
                                              f"{''.join(units)})")
        mult = found
    value = int(sign + digits) * mult
    bad = _range(value, lo, hi)
    if bad:
        raise _refuse(error, what, text, bad)
    return value


def parse_decimal(text: str, what: str, *, lo: float | None = 0.0, hi: float | None = None,
                  negative: bool = False, error: type[UserError] = UserError) -> float:
    """A decimal number (``12``, ``1.5``, ``.5``) within ``lo..hi``; else ``error``."""
    if not isinstance(text, str):
        raise error(f"invalid {what} {text!r}: not a decimal number")
    m = _DECIMAL.fullmatch(text) if text.isascii() else None
    if m is None or not (m.group(2) or m.group(3)) or (m.group(1) and not negative):
        raise _refuse(error, what, text, _syntax(text, negative))
    if len(m.group(2)) + len(m.group(3) or "") > MAX_DIGITS:
        raise _refuse(error, what, text, f"{len(text)} characters, too long")
    value = float(text)
    bad = _range(value, lo, hi)
    if bad:
        raise _refuse(error, what, text, bad)
    return value


class ArgumentRefused(Exception):
    """A command-line argument the number parser refused: carries its UserError
    past argparse (which would turn it into a usage error) to the CLI's funnel."""

    def __init__(self, error: UserError) -> None:
        super().__init__(str(error))
        self.error = error


T = TypeVar("T")


def argument(what: str, parse: Callable[..., T] = parse_int,  # type: ignore[assignment]
             *, usage_error: bool = False, **bounds: object) -> Callable[[str], T]:
    """An argparse ``type=``: the number parser.  Its refusal is an invalid argument
    (:class:`ArgumentRefused`, for the dmrepl CLI's funnel: exit code INVALID, one
    line), or with ``usage_error`` argparse's own usage error (ulogd)."""
    def convert(text: str) -> T:
        try:
            return parse(text, what, **bounds)
        except UserError as e:
            if usage_error:
                raise argparse.ArgumentTypeError(str(e)) from None
            raise ArgumentRefused(e) from None
    convert.__name__ = what.replace(" ", "_")
    return convert


__all__ = ["MAX_DIGITS", "ArgumentRefused", "argument", "parse_decimal",
           "parse_int", "shown"]
