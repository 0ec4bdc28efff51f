"""Seeded generators and a findings book for the slow-tier fuzz runs (tests/sim/test_fuzz_*).

A run is ``run_cases(name, count, seed, case)``: ``case(gen, i)`` is called ``count``
times, each with a :class:`Gen` seeded from ``seed`` (printed) and ``i``, so a case is
reproduced alone by its seed and number (though a server's state carries over from
earlier cases), and returns normally when the input was
handled as documented, or raises :class:`Finding` (or any other exception) when it
was not.  Findings are grouped by where they came from; the first reproducer of each
group is kept and the run fails at the end with all of them, so one run counts every
case and reports every class of defect at once.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# numbers a parser must refuse or take exactly: boundaries, signs, spellings, and a
# 5,000-digit one (issue 10 item 7)
NUMBERS = ("0", "1", "-1", "2", "7", "8", "63", "64", "512", "4096", "65535", "65536",
           str(2**31 - 1), str(2**31), str(2**32 - 1), str(2**32), str(2**63 - 1),
           str(2**63), str(2**64 - 1), str(2**64), "9" * 30, "1" + "0" * 4999, "-0", "+1",
           "0x10", "1e3", "1.5", "", " ", "00", "010", "1k", "1m", "1g", "1t", "1K",
           "nan", "inf", "\u0661", "1_000")
WORDS = ("", "-", "sync", "nosync", "async", "core", "disk", "auto", "open", "create",
         "blockdev", "ringbuffer", "replicator", "replicator-dev", "ios", "size",
         "timeout", "resync_rate", "/dev/x", "253:0", "nolog", "x" * 300, "\0", "\n", "#",
         "é", "\udcff")
INTERESTING_U64 = (0, 1, 2, 63, 64, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF_FFFF, 0x8000_0000,
                   0xFFFF_FFFF, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


class Gen(random.Random):
    """random.Random plus structured choices and byte/word mutations.  A case sets
    ``current`` to a description of its input (the reproducer of a finding)."""

    current = ""

    def number(self) -> str:
        if self.random() < 0.5:
            return self.choice(NUMBERS)
        return str(self.choice((self.randrange(100), self.getrandbits(self.randrange(1, 80)))))

    def word(self) -> str:
        r = self.random()
        if r < 0.4:
            return self.number()
        if r < 0.8:
            return self.choice(WORDS)
        return "".join(chr(self.randrange(0x20, 0x7F)) for _ in range(self.randrange(1, 12)))

    def u64(self) -> int:
        if self.random() < 0.5:
            return self.choice(INTERESTING_U64)
        return self.getrandbits(self.choice((3, 7, 16, 32, 64)))

    def mutate_words(self, words: Sequence[str]) -> list[str]:
        """1-3 word-level edits: replace, drop, duplicate, insert, swap, truncate."""
        out = list(words)
        for _ in range(self.randrange(1, 4)):
            op = self.randrange(6)
            i = self.randrange(len(out) + 1)
            if op == 0 and out:
                out[min(i, len(out) - 1)] = self.word()
            elif op == 1 and out:
                del out[min(i, len(out) - 1)]
            elif op == 2 and out:
                out.insert(i, out[min(i, len(out) - 1)])
            elif op == 3:
                out.insert(i, self.word())
            elif op == 4 and len(out) > 1:
                j = self.randrange(len(out))
                k = min(i, len(out) - 1)
                out[j], out[k] = out[k], out[j]
            else:
                out = out[:i]
        return out

    def mutate_bytes(self, data: bytes, max_edits: int = 4) -> bytes:
        """1..max_edits byte-level edits: bit flip, byte set, interesting integer,
        insert, delete, truncate, extend, splice of a block."""
        buf = bytearray(data)
        for _ in range(self.randrange(1, max_edits + 1)):
            op = self.randrange(8)
            i = self.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[min(i, len(buf) - 1)] ^= 1 << self.randrange(8)
            elif op == 1 and buf:
                buf[min(i, len(buf) - 1)] = self.choice((0, 1, 0x7F, 0x80, 0xFF,
                                                         self.randrange(256)))
            elif op == 2:
                width = self.choice((1, 2, 4, 8))
                v = self.u64() & ((1 << (8 * width)) - 1)
                buf[i:i + width] = v.to_bytes(width, self.choice(("little", "big")))
            elif op == 3:
                buf[i:i] = self.randbytes(self.randrange(1, 16))
            elif op == 4 and buf:
                del buf[i:i + self.randrange(1, 64)]
            elif op == 5:
                del buf[i:]
            elif op == 6:
                buf += self.randbytes(self.randrange(1, 64))
            elif buf:
                j = self.randrange(len(buf))
                n = self.randrange(1, 32)
                buf[i:i + n] = buf[j:j + n]
        return bytes(buf)


class Finding(AssertionError):
    """An input was not handled as documented; ``key`` groups findings of one kind."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


def _where(e: BaseException) -> str:
    """Exception type and the innermost frame in the project's code."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/dmrepl/" in f.filename or "/ulogd/" in f.filename]
    at = f" at {frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno}" if frames else ""
    return f"{type(e).__name__}{at}"


@dataclass
class Book:
    """Findings of one run: the first reproducer of each kind, and how often."""

    name: str
    seed: int
    first: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, reproducer: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        self.first.setdefault(key, reproducer)

    def report(self) -> str:
        return "\n".join(f"  [{self.counts[k]}x] {k}\n      first: {v}"
                         for k, v in self.first.items())


def case_seed(seed: int, i: int) -> int:
    """Case ``i`` of a run draws from ``Gen(case_seed(seed, i))``: reproducible alone."""
    return seed * 10_000_000 + i


def run_cases(name: str, count: int, seed: int,
              case: Callable[[Gen, int], None],
              check: Callable[[], None] | None = None, check_every: int = 1000) -> Book:
    """Run ``count`` cases; ``case`` sets ``gen.current`` to its input, then returns
    or raises.  ``check`` (e.g. "the server still answers a valid request")
    runs every ``check_every`` cases and at the end.  Prints the seed, counts and
    time; fails at the end if anything was found."""
    gen = Gen(seed)
    book = Book(name, seed)
    started = time.monotonic()
    print(f"\n{name}: seed {seed}, {count} cases")

    # a server thread that dies of an exception is a finding of the case that killed it
    died: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value or RuntimeError("?"))

    def guarded(fn: Callable[[], None], what: str) -> None:
        gen.current = ""
        try:
            fn()
        except Finding as f:
            book.add(f.key, f"{what}: {f.detail}; input {gen.current[:400]}")
        except Exception as e:
            book.add(f"uncaught {_where(e)}",
                     f"{what}: {str(e)[:200]}; input {gen.current[:400]}")
        while died:
            e = died.pop()
            book.add(f"a server thread died: {_where(e)}",
                     f"{what}: {str(e)[:200]}; input {gen.current[:400]}")

    for i in range(count):
        gen.seed(case_seed(seed, i))
        guarded(lambda i=i: case(gen, i), f"case {i} (seed {seed})")  # type: ignore[misc]
        if check is not None and (i + 1) % check_every == 0:
            guarded(check, f"health check after case {i}")
    if check is not None:
        guarded(check, "final health check")
    threading.excepthook = hook
    elapsed = time.monotonic() - started
    found = sum(book.counts.values())
    print(f"{name}: {count} cases in {elapsed:.1f} s ({count / elapsed:.0f}/s), "
          f"{found} findings in {len(book.first)} kinds")
    if book.first:
        print(book.report())
    assert not book.first, f"{name} (seed {seed}): {found} findings:\n{book.report()}"
    return book
