"""The daemon's tables: dmsetup table text (:mod:`dmrepl.dm.table`'s grammar) with
the daemon's rules on top.

A table holds one target type, ``replicator`` (exactly one line) or
``replicator-dev`` (lines tiling the device, in any order); each line's parameters
are the engine's to check (:mod:`dmrepl.replicator.table`'s grammar).
"""

from __future__ import annotations

from dataclasses import dataclass

from dmrepl.dm.table import TableError, Target, check_layout, parse_lines

REPLICATOR = "replicator"
REPLICATOR_DEV = "replicator-dev"


@dataclass(frozen=True, slots=True)
class Line:
    """One target line of a daemon object's table; ``text`` is its dmsetup form."""

    start: int
    length: int
    target: str
    params: list[str]
    text: str

    @classmethod
    def of(cls, target: Target) -> Line:
        return cls(target.start, target.length, target.target_type, target.params.split(),
                   target.format())

    def with_params(self, params: str) -> Line:
        """This line with other parameters (the engine's live ones)."""
        return Line.of(Target(self.start, self.length, self.target, params))


def _locate(number: int, field: str | None) -> str:
    where = f"table line {number}"
    return f"{where}: {field} (sectors; integers)" if field else where


def parse_table(text: str) -> list[Line]:
    """The lines of a ``replicator`` or ``replicator-dev`` table (blank lines and
    ``#`` comments skipped); a ``replicator-dev`` table sorted by start sector.
    Anything else: :class:`~dmrepl.dm.table.TableError` (a UserError)."""
    numbered = parse_lines(text, locate=_locate)
    if not numbered:
        raise TableError("empty table")
    kinds = {target.target_type for _, target in numbered}
    if len(kinds) > 1:
        raise TableError(f"a table holds one target type, got {', '.join(sorted(kinds))}")
    kind = kinds.pop()
    if kind not in (REPLICATOR, REPLICATOR_DEV):
        raise TableError(f"unsupported target type {kind!r} "
                         f"(dmrepl manages {REPLICATOR!r} and {REPLICATOR_DEV!r})")
    if kind == REPLICATOR:
        if len(numbered) != 1:
            raise TableError("a replicator table is exactly one line")
        return [Line.of(numbered[0][1])]
    numbered.sort(key=lambda item: item[1].start)
    check_layout([target for _, target in numbered],
                 [_locate(number, None) for number, _ in numbered])
    for number, target in numbered:
        if len(target.params.split()) < 2:
            raise TableError(f"{_locate(number, None)}: replicator-dev needs "
                             "<replicator_device> <dev_nr> ...")
    return [Line.of(target) for _, target in numbered]
