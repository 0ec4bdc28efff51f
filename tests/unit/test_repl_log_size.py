"""A replication log never grows its device (issue 13): like dmsetup, a table
that asks for more than the log file holds is refused with the size needed and
how to make it, and the file is left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmrepl.replicator import Replicator
from dmrepl.replicator.errors import TableError

MB = 1 << 20


@pytest.mark.parametrize("mode", ["auto", "create"])
def test_a_log_file_smaller_than_asked_is_refused_not_grown(tmp_path: Path, mode: str) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as f:
        f.truncate(MB)
    sectors = 4 * MB // 512
    with pytest.raises(TableError) as e:
        Replicator.from_table(f"0 1 replicator ringbuffer 4 {log} 0 {mode} {sectors} "
                              "blockdev 2 0 async")
    assert str(e.value) == (
        f"replog device {log} too small: the log needs {4 * MB} bytes (dev_start 0 + "
        f"{sectors} sectors), it has {MB}; make room first: `truncate -s {4 * MB} {log}`")
    assert os.path.getsize(log) == MB


def test_a_log_file_of_the_size_asked_is_used(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as f:
        f.truncate(4 * MB)
    rep = Replicator.from_table(f"0 1 replicator ringbuffer 4 {log} 0 auto {4 * MB // 512} "
                                "blockdev 2 0 async")
    rep.close()
    assert os.path.getsize(log) == 4 * MB
