"""Device-mapper tables as values: ``Target``, ``Table`` and ``DeviceRef``.

A table maps the sectors of a dm device, one target per line, in the text form
``dmsetup table`` prints and ``dmsetup load`` reads::

    <start> <length> <target_type> <params...>

The targets must cover the device from sector 0 without gaps or overlaps (the
kernel refuses anything else at load time; we refuse it earlier, naming the
line).  ``params`` is the target's own argument string; device arguments in it
may be paths (``/dev/loop0``) or ``major:minor``, and the kernel always reports
them as ``major:minor``, so comparing a table we wrote with one read back needs
``Table.resolve_devices()``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from dmrepl.errors import UserError
from dmrepl.numbers import parse_int

#: ``DM_MAX_TYPE_NAME`` (16) includes the terminating NUL.
MAX_TYPE_NAME = 15

_DEVNO = re.compile(r"^([0-9]+):([0-9]+)$")
_U32_MAX = 0xFFFFFFFF
_TILE = " (the targets must tile the device from sector 0)"


class TableError(UserError):
    """A table (or one line of it) is malformed; nothing was loaded.

    ``field`` is ``"start"`` or ``"length"`` when that number of a line is bad
    (callers that name the line name the field too), else ``None``."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Target:
    """One line of a table: ``length`` sectors from ``start`` mapped by ``target_type``.

    ``params`` is the target's argument string (for a status line, the status
    text).  Unpacks like the tuple ``(start, length, target_type, params)``.
    """

    start: int
    length: int
    target_type: str
    params: str = ""

    def __post_init__(self) -> None:
        for field in ("start", "length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TableError(f"target {field} must be an integer, not {value!r}")
        if self.start < 0:
            raise TableError(f"target start must not be negative (got {self.start})")
        if self.length <= 0:
            raise TableError(f"target length must be positive (got {self.length})")
        if self.start + self.length > 2**64 - 1:
            raise TableError(f"target end {self.start + self.length} exceeds 64-bit sectors")
        if not self.target_type or _has_space(self.target_type):
            raise TableError(f"bad target type {self.target_type!r}")
        for what, text in (("target type", self.target_type), ("target params", self.params)):
            # text from argv or a file read with surrogateescape may hold undecodable
            # bytes; the kernel gets UTF-8, so refuse them here, naming the field
            if not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError as e:
                    raise TableError(f"{what} {text!r} is not valid UTF-8 "
                                     f"(byte {e.start})") from None
        if len(self.target_type.encode()) > MAX_TYPE_NAME:
            raise TableError(f"target type {self.target_type!r} is longer than "
                             f"{MAX_TYPE_NAME} bytes")
        if "\0" in self.params or "\n" in self.params:
            raise TableError(f"target params must be one line without NUL: {self.params!r}")

    @property
    def end(self) -> int:
        """The first sector after this target."""
        return self.start + self.length

    def __iter__(self) -> Iterator[int | str]:
        return iter((self.start, self.length, self.target_type, self.params))

    def format(self) -> str:
        """The ``dmsetup table`` line for this target (no newline)."""
        line = f"{self.start} {self.length} {self.target_type}"
        return f"{line} {self.params}" if self.params else line

    @classmethod
    def parse(cls, line: str) -> Target:
        """One table line (tokens separated by any whitespace)."""
        tokens = line.split()
        if len(tokens) < 3:
            raise TableError(f"expected '<start> <length> <target_type> [params]', got {line!r}")
        start, length = (_parse_sector(token, what) for token, what in
                         ((tokens[0], "start"), (tokens[1], "length")))
        return cls(start, length, tokens[2], " ".join(tokens[3:]))

    def resolve_devices(self, stat_fn: Callable[[str], os.stat_result] = os.stat) -> Target:
        """This target with every ``/dev/...`` block-device argument as ``major:minor``."""
        tokens = [str(DeviceRef.parse(tok).resolve(stat_fn)) if tok.startswith("/dev/")
                  else tok for tok in self.params.split()]
        return Target(self.start, self.length, self.target_type, " ".join(tokens))


def _has_space(text: str) -> bool:
    return any(ch.isspace() for ch in text) or "\0" in text


def _parse_sector(token: str, what: str) -> int:
    try:
        return parse_int(token, what, error=TableError)
    except TableError as err:
        raise TableError(str(err), field=what) from None


#: Where in a table text an error is: ``(1-based line number, the bad sector field
#: or None) -> "line 3"``; the error message follows it after ``": "``.
Locator = Callable[[int, str | None], str]


def at_line(number: int, field: str | None) -> str:
    """The default :data:`Locator`: ``line N`` (the message names the field)."""
    del field
    return f"line {number}"


def parse_lines(text: str, *, locate: Locator = at_line) -> list[tuple[int, Target]]:
    """The targets of ``dmsetup table`` text with their 1-based line numbers, in
    text order; blank lines and ``#`` comments (whole-line or trailing) are skipped.

    The layout (targets tiling the device) is not checked here: see
    :func:`check_layout`.  A malformed line raises :class:`TableError` whose
    message starts with ``locate(line number, bad field)``."""
    targets: list[tuple[int, Target]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            targets.append((number, Target.parse(line)))
        except TableError as err:
            raise TableError(f"{locate(number, err.field)}: {err}", field=err.field) from err
    return targets


class Table(Sequence[Target]):
    """An immutable, validated list of targets covering sectors 0..size-1 contiguously."""

    __slots__ = ("_targets",)

    def __init__(self, targets: Iterable[Target]) -> None:
        items = tuple(targets)
        check_layout(items, [f"target {i + 1}" for i in range(len(items))])
        self._targets = items

    @classmethod
    def parse(cls, text: str) -> Table:
        """Parse ``dmsetup table`` text: one target per line.

        Blank lines and ``#`` comments (whole-line or trailing) are ignored.  Errors
        name the 1-based line number.
        """
        numbered = parse_lines(text)
        targets = [target for _, target in numbered]
        check_layout(targets, [f"line {number}" for number, _ in numbered])
        table = cls.__new__(cls)
        table._targets = tuple(targets)
        return table

    def format(self) -> str:
        """The ``dmsetup table`` text: one line per target, each ending in a newline."""
        return "".join(target.format() + "\n" for target in self._targets)

    @property
    def size(self) -> int:
        """Total sectors mapped."""
        return self._targets[-1].end

    def resolve_devices(self, stat_fn: Callable[[str], os.stat_result] = os.stat) -> Table:
        """The same table with device paths replaced by ``major:minor`` (as the kernel prints)."""
        return Table(target.resolve_devices(stat_fn) for target in self._targets)

    @overload
    def __getitem__(self, index: int) -> Target: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Target, ...]: ...

    def __getitem__(self, index: int | slice) -> Target | tuple[Target, ...]:
        return self._targets[index]

    def __len__(self) -> int:
        return len(self._targets)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Table):
            return self._targets == other._targets
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._targets)

    def __repr__(self) -> str:
        return f"Table({list(self._targets)!r})"


