"""The control socket: requests in, one reply each.

:class:`ControlServer` serves a root-only unix socket (one thread per connection);
:func:`dispatch` checks a request against its handler's declared schema (the
handler's signature, :mod:`dmrepl.daemon._schema`) and turns any failure into an
error reply (:func:`as_control_error`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from dmrepl.daemon._proto import (
    BadFrame,
    ControlError,
    FrameDecoder,
    FrameError,
    Stream,
    encode,
)
from dmrepl.daemon._schema import schema_of
from dmrepl.errors import DmreplError, InUse, UserError
from dmrepl.unixsock import AcceptBackoff, listen_root_only

log = logging.getLogger("dmrepl.daemon")

#: What a request handler's errors may be without being a bug (no traceback logged).
EXPECTED_ERRORS = (DmreplError, OSError, ValueError, KeyError, OverflowError)


def as_control_error(e: Exception, what: str) -> ControlError:
    """The control protocol's error for ``e``, raised while doing ``what``: its kind
    (user, busy, timeout, runtime, internal) says what the client must do."""
    if isinstance(e, ControlError):
        return e
    if isinstance(e, UserError):
        return ControlError("user", f"{what}: {e}")
    if isinstance(e, InUse):
        return ControlError("busy", f"{what}: {e}")
    if isinstance(e, TimeoutError):
        return ControlError("timeout", f"{what}: {e}")
    if isinstance(e, DmreplError):
        return ControlError("runtime", f"{what}: {e}")
    if isinstance(e, OSError):
        return ControlError("runtime", f"{what}: {e.strerror or e}")
    if isinstance(e, ValueError | KeyError | OverflowError):
        return ControlError("user", f"{what}: {e}")
    return ControlError("internal", f"{what}: {type(e).__name__}: {e}")


def dispatch(handler: object, request: dict[str, Any]) -> dict[str, Any]:
    """One request -> one reply: ``handler.op_<op>(**arguments)``, the arguments
    checked against the op's declared schema (its signature) before anything runs."""
    op = request.get("op")
    func: Callable[..., Any] | None = getattr(type(handler), f"op_{op}", None) \
        if isinstance(op, str) else None
    if func is None:
        shown = repr(op)[:80] if isinstance(op, str) else f"of type {type(op).__name__}"
        return ControlError("user", f"unknown request {shown}").to_wire()
    args = {k: v for k, v in request.items() if k != "op"}
    try:
        schema_of(str(op), func).check(args)
        return {"ok": True, "result": func(handler, **args)}
    except Exception as e:
        if not isinstance(e, EXPECTED_ERRORS):
            log.exception("%s failed", op)
        return as_control_error(e, str(op)).to_wire()


class RequestHandler(Protocol):
    def handle(self, request: dict[str, Any]) -> dict[str, Any]: ...


SO_PEERCRED_FMT = "3i"


#: Connections the control socket serves at once; more are answered "busy" and closed.
CONTROL_MAX_CONNECTIONS = 64
#: Seconds a control connection may take to send a whole request before it is closed.
CONTROL_REQUEST_TIMEOUT = 60.0


