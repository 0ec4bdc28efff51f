"""Table grammar of the ``replicator`` and ``replicator-dev`` targets.

Parsing gives frozen config values; ``format_*`` gives the TABLE status text, which
parses back to an equal config (canonical forms: policies as ``sync``/``async``
with ``+stall``, fall-behind values with the largest exact unit).

``replicator``::

    <start> <length> replicator ringbuffer <#p 2..4> <dev_path> <dev_start>
        [auto|create|open [<size>]]
        [blockdev <#p 1..6> <slink_nr> [<policy> [<fb_type> <value>]]
                  [resync_rate <rate>]]{1..N}

``replicator-dev``::

    <start> <length> replicator-dev <replicator_device> <dev_nr>
        [<slink_nr> 1 <dev_path> <dlog_type> <#dlog_p> <dlog_params>]{1..N}

Units (the documented meaning, not the original's off-by-one table): size ``s``
sectors (the default), ``k`` KiB, ``m`` MiB, ``g``, ``t``, ``p``, ``e``; timeout
``t`` milliseconds (the default), ``s``, ``m`` minutes, ``h``, ``d``.

``resync_rate <N>[k|m|g]`` (an extension, after the policy and fall-behind, or set
by ``slink message <nr> resync_rate <rate>``) caps the site link's resynchronisation
from the dirty logs at N KiB/s (the default unit, as DRBD's resync-rate), MiB/s or
GiB/s; 0 (the default) is unlimited.  Replication of new writes is not limited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from dmrepl.numbers import parse_int
from dmrepl.replicator import slink as slink_types
from dmrepl.replicator.errors import TableError

LOG_SIZE_MIN = 4096  # sectors: 2 x 1 MiB, as the original
MAX_SLINKS = 2048  # slink numbers 0..2047 (the entry bitmap has 2048 bits)
OPEN_MODES = ("auto", "create", "open")
FALLBEHIND_TYPES = ("ios", "size", "timeout")

# unit -> multiplier to the base unit (sectors for size, milliseconds for timeout)
SIZE_UNITS = {"s": 1, "k": 2, "m": 2 << 10, "g": 2 << 20, "t": 2 << 30, "p": 2 << 40,
              "e": 2 << 50}
TIME_UNITS = {"t": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_POLICY_WORDS = {"sync": "sync", "synchronous": "sync", "async": "async",
                 "asynchronous": "async", "stall": "stall"}


def _int(word: str, what: str, *, lo: int = 0, hi: int | None = None) -> int:
    return parse_int(word, what, lo=lo, hi=hi, error=TableError)


# -- replication log -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReplogConfig:
    """``ringbuffer <#p> <dev_path> <dev_start> [<mode> [<size>]]`` (sectors)."""

    dev_path: str
    dev_start: int
    mode: str | None = None  # None: the 2-parameter form (implicit open)
    size: int | None = None  # sectors; required by auto/create

    @property
    def open_mode(self) -> str:
        return self.mode or "open"

    def params(self) -> list[str]:
        out = [self.dev_path, str(self.dev_start)]
        if self.mode is not None:
            out.append(self.mode)
            if self.size is not None:
                out.append(str(self.size))
        return out


def parse_replog(args: Sequence[str]) -> ReplogConfig:
    """Parse the ringbuffer parameters (after ``<#params>``)."""
    if not 2 <= len(args) <= 4:
        raise TableError(f"ringbuffer takes 2..4 parameters, got {len(args)}")
    path = args[0]
    if not path:
        raise TableError("invalid replog dev_path '': empty")
    start = _int(args[1], "replog dev_start (sectors)")
    mode = size = None
    if len(args) >= 3:
        mode = args[2]
        if mode not in OPEN_MODES:
            raise TableError(f"invalid replog open type {mode!r}: expected auto, create "
                             "or open")
        if len(args) == 4:
            size = _int(args[3], "replog size (sectors)", lo=LOG_SIZE_MIN)
        elif mode != "open":
            raise TableError(f"replog open type {mode!r} needs a <size>")
    return ReplogConfig(path, start, mode, size)


