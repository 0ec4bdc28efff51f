"""``dmrepl events --now`` during a real link cut and restore (netns/veth).

The daemon and the remote site are the session's (``dmrepl`` in conftest.py)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from dmrepl_testing.daemon import Replicated, trace

MB = 1 << 20
#: Seconds to wait for the next event before giving up (a hang guard only).
EVENT_DEADLINE = 600


def dd_write(dev: str, offset_mb: int, count_mb: int, bs: str = "256k") -> None:
    proc = subprocess.run(["dd", "if=/dev/urandom", f"of={dev}", f"bs={bs}",
                           f"seek={offset_mb}M", "oflag=direct,seek_bytes",
                           f"count={count_mb}M", "iflag=count_bytes", "status=none"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


class EventReader:
    """``dmrepl events --now NAME`` as a process; its JSON lines in a queue."""

    def __init__(self, socket: str, name: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dmrepl.cli.main", "--socket",
                                      socket, "events", "--now", name],
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            trace(f"event: {line.strip()}")
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def until(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """Every event up to and including the first ``event`` with ``fields``."""
        seen: list[dict[str, Any]] = []
        while not seen or not (seen[-1]["event"] == event and all(
                seen[-1].get(k) == v for k, v in fields.items())):
            got = self.lines.get(timeout=EVENT_DEADLINE)
            assert got is not None, f"the event stream ended after {seen}"
            seen.append(got)
        return seen

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def test_events_show_link_down_up_and_resync_in_order(dmrepl: Any) -> None:
    d, site, lab = dmrepl
    with Replicated(lab, d, "dmrepl-test-ev", size_mb=16, log_mb=3,
                    structure="mirror",
                    remote_policy="async ios 100000", delay_ms=20, region_sectors=512,
                    site=site, site_disks=site.take()) as r:
        dd_write(r.mapper(), 0, 1)
        r.wait_converged()
        events = EventReader(d.socket, r.rep)
        try:
            current = events.until("exists", object="-")
            assert all(e["kind"] == "exists" for e in current), current
            links = {e["slink"]: e for e in current if e["object"] == "slink"}
            assert links[1]["link"] == "up" and links[1]["resync"] == "idle", links
            trace("cutting the link")
            site.cut()
            dd_write(r.mapper(), 2, 6)          # twice the log: regions out of sync
            changes = events.until("link-down", slink=1)
            trace("restoring the link")
            site.restore()
            changes += events.until("resync-end", slink=1)
        finally:
            events.close()
        remote = [e for e in changes if e.get("slink") == 1 and e["kind"] == "change"]
        names = [e["event"] for e in remote]
        assert "link-down" in names and "link-up" in names, names
        assert names.index("link-down") < names.index("link-up") \
            < names.index("resync-start") < names.index("resync-end"), names
        # one sequence, no gap reported, timestamps in order (ISO 8601 UTC sorts as text)
        assert all(e["kind"] != "lost" for e in changes), changes
        seqs = [e["seq"] for e in changes]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        times = [e["time"] for e in current + changes]
        assert times == sorted(times) and all(t.endswith("Z") for t in times), times
        start, end = names.index("resync-start"), names.index("resync-end")
        progress = [e["percent"] for e in remote[start:end] if e["event"] == "resync-progress"]
        assert progress and progress == sorted(progress), names
        r.wait_converged(timeout=300)
    # the daemon logged each at its level (its own subscriber: it may lag the stream)
    wanted = [f"WARNING dmrepl.events: link-down object=slink name={r.rep} slink=1",
              f"INFO dmrepl.events: link-up object=slink name={r.rep} slink=1"]
    deadline = time.monotonic() + EVENT_DEADLINE     # a hang guard only
    while not all(w in d.log_path.read_text(errors="replace") for w in wanted):
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.2)
