"""The admin's interface of both commands: --version, empty environment variables,
"must be root", the message list in ``dmrepl message --help``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from dmrepl.cli._exit import ExitCode
from dmrepl.cli._parser import gen_parser
from dmrepl.cli.main import run
from dmrepl.daemon.client import DEFAULT_SOCKET, Client, default_socket
from dmrepl.replicator.messages import DEVICE_MESSAGES, REPLICATOR_MESSAGES

REPO = Path(__file__).resolve().parents[2]


def command(*argv: str, user: list[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(user or []), sys.executable, *argv], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)


@pytest.mark.parametrize("module", ["dmrepl.cli.main", "ulogd.main"])
def test_version_is_the_package_metadata(module: str) -> None:
    r = command("-m", module, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [module.split(".")[0], metadata.version("dmrepl")]


def test_an_empty_socket_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMREPL_SOCKET", "")
    assert default_socket() == DEFAULT_SOCKET
    assert Client().path == DEFAULT_SOCKET
    monkeypatch.setenv("DMREPL_SOCKET", "/x/control.sock")
    assert Client().path == "/x/control.sock"


def test_an_empty_state_dir_variable_means_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMREPL_STATE_DIR", "")
    monkeypatch.setenv("DMREPL_SOCKET", "")
    ns = gen_parser().parse_args(["daemon"])
    assert (ns.state_dir, ns.socket) == ("/var/lib/dmrepl", DEFAULT_SOCKET)


def test_message_help_lists_the_messages_of_both_targets() -> None:
    r = command("-m", "dmrepl.cli.main", "message", "--help")
    assert r.returncode == 0, r.stderr
    for usage, what in (*REPLICATOR_MESSAGES, *DEVICE_MESSAGES):
        assert usage in r.stdout and what in r.stdout
    # the usage an error quotes is the one listed
    assert "slink del <slink_nr>" in r.stdout and "replog clear_lost" in r.stdout


@pytest.fixture
def unreadable_socket() -> Iterator[str]:
    """A listening control socket only root may connect to (mode 0600)."""
    where = tempfile.mkdtemp(prefix="dmrepl-perm-")
    os.chmod(where, 0o755)
    path = os.path.join(where, "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen()
        os.chmod(path, 0o600)
        yield path
    shutil.rmtree(where)


def test_a_socket_refusing_us_says_must_be_root(unreadable_socket: str) -> None:
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot be refused")
        user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    else:
        user = []
    r = command("-m", "dmrepl.cli.main", "--socket", unreadable_socket, "ls", user=user)
    assert r.returncode == ExitCode.PERMISSION, r.stderr
    assert r.stderr.startswith("dmrepl: error: must be root: ") and r.stderr.count("\n") == 1
    assert "is `dmrepl daemon` running" not in r.stderr


def test_the_daemon_with_kernel_devices_says_must_be_root(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    code = run()(["--socket", str(tmp_path / "s"), "daemon", "--state-dir",
                  str(tmp_path / "state"), "--engine", "sim"])
    assert code == ExitCode.PERMISSION
    err = capsys.readouterr().err
    assert err.startswith("dmrepl: error: must be root: ") and "--no-kernel-devices" in err
    assert not (tmp_path / "state").exists()
