"""``ulogd events``: log create/destroy, suspend/resume and refused requests as JSON
lines from the control socket, against a fake kernel (no root, no dm)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl_testing.ulogd import FakeKernel
from ulogd.control import stream_events
from ulogd.main import Daemon
from ulogd.protocol import RequestType as RT

U = b"SIM-UUID-EV01"
#: Seconds without an event before the test gives up (a hang guard only).
EVENT_DEADLINE = 60.0


@pytest.fixture
def ulogd(tmp_path: Path) -> Iterator[tuple[FakeKernel, str]]:
    kernel = FakeKernel()
    control = str(tmp_path / "ctl" / "control")
    daemon = Daemon(kernel.transport(), control_path=control)
    thread = threading.Thread(target=daemon.serve, daemon=True)
    thread.start()
    try:
        yield kernel, control
    finally:
        daemon.request_stop()
        thread.join(10)
        kernel.close()


def next_event(stream: Iterator[dict[str, Any] | None]) -> dict[str, Any]:
    event = next(stream)
    assert event is not None, f"no event within {EVENT_DEADLINE}s"
    return event


def test_now_then_the_changes_of_a_log_in_order(ulogd: tuple[FakeKernel, str]) -> None:
    k, control = ulogd
    assert k.ctr(U, 1, "8192 core 1024").error == 0       # exists before we subscribe
    stream = stream_events(control, now=True, idle=EVENT_DEADLINE)
    assert next(stream) is None          # subscribed
    current = [next_event(stream), next_event(stream)]
    assert [(e["kind"], e["object"]) for e in current] == [("exists", "log"),
                                                           ("exists", "-")]
    assert (current[0]["uuid"], current[0]["luid"], current[0]["suspended"]) == (
        "SIM-UUID-EV01", 1, True)
    assert k.simple(U, 1, RT.RESUME).error == 0
    assert k.region(U, 1, RT.IN_SYNC, 8).error != 0      # out of range: refused
    assert k.simple(U, 1, RT.POSTSUSPEND).error == 0
    assert k.simple(U, 1, RT.DTR).error == 0
    assert k.simple(U, 1, RT.RESUME).error != 0          # unknown log now: refused
    got = [next_event(stream) for _ in range(5)]
    stream.close()
    assert [(e["kind"], e["event"]) for e in got] == [
        ("change", "resume"), ("error", "refused"), ("change", "suspend"),
        ("destroy", "log-destroy"), ("error", "refused")], got
    assert got[1]["request"] == "IN_SYNC" and got[4]["request"] == "RESUME"
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    times = [e["time"] for e in current + got]
    assert times == sorted(times) and all(t.endswith("Z") for t in times)


def test_without_now_only_changes_and_a_create(ulogd: tuple[FakeKernel, str]) -> None:
    k, control = ulogd
    assert k.ctr(U, 1, "8192 core 1024").error == 0     # no "exists" without --now
    stream = stream_events(control, idle=EVENT_DEADLINE)
    assert next(stream) is None          # subscribed: every change from here on comes
    assert k.ctr(U, 2, "8192 core 1024").error == 0
    event = next_event(stream)
    stream.close()
    assert (event["kind"], event["event"], event["luid"], event["args"]) == (
        "create", "log-create", 2, "8192 core 1024")


def test_cli_events_ends_quietly_behind_head(ulogd: tuple[FakeKernel, str]) -> None:
    k, control = ulogd
    assert k.ctr(U, 3, "8192 core 1024").error == 0
    r = subprocess.run(f"{sys.executable} -m ulogd.main events --now --control {control} "
                       "| head -1; echo \"${PIPESTATUS[0]}\"", shell=True,
                       executable="/bin/bash", capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and '"kind": "exists"' in lines[0], r.stdout + r.stderr
    assert lines[1] == "0" and r.stderr == "", r.stderr
