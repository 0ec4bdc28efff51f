"""ulogd's control socket: no client holds up another, connections are capped,
every bad request is answered with an error (and the server serves on)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ulogd import control
from ulogd.control import ControlServer, query

STATUS = {"logs": [], "requests": 0}


def serve(path: str, snapshot: Callable[[], dict[str, Any]] = lambda: dict(STATUS),
          **kw: Any) -> ControlServer:
    server = ControlServer(path, snapshot, **kw)
    server.start()
    return server


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "ctl" / "control")


@pytest.fixture
def server(path: str) -> Iterator[ControlServer]:
    srv = serve(path)
    yield srv
    srv.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def reply_to(conn: socket.socket, data: bytes) -> Any:
    """Send ``data``, then the whole reply (the server closes after it), decoded."""
    try:
        conn.sendall(data)
    except BrokenPipeError:            # refused before the server read it
        pass
    chunks = []
    while True:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:   # closed with part of our request unread
            assert chunks
            break
        if not chunk:
            break
        chunks.append(chunk)
    return json.loads(b"".join(chunks))


def still_open(conn: socket.socket) -> bool:
    """The server has neither replied on nor closed ``conn``."""
    conn.setblocking(False)
    try:
        conn.recv(1)
    except BlockingIOError:
        return True
    finally:
        conn.settimeout(30)
    return False


def test_a_silent_client_does_not_delay_status(monkeypatch: pytest.MonkeyPatch,
                                               path: str) -> None:
    # Longer than query()'s own timeout: a server that serves connections one at a
    # time answers the second client only after the silent one timed out.
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 60.0)
    srv = serve(path)
    try:
        with connect(path) as silent:
            assert query(path, timeout=10.0) == STATUS
            assert still_open(silent)       # answered while the silent one waits
    finally:
        srv.close()


def test_connections_are_capped(path: str) -> None:
    srv = serve(path, max_connections=2, request_timeout=60.0)
    try:
        silent = [connect(path) for _ in range(2)]
        with connect(path) as extra:       # accepted after both silent ones
            assert "busy" in reply_to(extra, b"status\n")["error"]
        assert all(still_open(s) for s in silent)
        silent.pop().close()               # a slot comes free once its thread sees EOF
        for _ in range(1000):
            snap = query(path)
            if "error" not in snap:
                break
            assert "busy" in snap["error"]
        assert snap == STATUS
        for s in silent:
            s.close()
    finally:
        srv.close()


@pytest.mark.parametrize(("request_", "says"), [
    (b"st\xffatus\n", "not ASCII"),
    (b"x" * (control.MAX_REQUEST + 10), f"at most {control.MAX_REQUEST} bytes"),
    (b"\n", "unknown command ''"),
    (b"reboot\n", "unknown command 'reboot'"),
])
def test_a_bad_request_is_answered_with_what_is_wrong(server: ControlServer, path: str,
                                                       request_: bytes, says: str) -> None:
    with connect(path) as conn:
        assert says in reply_to(conn, request_)["error"]
    assert query(path) == STATUS


def test_a_failing_status_is_answered_with_an_error(path: str) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot broke")

    srv = serve(path, snapshot=broken)
    try:
        assert "snapshot broke" in query(path)["error"]
        assert "snapshot broke" in query(path)["error"]  # and serves on
    finally:
        srv.close()
