"""What an operator changed survives a restart; a refused request changes nothing.

The daemon (real engine unless DMREPL_SIM_ENGINE says otherwise; NBD exports
only) and the dmrepl CLI, end to end: every kind of message is sent, ``dmrepl
table`` shows the live table, and after kill -9 and a restart the same table is
back.  Refused requests leave ``dmrepl table`` and ``dmrepl status`` as they were.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl.cli.main import run
from dmrepl_testing.daemon import DaemonProcess

MB = 1 << 20
SECTORS = 4 * MB // 512
ENGINE = os.environ.get("DMREPL_SIM_ENGINE", "auto")
pytestmark = pytest.mark.skipif(ENGINE == "sim", reason="the sim engine takes no messages")


def files(tmp: Path, *names: str, size: int = 4 * MB) -> dict[str, str]:
    out = {}
    for n in names:
        path = tmp / n
        with open(path, "wb") as f:
            f.truncate(size)
        out[n] = str(path)
    return out


def cli(d: DaemonProcess, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run()(["--socket", d.socket, *argv])
    return code, out.getvalue(), err.getvalue()


def ok(d: DaemonProcess, *argv: str) -> str:
    code, out, err = cli(d, *argv)
    assert code == 0, (argv, err)
    return out


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[DaemonProcess, dict[str, str]]]:
    """rep: site links 0 (sync), 1 (async, ios 10000: the README's), 2 (async);
    vol: local, remote on 1 and on 2."""
    f = files(tmp_path, "local", "r1", "r2", "r3")
    f.update(files(tmp_path, "log", size=32 * MB))
    d = DaemonProcess(tmp_path / "d", kernel_devices=False, engine=ENGINE).start()
    ok(d, "create", "rep", "--table",
       f"0 1 replicator ringbuffer 4 {f['log']} 0 auto 16384 blockdev 2 0 sync "
       "blockdev 4 1 async ios 10000 blockdev 2 2 async")
    ok(d, "create", "vol", "--table",
       f"0 {SECTORS} replicator-dev rep 0 0 1 {f['local']} nolog 0 "
       f"1 1 {f['r1']} core 2 1024 sync 2 1 {f['r2']} core 2 1024 sync")
    try:
        yield d, f
    finally:
        d.stop()


def tables(d: DaemonProcess) -> str:
    return ok(d, "table")


# (what, messages as (object, words), what the live table then shows)
CHANGES = [
    ("policy sync (the README's example)",
     [("rep", "slink message 1 fallbehind ios 0 policy sync")], ["blockdev 2 1 sync"]),
    ("fall-behind", [("rep", "slink message 1 fallbehind size 2m")],
     ["blockdev 4 1 async size 2m"]),
    ("resync rate", [("rep", "slink message 2 resync_rate 50m")],
     ["blockdev 4 2 async resync_rate 50m"]),
    ("slink add, device add",
     [("rep", "slink add blockdev 4 3 async timeout 5s"),
      ("vol", "device add rep 0 3 1 {r3} core 2 1024 sync")],
     ["blockdev 4 3 async timeout 5s", "3 1 {r3} core 2 1024 sync"]),
    ("device del, slink del", [("vol", "device del 2"), ("rep", "slink del 2")],
     ["blockdev 4 1 async ios 10000\n", "{r1} core 2 1024 sync\n"]),
    ("replog resize", [("rep", "replog resize 32768")], ["0 auto 32768 blockdev"]),
]


@pytest.mark.parametrize("messages,shown", [c[1:] for c in CHANGES],
                         ids=[c[0] for c in CHANGES])
def test_a_change_by_message_is_the_live_table_and_survives_a_restart(
        site: tuple[DaemonProcess, dict[str, str]], messages: list[tuple[str, str]],
        shown: list[str]) -> None:
    d, f = site
    for name, words in messages:
        ok(d, "message", name, "0", *words.format(**f).split())
    live = tables(d)
    for text in shown:
        assert text.format(**f) in live, live
    assert ok(d, "table", "rep") + ok(d, "table", "vol") == \
        "".join(line.split(": ", 1)[1] + "\n" for line in live.splitlines())
    d.kill()     # the crash case: what was acknowledged is on disk
    d.start()
    assert tables(d) == live
    assert "restore" not in ok(d, "status")


def test_the_readme_policy_sync_needs_the_fallbehind_cleared_in_the_same_message(
        site: tuple[DaemonProcess, dict[str, str]]) -> None:
    d, _ = site
    before = tables(d)
    code, _, err = cli(d, "message", "rep", "0", "slink", "message", "1", "policy", "sync")
    assert code == ExitCode.INVALID
    assert "fallbehind ios 0 policy sync" in err and err.count("\n") == 1, err
    assert tables(d) == before


REFUSED = [
    # several settings, the last one bad: the first is not applied
    ["message", "rep", "0", "slink", "message", "2", "resync_rate", "9m", "policy", "bogus"],
    ["message", "rep", "0", "slink", "message", "1", "fallbehind", "ios", "0", "policy",
     "sync", "resync_rate", "7q"],
    ["message", "rep", "0", "slink", "message", "2", "policy", "sync", "fallbehind", "ios=5"],
    ["message", "rep", "0", "slink", "message", "2", "policy", "sync", "policy", "async"],
    ["message", "rep", "0", "slink", "add", "blockdev", "2", "1", "async"],
    ["message", "rep", "0", "slink", "del", "1"],          # still has devices
    ["message", "rep", "0", "replog", "resize", "100"],
    ["message", "vol", "0", "device", "del", "7"],
    # the second leg's device is too small: the first leg must not stay behind
    ["message", "vol", "0", "device", "add", "rep", "0", "3", "1", "{r3}", "core", "2",
     "1024", "sync", "4", "1", "{small}", "core", "2", "1024", "sync"],
    ["load", "vol", "--table",
     f"0 {SECTORS} replicator-dev rep 0 0 1 {{local}} nolog 0 1 1 {{r1}} core 2 1000 sync"],
    ["load", "vol", "--table", f"0 {SECTORS} replicator-dev rep 0 0 1 {{local}} nolog 0 "
                               "9 1 {r3} core 2 1024 sync"],
]


def test_a_refused_request_changes_nothing(
        site: tuple[DaemonProcess, dict[str, str]], tmp_path: Path) -> None:
    d, f = site
    f.update(files(tmp_path, "small", size=MB))
    ok(d, "message", "rep", "0", "slink", "add", "blockdev", "2", "3", "async")
    ok(d, "message", "rep", "0", "slink", "add", "blockdev", "2", "4", "async")
    before = (tables(d), ok(d, "status", "--table-status"), ok(d, "ls"))
    for argv in REFUSED:
        code, _, err = cli(d, *(a.format(**f) for a in argv))
        assert code == ExitCode.INVALID, (argv, err)
        assert err.count("\n") == 1, err
        assert (tables(d), ok(d, "status", "--table-status"), ok(d, "ls")) == before, argv
    status = ok(d, "status", "--json")
    assert '"inactive_table": null' in status
    # nothing of the refused leg stayed: the same leg is accepted now
    ok(d, "message", "vol", "0", "device", "add", "rep", "0", "3", "1", f["r3"], "core", "2",
       "1024", "sync")


def test_a_refused_multi_line_create_leaves_no_dirty_log_written(
        site: tuple[DaemonProcess, dict[str, str]], tmp_path: Path) -> None:
    d, f = site
    f.update(files(tmp_path, "la", "lb", "ra", "rb", "dlog", size=2 * MB))
    half = SECTORS // 4
    table = (f"0 {half} replicator-dev rep 5 0 1 {f['la']} nolog 0 "
             f"1 1 {f['ra']} disk 3 {f['dlog']} 1024 sync\n"
             f"{half} {half} replicator-dev rep 6 0 1 {f['lb']} nolog 0 "
             f"1 1 {f['rb']} core 2 1000 sync")
    before = tables(d)
    code, _, err = cli(d, "create", "two", "--table", table)
    assert code == ExitCode.INVALID, err
    assert "not a power of two" in err
    assert tables(d) == before
    assert Path(f["dlog"]).read_bytes() == bytes(2 * MB)   # never initialised
