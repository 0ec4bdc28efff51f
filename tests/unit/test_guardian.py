"""The guardian process: what it resumes when the daemon's end of its pipe
closes (the resume itself, on a real device: tests/kernel/test_dmrepl_kjournal.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

from dmrepl.daemon.guardian import Guardian, serve


def test_serve_keeps_what_is_held_at_the_end() -> None:
    lines = io.StringIO('{"hold": "a"}\n{"hold": "b b"}\n{"free": "a"}\nnot json\n'
                        '{"hold": "c"}\n{"what": "x"}\n{"free": "c"}\n')
    assert serve(lines) == {"b b"}


def recorder(out: Path) -> list[str]:
    """A guardian that writes what it would resume instead of resuming it."""
    code = ("import json, sys\n"
            "from dmrepl.daemon.guardian import serve\n"
            f"open({str(out)!r}, 'a').write(json.dumps(sorted(serve(sys.stdin))) + '\\n')\n")
    return [sys.executable, "-c", code]


def test_the_guardian_is_told_before_and_after_and_sees_the_daemon_go(
        tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    g = Guardian(recorder(out))
    g.hold("a")
    g.hold("b")
    g.free("a")
    assert g.held == {"b"}
    g.close()                   # the daemon's end closes: it exits with what is held
    assert [json.loads(x) for x in out.read_text().splitlines()] == [["b"]]


def test_a_guardian_that_died_is_started_again_and_told_all_still_held(
        tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    g = Guardian(recorder(out))
    g.hold("a")
    first = g.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    while g.pid is not None:
        time.sleep(0.01)
    g.hold("b")                 # a new one, told of "a" too
    g.close()
    assert [json.loads(x) for x in out.read_text().splitlines()] == [["a", "b"]]