# -- site links --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FallBehind:
    """How far an async site link may fall behind; ``value == 0`` disables it.

    ``value`` is in base units: I/Os, sectors, or milliseconds."""

    kind: str = "ios"
    value: int = 0

    @property
    def enabled(self) -> bool:
        return self.value > 0

    def format(self) -> list[str]:
        if self.kind == "ios":
            return ["ios", str(self.value)]
        units = SIZE_UNITS if self.kind == "size" else TIME_UNITS
        for unit, mult in sorted(units.items(), key=lambda u: -u[1]):
            if self.value % mult == 0:
                return [self.kind, f"{self.value // mult}{unit}"]
        raise AssertionError("base unit divides everything")  # pragma: no cover


VALUE_MAX = (1 << 63) - 1  # fall-behind values and rates are u64 counters


def parse_fallbehind(kind: str, value: str) -> FallBehind:
    if kind not in FALLBEHIND_TYPES:
        raise TableError(f"invalid fall-behind type {kind!r}: expected ios, size or timeout")
    units = {"ios": None, "size": SIZE_UNITS, "timeout": TIME_UNITS}[kind]
    total = parse_int(value, f"fall-behind value for {kind}", hi=VALUE_MAX, units=units,
                      error=TableError)
    return FallBehind("ios", 0) if total == 0 else FallBehind(kind, total)


RATE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}  # -> bytes per second


def parse_rate(value: str) -> int:
    """``<N>[k|m|g]`` (KiB/s without a unit) -> bytes per second; 0 = unlimited."""
    total = parse_int(value, "resync rate (<N>[k|m|g]: KiB/s, MiB/s, GiB/s; 0 = unlimited)",
                      hi=VALUE_MAX, units=RATE_UNITS, error=TableError)
    if value[-1:].isdigit():   # no unit: KiB/s, as DRBD's resync-rate
        total *= RATE_UNITS["k"]
        if total > VALUE_MAX:
            raise TableError(f"invalid resync rate {value!r}: too large")
    return total


def format_rate(rate: int) -> str:
    for unit in ("g", "m", "k"):
        if rate % RATE_UNITS[unit] == 0:
            return f"{rate // RATE_UNITS[unit]}{unit}"
    raise AssertionError("rates are whole KiB/s")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class SlinkConfig:
    """``blockdev <#p> <slink_nr> [<policy> [<fb_type> <value>]] [resync_rate <r>]``."""

    slink_nr: int
    sync: bool = False
    stall: bool = False
    fallbehind: FallBehind = FallBehind()
    resync_rate: int = 0  # bytes per second; 0: unlimited
    kind: str = "blockdev"  # its site-link type (dmrepl.replicator.slink registry)

    @property
    def policy(self) -> str:
        return ("sync" if self.sync else "async") + ("+stall" if self.stall else "")

    def params(self) -> list[str]:
        out = [str(self.slink_nr), self.policy]
        if self.fallbehind.enabled:
            out += self.fallbehind.format()
        if self.resync_rate:
            out += ["resync_rate", format_rate(self.resync_rate)]
        return out

    def table(self) -> str:
        p = self.params()
        return " ".join([self.kind, str(len(p)), *p])


def parse_policy(word: str) -> tuple[bool, bool]:
    """``sync``/``async`` (long forms too), optionally ``+stall`` -> (sync, stall)."""
    parts = word.split("+")
    seen: list[str] = []
    for part in parts:
        name = _POLICY_WORDS.get(part)
        if name is None:
            raise TableError(f"invalid site link policy {word!r}: unknown {part!r} "
                             "(expected sync, async, stall, joined by '+')")
        if name in seen:
            raise TableError(f"invalid site link policy {word!r}: {part!r} twice")
        seen.append(name)
    if "sync" in seen and "async" in seen:
        raise TableError(f"invalid site link policy {word!r}: sync and async together")
    return "sync" in seen, "stall" in seen


def parse_slink(args: Sequence[str]) -> SlinkConfig:
    """Parse blockdev site link parameters (after ``<#params>``)."""
    args = list(args)
    rate = 0
    if "resync_rate" in args[1:]:
        k = args.index("resync_rate", 1)
        if k != len(args) - 2:
            raise TableError("resync_rate <rate> must be the last two site link "
                             "parameters")
        rate = parse_rate(args[k + 1])
        del args[k:]
    if not 1 <= len(args) <= 4:
        raise TableError(f"blockdev takes 1..4 parameters (and resync_rate <rate>), got "
                         f"{len(args)}")
    nr = _int(args[0], "site link number", hi=MAX_SLINKS - 1)
    sync = stall = False
    fb = FallBehind()
    if len(args) >= 2:
        sync, stall = parse_policy(args[1])
    if len(args) == 3:
        kind, eq, value = args[2].partition("=")
        if not eq:
            raise TableError(f"invalid fall-behind {args[2]!r}: expected <type>=<value> "
                             "or <type> <value>")
        fb = parse_fallbehind(kind, value)
    elif len(args) == 4:
        fb = parse_fallbehind(args[2], args[3])
    if sync and fb.enabled:
        raise TableError(f"site link {nr}: a fall-behind threshold on a synchronous "
                         "site link is meaningless")
    return SlinkConfig(nr, sync, stall, fb, rate)


