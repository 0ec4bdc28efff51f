"""The daemon reads tables with the one dmsetup table grammar (dmrepl.dm.table):
its errors reach the CLI as that grammar words them, naming the line."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl.cli.main import run
from dmrepl.daemon.control import ControlServer
from dmrepl.daemon.daemon import Daemon
from dmrepl.dm.table import Table, TableError
from dmrepl_testing.simengine import SimReplicator


@pytest.fixture
def control(tmp_path: Path) -> Iterator[str]:
    daemon = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=SimReplicator)
    path = str(tmp_path / "control.sock")
    server = ControlServer(daemon, path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.stop()
        thread.join(10)
        daemon.shutdown()


DEV = "replicator-dev r {nr} 0 1 /dev/null nolog 0"


@pytest.mark.parametrize("table, line", [
    # a gap: the second line starts after the first one ends
    (f"0 8 {DEV.format(nr=0)}\n# comment\n16 8 {DEV.format(nr=1)}", 3),
    # an overlap
    (f"0 8 {DEV.format(nr=0)}\n4 8 {DEV.format(nr=1)}", 2),
    # a bad number
    (f"0 8 {DEV.format(nr=0)}\n8 -8 {DEV.format(nr=1)}", 2),
    # a target type the kernel could not name
    ("0 8 replicator-dev-of-a-long-name r 0", 1),
])
def test_a_table_error_reaches_the_cli_as_the_dm_grammar_words_it(
        control: str, table: str, line: int, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TableError) as dm:
        Table.parse(table)
    location, reason = str(dm.value).split(": ", 1)
    assert location == f"line {line}"
    code = run()(["--socket", control, "create", "v", "--table", table])
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID, err
    assert err.count("\n") == 1 and f"table line {line}" in err and reason in err, err
