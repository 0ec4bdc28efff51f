"""The control socket: ``ulogd status`` reads a running daemon through it.

A root-only ``AF_UNIX`` stream socket (directory 0700, socket 0600).  Framing:
the client sends one line (``status\\n``), the server answers one JSON document
and closes the connection, so the end of the reply is the end of the stream.
A reply with an ``error`` key is a refusal (a bad request, or ``busy``).

``events`` (or ``events --now``: first each log's current state, ``kind:
exists``, ended by an ``exists`` of object ``-``) is answered with a line
``{"stream": "events"}`` (subscribed), then one JSON object a line per change
(log create/destroy, suspend/resume, refused requests; :mod:`dmrepl.eventlog`)
until the client closes the connection.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from dmrepl.eventlog import EventLog, Subscription
from dmrepl.unixsock import AcceptBackoff, listen_root_only

log = logging.getLogger("ulogd.control")

DEFAULT_CONTROL_PATH = "/run/ulogd/control"
MAX_REQUEST = 4096
#: Seconds a client has to send its whole request line before it is closed.
REQUEST_TIMEOUT = 5.0
#: Connections served at once; one more is answered "busy" and closed.
MAX_CONNECTIONS = 64
#: Seconds an events stream waits for an event before checking its client is there.
EVENTS_IDLE_CHECK = 1.0


class ControlServer:
    """Answers status requests, one thread per connection (at most
    ``max_connections``), so a slow or silent client holds up no other.
    ``snapshot`` must be thread-safe.

    Every connection ends with one JSON reply or a clean close: a bad request
    (unknown, not ASCII, no newline within :data:`MAX_REQUEST` bytes) is answered
    ``{"error": ...}`` (a line ended by the client's shutdown instead of a newline
    is served); a client silent for ``request_timeout`` is closed.
    """

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]], *,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float | None = None,
                 events: EventLog | None = None,
                 current: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.path = path
        self.snapshot = snapshot
        self.events = events
        self.current = current
        self.max_connections = max_connections
        self.request_timeout = REQUEST_TIMEOUT if request_timeout is None else request_timeout
        self.sock = listen_root_only(path, 32, dir_mode=0o700)
        self._slots = threading.BoundedSemaphore(max_connections)
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
            if not self._slots.acquire(blocking=False):
                self._refuse(conn)
                continue
            try:
                threading.Thread(target=self._serve_connection, args=(conn,),
                                 name="ulogd-control-conn", daemon=True).start()
            except RuntimeError as e:  # no thread to be had: like running out of fds
                self._slots.release()
                conn.close()
                self._stopped.wait(backoff.failed(OSError(errno.EAGAIN, str(e))))

    def _refuse(self, conn: socket.socket) -> None:
        log.warning("control: %d connections already: refusing one", self.max_connections)
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)  # never wait on a peer we refuse
            conn.send(_encode({"error": f"busy: {self.max_connections} control connections "
                                        "already; retry later"}))
            _discard_unread(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._handle(conn)
        except TimeoutError:
            log.info("control: closing a connection silent for %ss", self.request_timeout)
        except OSError as e:
            log.info("control: connection ended: %s", e)
        except Exception:
            # a bug, but one connection's: the daemon serves on
            log.exception("control: connection failed")
        finally:
            self._slots.release()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.request_timeout)
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            buf += chunk
        line, newline, _ = buf.partition(b"\n")
        reply: dict[str, Any]
        if not newline and len(buf) >= MAX_REQUEST:
            reply = {"error": f"request not a line of at most {MAX_REQUEST} bytes"}
        elif not line.isascii():
            reply = {"error": "request not ASCII"}
        elif (command := line.strip().decode("ascii")) in ("events", "events --now") \
                and self.events is not None:
            self._stream(conn, self.events, now=command.endswith("--now"))
            return
        elif command != "status":
            reply = {"error": f"unknown command {command!r}"}
        else:
            try:
                reply = self.snapshot()
            except Exception as e:
                log.exception("control: status failed")
                reply = {"error": f"status failed: {e}"}
        conn.sendall(_encode(reply))
        conn.setblocking(False)
        _discard_unread(conn)

    def _stream(self, conn: socket.socket, events: EventLog, *, now: bool) -> None:
        """JSON lines until the client closes (EOF while idle, EPIPE on a send)."""
        sub = events.subscribe()   # before the current state: no change lost
        conn.sendall(b'{"stream": "events"}\n')   # subscribed: what follows is new
        current = []
        if now:
            current = [events.stamp("exists", "exists", "log", **fields)
                       for fields in (self.current() if self.current else [])]
            current.append(events.stamp("exists", "exists", "-"))
        for item in _event_items(sub, current):
            if item is not None:
                conn.sendall(json.dumps(item).encode() + b"\n")
                continue
            readable, _, _ = select.select([conn], [], [], 0)
            if readable and not conn.recv(MAX_REQUEST, socket.MSG_PEEK):
                return

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


def _event_items(sub: Subscription, current: list[dict[str, Any]]
                 ) -> Iterator[dict[str, Any] | None]:
    yield from current
    while (batch := sub.read(EVENTS_IDLE_CHECK)) is not None:
        if not batch:
            yield None
        yield from batch


def stream_events(path: str, now: bool = False, timeout: float = 10.0,
                  idle: float = EVENTS_IDLE_CHECK) -> Iterator[dict[str, Any] | None]:
    """``ulogd events``: each event from the daemon at ``path`` as it comes;
    ``None`` once subscribed (every change from then on comes) and after each
    ``idle`` seconds without one (the caller may check its own
    reader is still there).  ValueError if the daemon refuses."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"events --now\n" if now else b"events\n")
        s.settimeout(idle)   # events may be hours apart
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                yield None
                continue
            if not chunk:
                if buf.strip():   # a refusal: one JSON document, no newline
                    reply = json.loads(buf)
                    raise ValueError(f"refused: {reply.get('error', reply)}")
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                item = json.loads(line)
                yield None if item == {"stream": "events"} else item


def _discard_unread(conn: socket.socket) -> None:
    """Read (without waiting) what the peer sent beyond its request: a unix socket
    closed with unread data resets the peer's connection."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not conn.recv(MAX_REQUEST):
                return


def _encode(reply: dict[str, Any]) -> bytes:
    try:
        return json.dumps(reply).encode()
    except (TypeError, ValueError) as e:
        return json.dumps({"error": f"reply not encodable: {e}"}).encode()


def query(path: str, command: str = "status", timeout: float = 10.0) -> dict[str, Any]:
    """Send ``command`` to the daemon at ``path`` and return its JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(command.encode() + b"\n")
        except BrokenPipeError:
            pass  # refused before it read the request: its reply may be waiting
        chunks: list[bytes] = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                if not chunks:
                    raise
                break  # closed with our request unread, after the reply (a refusal)
            if not chunk:
                break
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