@dataclass(frozen=True, slots=True)
class ReplicatorConfig:
    replog: ReplogConfig
    slinks: tuple[SlinkConfig, ...]
    start: int = 0
    length: int | None = None

    def params(self) -> str:
        rp = self.replog.params()
        words = ["ringbuffer", str(len(rp)), *rp]
        for s in self.slinks:
            words.append(s.table())
        return " ".join(words)

    def line(self) -> str:
        return table_line(self.start, self.length or 1, "replicator", self.params())


def table_line(start: int, length: int, target: str, params: str) -> str:
    """``<start> <length> <target> <params>``: a table line as :func:`parse_replicator`
    and :func:`parse_device` read it (the one rendering of a live table)."""
    return f"{start} {length} {target} {params}"


def _split(line: str | Sequence[str]) -> list[str]:
    return line.split() if isinstance(line, str) else list(line)


def parse_slinks(words: Sequence[str], i: int, *,
                 existing: Sequence[int] = ()) -> tuple[list[SlinkConfig], int]:
    """Parse site-link groups (``blockdev`` or another registered type, with the
    same parameters) from ``words[i:]`` to the end."""
    out: list[SlinkConfig] = []
    nrs = list(existing)
    types = slink_types.registered()
    while i < len(words):
        kind = words[i]
        if kind not in types:
            raise TableError(f"invalid site link type {kind!r} (argument {i + 1}): "
                             f"expected {' or '.join(repr(t) for t in types)}")
        if i + 1 >= len(words):
            raise TableError(f"site link parameter count missing after {kind!r}")
        n = _int(words[i + 1], "site link parameter count", lo=1, hi=6)
        if i + 2 + n > len(words):
            raise TableError(f"site link needs {n} parameters, only {len(words) - i - 2} "
                             "given")
        s = parse_slink(words[i + 2:i + 2 + n])
        if kind != s.kind:
            s = replace(s, kind=kind)
        if not nrs and s.slink_nr != 0:
            raise TableError(f"first site link must be 0, got {s.slink_nr}")
        if s.slink_nr in nrs:
            raise TableError(f"site link {s.slink_nr} given twice")
        nrs.append(s.slink_nr)
        out.append(s)
        i += 2 + n
    return out, i


def parse_replicator(line: str | Sequence[str]) -> ReplicatorConfig:
    """Parse a full ``replicator`` line or only its parameters."""
    words = _split(line)
    start, length = 0, None
    if len(words) >= 3 and words[2] == "replicator":
        start = _int(words[0], "start")
        if start != 0:
            raise TableError(f"invalid start {words[0]!r}: the replicator target maps "
                             "nothing, start must be 0")
        length = _int(words[1], "length", lo=1)
        words = words[3:]
    if not words:
        raise TableError("empty replicator table")
    if words[0] != "ringbuffer":
        raise TableError(f"invalid replication log type {words[0]!r}: expected 'ringbuffer'")
    if len(words) < 2:
        raise TableError("replication log parameter count missing")
    n = _int(words[1], "replication log parameter count", lo=2, hi=4)
    if 2 + n > len(words):
        raise TableError(f"ringbuffer needs {n} parameters, only {len(words) - 2} given")
    replog = parse_replog(words[2:2 + n])
    slinks, _ = parse_slinks(words, 2 + n)
    if not slinks:
        raise TableError("no site link given: at least site link 0 (blockdev 1 0) is needed")
    return ReplicatorConfig(replog, tuple(slinks), start, length)


# -- devices ---------------------------------------------------------------------

DLOG_TYPES = ("nolog", "core", "disk")


