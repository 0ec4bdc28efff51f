"""The daemon's watcher of failed legs looks at a leg and rejoins it under the
daemon's lock, but probes a remote that may not answer without it: a site that
drops packets held every request (status included) for the probe's seconds, each
time the watcher tried again.

The daemon runs in-process on the sim engine, over the fake kernel of
test_daemon_mirror_logs; the remote leg is a stand-in whose probe the test
holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmrepl.daemon import daemon as daemon_mod
from dmrepl.daemon.daemon import Daemon, DeviceObj
from tests.unit.test_daemon_mirror_logs import FakeKernel, mirrored

__all__ = ["mirrored"]   # (the fixture, imported for pytest)


class SilentRemote:
    """A raid1's remote leg that failed; its probe waits until the test lets it
    answer (``answers``)."""

    url = "nbd://192.0.2.1:10809/remote"

    def __init__(self) -> None:
        self.probing = threading.Event()
        self.release = threading.Event()
        self.answers = False

    def status(self) -> Any:
        return SimpleNamespace(remote_failed=True)

    def settle(self) -> None:
        pass

    def reachable(self) -> bool:
        self.probing.set()
        self.release.wait(60)
        self.release.clear()
        self.probing.clear()
        return self.answers


@pytest.fixture
def watched(mirrored: tuple[Daemon, FakeKernel, list[str]], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, SilentRemote, list[str]]]:
    d, _kernel, _paths = mirrored
    monkeypatch.setattr(daemon_mod, "JOURNAL_WATCH_INTERVAL", 0.01)
    monkeypatch.setattr(daemon_mod, "JOURNAL_REJOIN_BACKOFF", 0.01)
    remote = SilentRemote()
    rejoined: list[str] = []
    w = d.objects["w"]
    assert isinstance(w, DeviceObj)
    w.remote_leg = remote  # type: ignore[assignment]
    monkeypatch.setattr(d.registry, "rejoin_remote_leg", lambda obj: rejoined.append(obj.name))
    d.watch_journal_legs()
    try:
        yield d, remote, rejoined
    finally:
        d._stopping.set()
        remote.answers = False
        remote.release.set()
        w.remote_leg = None


def test_a_request_is_served_while_the_watcher_probes_a_silent_remote(
        watched: tuple[Daemon, SilentRemote, list[str]]) -> None:
    d, remote, rejoined = watched
    assert remote.probing.wait(10), "the watcher never probed the failed leg's remote"
    answered: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: answered.append(
        d.handle({"op": "status", "name": "r"})))
    t.start()
    t.join(30)   # (the probe waits for the test: a watcher holding the lock deadlocks)
    assert answered and answered[0]["ok"], "status waited for the watcher's probe"
    remote.release.set()          # it did not answer: no rejoin
    assert remote.probing.wait(10)
    assert rejoined == []
    events = [e["event"] for e in d.events.subscribe(after=0).read(timeout=0) or []]
    assert events.count("remote-leg-failed") == 1, events   # (once, not each try)
    remote.answers = True         # it answers: rejoined, under the lock
    remote.release.set()
    deadline = time.monotonic() + 30
    while not rejoined and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rejoined == ["w"]
