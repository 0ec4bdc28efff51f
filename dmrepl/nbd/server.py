"""Threaded NBD server: unix (or TCP) listener, one reader thread per connection.

Requests of one connection run concurrently on a small worker pool (many in
flight, replies in completion order, as the protocol allows).  A FLUSH waits
(in its worker, the reader goes on) until every write received before it has
completed, then flushes the backend, so "flush makes all completed writes
durable" holds even with workers racing.  An export can be paused
(:meth:`Export.suspend`): new requests wait, requests in flight drain, then the
backend is flushed.

The reader takes a request header, then a write's payload, each with one
``recv(n, MSG_WAITALL)`` of exactly the bytes the protocol wants: the payload
goes to the backend as received (no copy), and a reply's data is sent with its
header by one ``sendmsg`` (no join).

Abuse is bounded (:class:`NbdLimits`): connections beyond a cap are closed at
once; a client has a deadline to finish the handshake and, if configured, an
idle timeout (no whole request for that long, also bounding a request stalled
half-sent); an accept that fails for want of file descriptors is retried with
a backoff, never in a spin.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dmrepl.errors import UserError
from dmrepl.nbd import _proto as p
from dmrepl.nbd.backend import Backend
from dmrepl.nbd.latency import LatencyHistogram, LatencySnapshot
from dmrepl.ownership import claim_socket_path
from dmrepl.unixsock import AcceptBackoff

log = logging.getLogger(__name__)

WRITES = (p.Cmd.WRITE, p.Cmd.WRITE_ZEROES, p.Cmd.TRIM)
#: The ``command`` label of a request's latency; a command the protocol does
#: not know is "unknown" (a label per garbage value would grow without bound).
COMMAND_NAMES = {int(c): c.name.lower() for c in p.Cmd}
TIMEVAL = struct.Struct("@ll")   # struct timeval, for SO_RCVTIMEO
RECV_SIZE = 65536     # a receive of the handshake, whose messages have no known size
#: A short receive after this share of its timeout is that timeout (the kernel's
#: clock and ours differ by a tick).
TIMEOUT_SLACK = 0.9


@dataclass(frozen=True, slots=True)
class NbdLimits:
    """What one server grants its clients (``None``: no limit)."""

    #: connections served at once; more are closed before the greeting
    max_connections: int = 256
    #: seconds from connect until an export is chosen
    handshake_timeout: float | None = 30.0
    #: seconds a connection in transmission may go without sending a whole
    #: request (a request stalled half-sent included).  Off by default: a kernel
    #: /dev/nbdN keeps one connection for its lifetime and may be idle for days.
    idle_timeout: float | None = None


def _set_recv_timeout(sock: socket.socket, seconds: float | None) -> None:
    """A kernel receive timeout on a blocking socket (0: none): ``recv(n,
    MSG_WAITALL)`` stays one uncopied call, and returns short (or EAGAIN)
    when the time is up."""
    seconds = max(0.0, seconds or 0.0)
    whole = int(seconds)
    usec = int((seconds - whole) * 1e6)
    if seconds and not whole and not usec:
        usec = 1          # a timeout near zero, not "no timeout"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TIMEVAL.pack(whole, usec))


class ClientTimeout(Exception):
    """The client sent nothing whole within its deadline: close the connection."""


class Export:
    """A named backend plus the bookkeeping for suspend/resume."""

    def __init__(self, name: str, backend: Backend, size: int | None = None,
                 read_only: bool = False) -> None:
        self.name = name
        self.backend = backend
        self.size = backend.size_bytes if size is None else size
        self.read_only = read_only
        self._cond = threading.Condition()
        self._inflight = 0
        self._suspended = False

    @property
    def info(self) -> p.ExportInfo:
        return p.ExportInfo(self.size, self.read_only)

    @contextlib.contextmanager
    def io(self) -> Iterator[Backend]:
        with self._cond:
            while self._suspended:
                self._cond.wait()
            self._inflight += 1
        try:
            yield self.backend
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def suspend(self, timeout: float | None = None) -> None:
        with self._cond:
            self._suspended = True
            if not self._cond.wait_for(lambda: self._inflight == 0, timeout):
                self._suspended = False
                self._cond.notify_all()
                raise TimeoutError(f"export {self.name}: I/O did not drain")
        self.backend.flush()

    def resume(self) -> None:
        with self._cond:
            self._suspended = False
            self._cond.notify_all()

    @property
    def suspended(self) -> bool:
        return self._suspended


class _Exports(Mapping[str, p.ExportInfo]):
    """Read-only mapping view name -> ExportInfo for the protocol machine."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._server.exports))

    def __getitem__(self, name: str) -> p.ExportInfo:
        return self._server.exports[name].info

    def __len__(self) -> int:
        return len(self._server.exports)


