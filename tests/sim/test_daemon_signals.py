"""SIGTERM stops the daemon whichever of its threads the kernel hands the signal to."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from dmrepl_testing.daemon import DaemonProcess

ENGINE = os.environ.get("DMREPL_SIM_ENGINE", "auto")
#: An idle daemon shuts down in well under a second; this only bounds a failure.
STOP_TIMEOUT = 60


def test_a_sigterm_taken_by_another_thread_than_the_main_one_stops_the_daemon(
        tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", kernel_devices=False, engine=ENGINE).start()
    try:
        assert d.proc is not None
        pid = d.proc.pid
        others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert others, "the daemon runs threads besides its main one (NBD server, event log)"
        # kill(2) of a thread's id is process-directed, but Linux offers the signal
        # to that thread first; the main thread, blocked in select(), is not woken
        # by the signal itself.
        for tid in reversed(others):
            try:
                os.kill(tid, signal.SIGTERM)
                break
            except ProcessLookupError:   # (a thread that just ended)
                continue
        else:
            raise AssertionError("every other thread of the daemon ended")
        assert d.proc.wait(STOP_TIMEOUT) == 0, d.log()
        assert "shut down in" in d.log()
    finally:
        d.kill()
