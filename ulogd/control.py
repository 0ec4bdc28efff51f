"""The control socket: ``ulogd status`` reads a running daemon through it.

A root-only ``AF_UNIX`` stream socket (directory 0700, socket 0600).  Framing:
the client sends one line (``status\\n``), the server answers one JSON document
and closes the connection, so the end of the reply is the end of the stream.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from dmrepl.unixsock import AcceptBackoff, listen_root_only

log = logging.getLogger("ulogd.control")

DEFAULT_CONTROL_PATH = "/run/ulogd/control"
MAX_REQUEST = 4096
#: Seconds a client has to send its whole request line (connections are served one
#: at a time: this bounds how long one silent client delays the others).
REQUEST_TIMEOUT = 5.0


class ControlServer:
    """Answers status requests from a thread; ``snapshot`` must be thread-safe."""

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self.sock = listen_root_only(path, 8, dir_mode=0o700)
        self._stop = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ulogd-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        backoff = AcceptBackoff("ulogd control")
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                if self._stop:
                    return
                # out of fds: the client stays queued; never spin on it
                self._stopped.wait(backoff.failed(e))
                continue
            backoff.succeeded()
            with conn:
                try:
                    self._handle(conn)
                except Exception as e:  # a client must never take the daemon down
                    log.warning("control request failed: %s", e)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            buf += chunk
        command = buf.split(b"\n", 1)[0].strip().decode("ascii", "replace")
        reply: dict[str, Any]
        if command == "status":
            reply = self.snapshot()
        else:
            reply = {"error": f"unknown command {command!r}"}
        conn.sendall(json.dumps(reply).encode())

    def close(self) -> None:
        self._stop = True
        self._stopped.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def query(path: str, command: str = "status", timeout: float = 10.0) -> dict[str, Any]:
    """Send ``command`` to the daemon at ``path`` and return its JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
