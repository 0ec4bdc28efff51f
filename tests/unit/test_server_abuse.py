"""Servers survive abuse: the control socket answers every malformed frame and
checks each op's arguments by type; the NBD server caps connections and closes
silent ones (handshake and idle timeouts)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmrepl.daemon._proto import HEADER, FrameDecoder, encode
from dmrepl.daemon.daemon import ControlServer, Daemon
from dmrepl.nbd import Export, MemoryBackend, NbdServer
from dmrepl.nbd.server import NbdLimits
from dmrepl_testing.simengine import SimReplicator

IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME = 1
CLIENT_FLAGS = 3            # fixed newstyle, no zeroes
GREETING_SIZE = 18          # NBDMAGIC, IHAVEOPT, handshake flags
EXPORT_REPLY_SIZE = 10      # size, transmission flags (no zeroes)


# -- control socket ----------------------------------------------------------------

@pytest.fixture
def control(tmp_path: Path) -> Iterator[str]:
    daemon = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=SimReplicator)
    path = str(tmp_path / "control.sock")
    server = ControlServer(daemon, path, max_connections=4, request_timeout=1.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.stop()
        thread.join(10)
        daemon.shutdown()


def raw_frame(payload: bytes) -> bytes:
    return HEADER.build(len(payload)) + payload


def exchange(conn: socket.socket, data: bytes) -> dict[str, Any]:
    """Send ``data`` and return the one reply frame (an empty dict: the server closed)."""
    if data:
        conn.sendall(data)
    decoder = FrameDecoder()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return {}
        frames = decoder.feed(chunk)
        if frames:
            return frames[0]


def connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(path)
    return conn


BAD_FRAMES = {
    "deeply nested": b"[" * 200_000 + b"]" * 200_000,
    "huge integer": b'{"op": "ping", "n": ' + b"9" * 5000 + b"}",
    "not utf-8": b'{"op": "\xff\xfe"}',
    "not an object": b"[1, 2]",
    "not JSON": b"{op: ping",
}

BAD_ARGUMENTS: list[dict[str, Any]] = [
    {"op": "create", "name": "x", "table": [1, 2]},
    {"op": "create", "name": 7, "table": "0 1 replicator"},
    {"op": "message", "name": "x", "sector": "0", "args": ["ping"]},
    {"op": "message", "name": "x", "sector": True, "args": ["ping"]},
    {"op": "message", "name": "x", "sector": 0, "args": [1]},
    {"op": "wait", "name": "x", "timeout": "soon"},
    {"op": "remove", "name": "x", "wait": [1]},
    {"op": "status", "name": {"a": 1}},
]


@pytest.mark.parametrize("kind", sorted(BAD_FRAMES))
def test_malformed_frame_gets_a_user_error_and_the_connection_serves_on(
        control: str, kind: str) -> None:
    with connect(control) as conn:
        reply = exchange(conn, raw_frame(BAD_FRAMES[kind]))
        assert reply.get("ok") is False, reply
        assert reply["error"]["kind"] == "user"
        assert "\n" not in reply["error"]["message"]
        assert exchange(conn, encode({"op": "ping"}))["ok"]   # same connection
    with connect(control) as conn:
        assert exchange(conn, encode({"op": "ping"}))["ok"]   # and a new one


@pytest.mark.parametrize("request_", BAD_ARGUMENTS, ids=lambda r: str(r)[:60])
def test_argument_of_the_wrong_type_is_a_user_error_naming_it(
        control: str, request_: dict[str, Any]) -> None:
    with connect(control) as conn:
        reply = exchange(conn, encode(request_))
        assert reply.get("ok") is False and reply["error"]["kind"] == "user", reply
        bad = [k for k in request_ if k != "op"]
        message = reply["error"]["message"]
        assert "Traceback" not in message and "\n" not in message
        assert any(repr(k) in message for k in bad), message
        assert exchange(conn, encode({"op": "ping"}))["ok"]


def test_oversized_frame_length_is_answered_then_closed(control: str) -> None:
    with connect(control) as conn:
        reply = exchange(conn, struct.pack(">I", 0xFFFFFFFF))
        assert reply["error"]["kind"] == "user"
        assert conn.recv(1) == b""        # then a clean close
    with connect(control) as conn:
        assert exchange(conn, encode({"op": "ping"}))["ok"]


def test_control_connections_are_capped_and_silent_ones_closed(control: str) -> None:
    idle = [connect(control) for _ in range(4)]      # max_connections=4, all silent
    try:
        time.sleep(0.2)
        with connect(control) as extra:
            reply = exchange(extra, b"")         # answered at once, then closed
            assert reply["error"]["kind"] == "busy", reply
        # the silent ones are closed after request_timeout (1 s); then pings work
        for conn in idle:
            assert conn.recv(1) == b""
        with connect(control) as conn:
            assert exchange(conn, encode({"op": "ping"}))["ok"]
    finally:
        for conn in idle:
            conn.close()


# -- NBD server ----------------------------------------------------------------

def nbd_connect(path: str, export: str | None = "d") -> socket.socket:
    """A raw client, through the handshake when ``export`` is given."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(path)
    if export is not None:
        assert len(conn.recv(GREETING_SIZE, socket.MSG_WAITALL)) == GREETING_SIZE
        name = export.encode()
        conn.sendall(struct.pack(">IQII", CLIENT_FLAGS, IHAVEOPT, OPT_EXPORT_NAME, len(name))
                     + name)
        assert len(conn.recv(EXPORT_REPLY_SIZE, socket.MSG_WAITALL)) == EXPORT_REPLY_SIZE
    return conn


def closed_within(conn: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``conn`` (EOF), or None if it did not."""
    conn.settimeout(seconds)
    started = time.monotonic()
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_nbd_silent_client_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    limits = NbdLimits(handshake_timeout=0.5)
    with NbdServer(path, limits=limits) as srv:
        srv.add_export(Export("d", MemoryBackend(4096)))
        with nbd_connect(path, export=None) as conn:   # greeted, never answers
            took = closed_within(conn, 10)
            assert took is not None and took < 5


def test_nbd_idle_connection_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    with NbdServer(path, limits=NbdLimits(idle_timeout=0.5)) as srv:
        srv.add_export(Export("d", MemoryBackend(4096)))
        with nbd_connect(path) as conn:
            took = closed_within(conn, 10)
            assert took is not None and 0.4 < took < 5
        with nbd_connect(path) as conn:   # half a request, then silence
            conn.sendall(b"\x25\x60\x95\x13")
            took = closed_within(conn, 10)
            assert took is not None and took < 5


def test_nbd_connections_beyond_the_cap_are_closed_and_others_served(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    with NbdServer(path, limits=NbdLimits(max_connections=3)) as srv:
        srv.add_export(Export("d", MemoryBackend(4096)))
        held = [nbd_connect(path) for _ in range(3)]
        try:
            with nbd_connect(path, export=None) as extra:
                took = closed_within(extra, 10)     # closed before any greeting
                assert took is not None
            held.pop().close()
            time.sleep(0.2)                         # its thread ends
            with nbd_connect(path):                 # a slot again: served
                pass
        finally:
            for conn in held:
                conn.close()