class NbdServer:
    """Serve :class:`Export` s on a unix socket path or a ``(host, port)`` address."""

    def __init__(self, address: str | tuple[str, int], workers: int = 8,
                 limits: NbdLimits | None = None) -> None:
        self.address = address
        self.exports: dict[str, Export] = {}
        self.workers = workers
        self.limits = limits or NbdLimits()
        if isinstance(address, str):
            claim_socket_path(address)   # InUse if a live server answers there
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(address)
        else:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self.address = self._sock.getsockname()[:2]
        self._sock.listen(64)
        self._closing = False
        self._stopped = threading.Event()
        self._refusing = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        # service times by (export, command); recorded by every request, read
        # at scrape time (latency_snapshot)
        self._latency: dict[tuple[str, str], LatencyHistogram] = {}
        self._latency_lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-accept",
                                        daemon=True)

    def add_export(self, export: Export) -> None:
        self.exports[export.name] = export

    def remove_export(self, name: str) -> Export | None:
        return self.exports.pop(name, None)

    def latency_snapshot(self) -> dict[tuple[str, str], LatencySnapshot]:
        """Service times so far (request header received to reply sent), by
        ``(export, command)``; commands never requested are absent."""
        with self._latency_lock:
            return {key: h.snapshot() for key, h in self._latency.items()}

    def record_latency(self, export: str, command: int, elapsed_ns: int) -> None:
        """Count one request's service time (the request path: no allocation
        but a histogram's first request)."""
        key = (export, COMMAND_NAMES.get(command, "unknown"))
        with self._latency_lock:
            h = self._latency.get(key)
            if h is None:
                h = self._latency[key] = LatencyHistogram()
            h.record(elapsed_ns)

    def start(self) -> NbdServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing = True
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(5)
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        backoff = AcceptBackoff("nbd")
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._closing:
                    return
                # out of fds: the client stays queued until some are free again
                self._stopped.wait(backoff.failed(e))
                continue
            backoff.succeeded()
            with self._lock:
                full = len(self._conns) >= self.limits.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                self._refuse(conn)
                continue
            self._refusing = False
            if conn.family == socket.AF_INET:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="nbd-conn",
                             daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        if not self._refusing:
            log.warning("nbd: %d connections already: closing new ones",
                        self.limits.max_connections)
            self._refusing = True
        conn.close()

    def _serve(self, sock: socket.socket) -> None:
        try:
            _Connection(self, sock).run()
        except p.RemoteProtocolError as e:
            log.warning("nbd: closing connection: %s", e)
        except ClientTimeout as e:
            log.info("nbd: closing connection: %s", e)
        except OSError as e:
            if not self._closing:
                log.info("nbd: connection ended: %s", e)
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()