class ControlServer:
    """Root-only unix socket; one thread per connection, one reply per request.

    Every frame gets a reply: a malformed one (not JSON, too deep, a number too
    long, arguments of the wrong type) an error of kind "user", and the
    connection reads on; only a frame length beyond :data:`MAX_FRAME` (the
    stream cannot be followed past it) closes the connection, after the reply.
    """

    def __init__(self, daemon: RequestHandler, path: str, *,
                 max_connections: int = CONTROL_MAX_CONNECTIONS,
                 request_timeout: float | None = CONTROL_REQUEST_TIMEOUT) -> None:
        self.daemon = daemon
        self.path = path
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.sock = listen_root_only(path, 32)
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)

    @property
    def wakeup_fd(self) -> int:
        """For :func:`signal.set_wakeup_fd`: a signal then wakes :meth:`serve_forever`
        itself.  A process-directed signal may land on any thread; its Python
        handler runs in the main thread only once that thread runs bytecode again,
        and the main thread sits in ``select``.  Non-blocking, as that requires."""
        return self._wfd

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"x")

    def _woken_to_stop(self) -> bool:
        """The wake-up pipe was readable: a stop, or a signal whose handler (which
        calls :meth:`stop`) runs as soon as this thread runs bytecode again."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._rfd, 512):
                pass
        return self._stopping.is_set()

    def serve_forever(self) -> None:
        backoff = AcceptBackoff("control")
        try:
            while True:
                ready, _, _ = select.select([self.sock.fileno(), self._rfd], [], [])
                if self._rfd in ready:
                    if self._woken_to_stop():
                        return
                    continue
                try:
                    conn, _ = self.sock.accept()
                except OSError as e:
                    # out of fds: the connection stays queued; wait (for stop too)
                    delay = backoff.failed(e)
                    if delay and select.select([self._rfd], [], [], delay)[0] \
                            and self._woken_to_stop():
                        return
                    continue
                backoff.succeeded()
                if not self._slots.acquire(blocking=False):
                    self._refuse(conn)
                    continue
                threading.Thread(target=self._serve_slot, args=(conn,), daemon=True,
                                 name="control").start()
        finally:
            self.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _refuse(self, conn: socket.socket) -> None:
        log.warning("control: %d connections already: refusing one", self.max_connections)
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)   # never wait on a peer we refuse
            conn.send(encode(ControlError("busy", "too many control connections "
                                                  f"({self.max_connections}); retry "
                                                  "later").to_wire()))

    def _allowed(self, conn: socket.socket) -> bool:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                               struct.calcsize(SO_PEERCRED_FMT))
        _, uid, _ = struct.unpack(SO_PEERCRED_FMT, cred)
        return uid in (0, os.getuid())

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve(conn)
        except OSError as e:
            log.info("control: connection ended: %s", e)
        except Exception:
            # a bug, but one connection's: the daemon serves on
            log.exception("control: connection failed")
        finally:
            self._slots.release()

    def _reply(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        try:
            data = encode(reply)
        except (FrameError, TypeError, ValueError) as e:
            data = encode(ControlError("internal", f"reply not sendable: {e}").to_wire())
        conn.sendall(data)

    def _serve(self, conn: socket.socket) -> None:
        if not self._allowed(conn):
            conn.sendall(encode(ControlError("user", "permission denied: root only")
                                .to_wire()))
            return
        conn.settimeout(self.request_timeout)
        decoder = FrameDecoder()
        while True:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                log.info("control: closing a connection idle for %ss", self.request_timeout)
                return
            if not data:
                return
            decoder.receive(data)
            while True:
                try:
                    frame = decoder.next_frame()
                except BadFrame as e:
                    self._reply(conn, ControlError("user", f"invalid request: {e}").to_wire())
                    continue
                except FrameError as e:
                    log.warning("control: dropping connection: %s", e)
                    self._reply(conn, ControlError("user", f"invalid request: {e}").to_wire())
                    return
                if frame is None:
                    break
                reply = self.daemon.handle(frame)
                if isinstance(reply.get("result"), Stream):
                    self._stream(conn, reply["result"])
                    return
                self._reply(conn, reply)

    def _stream(self, conn: socket.socket, stream: Stream) -> None:
        """Send a streaming op's items until it ends or the client goes away (a
        closed connection: EOF when idle, EPIPE when sending)."""
        try:
            conn.sendall(encode({"ok": True, "stream": True}))
            for item in stream:
                if item is not None:
                    conn.sendall(encode({"event": item}))
                    continue
                # (not recv(MSG_DONTWAIT): a socket with a timeout polls first)
                readable, _, _ = select.select([conn], [], [], 0)
                if readable and not conn.recv(1, socket.MSG_PEEK):
                    return   # the client closed its end
            conn.sendall(encode({"end": True}))
        finally:
            stream.close()