@dataclass(frozen=True, slots=True)
class LegConfig:
    """One ``<slink_nr> 1 <dev_path> <dlog_type> <#dlog_p> <dlog_params>`` tuple."""

    slink_nr: int
    dev_path: str
    dlog_type: str = "nolog"
    dlog_args: tuple[str, ...] = ()

    def params(self) -> list[str]:
        return [str(self.slink_nr), "1", self.dev_path, self.dlog_type,
                str(len(self.dlog_args)), *self.dlog_args]

    def region_size(self) -> int | None:
        if self.dlog_type == "core":
            return int(self.dlog_args[0])
        if self.dlog_type == "disk":
            return int(self.dlog_args[1])
        return None


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    replicator: str
    dev_nr: int
    legs: tuple[LegConfig, ...]
    start: int = 0
    length: int | None = None  # sectors; None: the local device's size

    def params(self) -> str:
        words = [self.replicator, str(self.dev_nr)]
        for leg in self.legs:
            words += leg.params()
        return " ".join(words)

    def line(self) -> str:
        assert self.length is not None
        return table_line(self.start, self.length, "replicator-dev", self.params())

    def leg(self, slink_nr: int) -> LegConfig | None:
        for leg in self.legs:
            if leg.slink_nr == slink_nr:
                return leg
        return None


def parse_legs(words: Sequence[str], length: int | None) -> list[LegConfig]:
    """Parse device tuples; every word must be used."""
    legs: list[LegConfig] = []
    i = 0
    while i < len(words):
        if len(words) - i < 5:
            raise TableError(f"not enough device arguments at {' '.join(words[i:])!r}: "
                             "need <slink_nr> <#dev_params> <dev_path> <dlog_type> "
                             "<#dlog_params>")
        nr = _int(words[i], "site link number", hi=MAX_SLINKS - 1)
        ndev = _int(words[i + 1], "device parameter count")
        if ndev != 1:
            raise TableError(f"invalid device parameter count {words[i + 1]!r}: blockdev "
                             "devices take exactly 1 (<dev_path>)")
        path = words[i + 2]
        dtype = words[i + 3]
        if dtype == "-":
            dtype = "nolog"
        if dtype not in DLOG_TYPES:
            raise TableError(f"invalid dirty log type {dtype!r} for {path}: expected "
                             "nolog, core or disk")
        nlog = _int(words[i + 4], "dirty log parameter count", hi=3)
        if i + 5 + nlog > len(words):
            raise TableError(f"dirty log {dtype} of {path} needs {nlog} parameters, only "
                             f"{len(words) - i - 5} given")
        dargs = tuple(words[i + 5:i + 5 + nlog])
        if nr == 0:
            if dtype != "nolog" or dargs:
                raise TableError(f"local device {path} (site link 0) must use 'nolog 0', "
                                 f"not {dtype!r}")
        else:
            if dtype == "nolog":
                raise TableError(f"remote device {path} (site link {nr}) needs a dirty "
                                 "log (core or disk), not nolog")
            from dmrepl.dirtylog import parse_dirty_log_args
            try:
                parse_dirty_log_args(dtype, dargs, length if length else 1 << 62)
            except TableError:
                raise
            except Exception as e:  # UserError from the dirty log parser
                raise TableError(f"dirty log of {path} (site link {nr}): {e}") from e
        if any(leg.slink_nr == nr for leg in legs):
            raise TableError(f"site link {nr} given twice for one device")
        if any(leg.dev_path == path for leg in legs):
            raise TableError(f"device {path} given on two site links")
        legs.append(LegConfig(nr, path, dtype, dargs))
        i += 5 + nlog
    return legs


def parse_device(line: str | Sequence[str]) -> DeviceConfig:
    """Parse a full ``replicator-dev`` line or only its parameters."""
    words = _split(line)
    start, length = 0, None
    if len(words) >= 3 and words[2] == "replicator-dev":
        start = _int(words[0], "start")
        length = _int(words[1], "length", lo=1)
        words = words[3:]
    if len(words) < 2 + 5:
        raise TableError("not enough device arguments: need <replicator_device> <dev_nr> "
                         "and at least one <slink_nr> 1 <dev_path> <dlog_type> <#dlog_params>")
    dev_nr = _int(words[1], "device number", hi=(1 << 32) - 1)
    legs = parse_legs(words[2:], length)
    return DeviceConfig(words[0], dev_nr, tuple(legs), start, length)