class _Connection:
    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.proto = p.ServerConnection(_Exports(server))
        self.send_lock = threading.Lock()
        self.export: Export | None = None
        # writes in flight by ticket, for FLUSH barriers
        self.pending = threading.Condition()
        self.write_tickets: set[int] = set()
        self.next_ticket = 0

    def send(self, data: bytes) -> None:
        if data:
            with self.send_lock:
                self.sock.sendall(data)

    def send_reply(self, head: bytes, data: bytes) -> None:
        if not data:
            self.send(head)
            return
        with self.send_lock:
            sent = self.sock.sendmsg([head, data])
            if sent < len(head):
                self.sock.sendall(head[sent:])
                sent = len(head)
            if sent - len(head) < len(data):
                with memoryview(data) as view:
                    self.sock.sendall(view[sent - len(head):])

    def run(self) -> None:
        limits = self.server.limits
        self.handshake_deadline = (None if limits.handshake_timeout is None
                                   else time.monotonic() + limits.handshake_timeout)
        self.send(self.proto.data_to_send())
        pool = ThreadPoolExecutor(self.server.workers, thread_name_prefix="nbd-io")
        try:
            self._loop(pool)
        finally:
            pool.shutdown(wait=True)

    def _loop(self, pool: ThreadPoolExecutor) -> None:
        # when the first receive of the request being read completed (its
        # header: receives are of exactly the bytes the protocol wants)
        header_at: int | None = None
        while True:
            event = self.proto.next_event()
            self.send(self.proto.data_to_send())
            if event is p.NEED_DATA:
                self.proto.receive_data(self._receive())
                if header_at is None:
                    header_at = time.monotonic_ns()
                continue
            if isinstance(event, p.Disconnect):
                return
            if isinstance(event, p.ExportSelected):
                self.export = self.server.exports[event.name]
                self.handshake_deadline = None
                _set_recv_timeout(self.sock, self.server.limits.idle_timeout)
                header_at = None
                continue
            assert isinstance(event, p.Request)
            received_at = time.monotonic_ns() if header_at is None else header_at
            header_at = None
            ticket = self.next_ticket
            if event.command in WRITES:
                with self.pending:
                    self.write_tickets.add(ticket)
                self.next_ticket += 1
            pool.submit(self._execute, event, ticket, received_at)

    def _receive(self) -> bytes:
        """The bytes the protocol wants next, within the connection's deadline:
        the handshake's (set before each receive), then the idle timeout (set
        once, when the export is chosen).  A receive cut short by something
        else than its timeout (a signal) returns what it got."""
        limits = self.server.limits
        want = self.proto.bytes_wanted()
        while True:
            timeout = limits.idle_timeout
            if self.handshake_deadline is not None:
                timeout = self.handshake_deadline - time.monotonic()
                if timeout <= 0:
                    raise ClientTimeout("handshake not finished in "
                                        f"{limits.handshake_timeout}s")
                _set_recv_timeout(self.sock, timeout)
            started = time.monotonic()
            data: bytes | None
            try:
                data = self.sock.recv(want or RECV_SIZE, socket.MSG_WAITALL if want else 0)
            except BlockingIOError:   # SO_RCVTIMEO expired with nothing received
                data = None
            short = data is None or 0 < len(data) < want
            if short and timeout and time.monotonic() - started >= timeout * TIMEOUT_SLACK:
                if self.handshake_deadline is not None:
                    raise ClientTimeout("handshake not finished in "
                                        f"{limits.handshake_timeout}s")
                raise ClientTimeout(f"no whole request in {timeout}s")
            if data is not None:
                return data

    def _execute(self, req: p.Request, ticket: int, received_at: int) -> None:
        error, data = 0, b""
        export = self.export
        try:
            if req.command == p.Cmd.FLUSH:
                # the writes received before this flush complete first
                with self.pending:
                    self.pending.wait_for(lambda: not self.write_tickets
                                          or min(self.write_tickets) >= ticket)
            error = self.proto.check(req)
            if export is None or self.server.exports.get(export.name) is not export:
                error = errno.ESHUTDOWN
            if not error:
                assert export is not None
                with export.io() as backend:
                    data = self._do(backend, req, export)
        except OSError as e:
            log.warning("nbd: %s failed: %s", p.Cmd(req.command).name, e)
            error = e.errno or errno.EIO
        except (UserError, ValueError) as e:
            # the backend refused the request (e.g. unaligned I/O): the client's fault
            log.info("nbd: %s refused: %s", p.Cmd(req.command).name, e)
            error = errno.EINVAL
        except Exception:
            log.exception("nbd: %s failed", req.command)
            error = errno.EIO
        finally:
            if req.command in WRITES:
                with self.pending:
                    self.write_tickets.discard(ticket)
                    self.pending.notify_all()
        reply = self.proto.reply_parts(req.handle, error, data)
        if export is not None:
            # counted as the reply is handed to the socket, not after: a client
            # that has its reply finds its request in the next scrape
            self.server.record_latency(export.name, req.command,
                                       time.monotonic_ns() - received_at)
        with contextlib.suppress(OSError):
            self.send_reply(*reply)

    @staticmethod
    def _do(backend: Backend, req: p.Request, export: Export) -> bytes:
        cmd = req.command
        if export.read_only and cmd in (p.Cmd.WRITE, p.Cmd.WRITE_ZEROES, p.Cmd.TRIM):
            raise OSError(errno.EPERM, "export is read-only")
        if cmd == p.Cmd.READ:
            return backend.read(req.offset, req.length)
        if cmd == p.Cmd.WRITE:
            backend.write(req.offset, req.data, fua=req.fua)
        elif cmd == p.Cmd.WRITE_ZEROES:
            backend.write(req.offset, bytes(req.length), fua=req.fua)
        elif cmd == p.Cmd.TRIM:
            backend.trim(req.offset, req.length)
            if req.fua:
                backend.flush()
        elif cmd == p.Cmd.FLUSH:
            backend.flush()
        return b""