def check_layout(targets: Sequence[Target], labels: Sequence[str]) -> None:
    """The targets, in this order, tile the device from sector 0 without a gap or
    an overlap; else :class:`TableError` naming the target by its label."""
    if not targets:
        raise TableError("a table needs at least one target")
    expected = 0
    for target, label in zip(targets, labels, strict=True):
        if target.start < expected:
            raise TableError(f"{label}: target at sector {target.start} overlaps the previous "
                             f"target, which ends at sector {expected}{_TILE}")
        if target.start > expected:
            raise TableError(f"{label}: gap in table: target starts at sector {target.start} "
                             f"but the previous target ends at sector {expected}{_TILE}")
        expected = target.end


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A device argument of a table: a path (``/dev/loop0``) or ``major:minor``.

    ``major``/``minor`` are ``None`` for an unresolved path; ``resolve()`` fills
    them from ``stat``.  ``str()`` gives ``major:minor`` when known (as the
    kernel prints it), else the path.
    """

    path: str | None = None
    major: int | None = None
    minor: int | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceRef:
        match = _DEVNO.match(text)
        if match:   # the kernel reads them with sscanf("%u:%u")
            return cls(major=parse_int(match.group(1), "device major", hi=_U32_MAX,
                                       error=TableError),
                       minor=parse_int(match.group(2), "device minor", hi=_U32_MAX,
                                       error=TableError))
        if text.startswith("/"):
            return cls(path=text)
        raise TableError(f"device {text!r} is neither an absolute path nor major:minor")

    @classmethod
    def from_devno(cls, dev: int) -> DeviceRef:
        """From a ``dev_t`` as ``os.stat`` or the dm ioctls report it."""
        return cls(major=os.major(dev), minor=os.minor(dev))

    @property
    def resolved(self) -> bool:
        return self.major is not None and self.minor is not None

    @property
    def devno(self) -> str:
        """``major:minor``; the reference must be resolved."""
        if self.major is None or self.minor is None:
            raise TableError(f"device {self.path!r} is not resolved to major:minor")
        return f"{self.major}:{self.minor}"

    @property
    def dev(self) -> int:
        """The ``dev_t`` (``os.makedev``); the reference must be resolved."""
        if self.major is None or self.minor is None:
            raise TableError(f"device {self.path!r} is not resolved to major:minor")
        return os.makedev(self.major, self.minor)

    def resolve(self, stat_fn: Callable[[str], os.stat_result] = os.stat) -> DeviceRef:
        """Fill ``major:minor`` from the path; the path must be a block device."""
        if self.resolved:
            return self
        assert self.path is not None
        try:
            st = stat_fn(self.path)
        except OSError as err:
            raise TableError(f"device {self.path}: {err.strerror}") from err
        if not stat.S_ISBLK(st.st_mode):
            raise TableError(f"device {self.path} is not a block device")
        return DeviceRef(self.path, os.major(st.st_rdev), os.minor(st.st_rdev))

    def __str__(self) -> str:
        if self.resolved:
            return self.devno
        return self.path or ""
