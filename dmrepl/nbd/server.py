"""Threaded NBD server: unix (or TCP) listener, one thread per connection.

A connection's thread receives whatever the socket holds and serves the
requests complete in it as one batch, on that thread (a hand-off between
Python threads can wait the interpreter's switch interval): a run of writes
goes to the backend as one ``write_many`` where it has one (the replicated
device: one log append, one flush), reads are served inline, the replies leave
in one ``sendmsg``.  Requests that wait (held by a sync site link, or not taken
by ``write_many``: a full ring, a suspended device; every write of a backend
without it) go to the connection's *waiter* pool, which replies as each
completes.  A FLUSH completes after every write received before it: inline
when none of them is at the waiter, else at the waiter after them.  An export
can be paused (:meth:`Export.suspend`): new requests wait, requests in flight
(the waiter's included) drain, then the backend is flushed.

Abuse is bounded (:class:`NbdLimits`): connections beyond a cap are closed at
once; a client has a deadline to finish the handshake and, if configured, an
idle timeout (no whole request for that long, also bounding a request stalled
half-sent); an accept that fails for want of file descriptors is retried with
a backoff, never in a spin.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dmrepl.blockio import AckWait, WriteOp
from dmrepl.errors import UserError
from dmrepl.nbd import _proto as p
from dmrepl.nbd._socket import sendmsg_all
from dmrepl.nbd.backend import Backend
from dmrepl.nbd.latency import LatencyHistogram, LatencySnapshot
from dmrepl.ownership import claim_socket_path
from dmrepl.unixsock import AcceptBackoff

log = logging.getLogger(__name__)

WRITES = frozenset(int(c) for c in (p.Cmd.WRITE, p.Cmd.WRITE_ZEROES, p.Cmd.TRIM))
#: The ``command`` label of a request's latency; a command the protocol does
#: not know is "unknown" (a label per garbage value would grow without bound).
COMMAND_NAMES = {int(c): c.name.lower() for c in p.Cmd}
TIMEVAL = struct.Struct("@ll")   # struct timeval, for SO_RCVTIMEO
RECV_SIZE = 256 * 1024   # bytes one receive takes at most
#: Requests served as one batch at most (their replies: one sendmsg, and a
#: bounded amount of read data held at once).
BATCH_MAX = 64


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

    def hold(self) -> None:
        """One more request in flight, taken over from one holding :meth:`io`
        (it does not wait for a resume: the request was admitted)."""
        with self._cond:
            self._inflight += 1

    def release(self) -> None:
        """A request counted by :meth:`hold` is done."""
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

    def record_latency(self, export: str, command: int, elapsed_ns: int,
                       requests: int = 1) -> None:
        """Count the service time of ``requests`` requests of one command that
        took the same time (a batch's replies leave together; the request path:
        no allocation but a histogram's first request)."""
        key = (export, COMMAND_NAMES.get(command, "unknown"))
        with self._latency_lock:
            h = self._latency.get(key)
            if h is None:
                h = self._latency[key] = LatencyHistogram()
            h.record(elapsed_ns, requests)

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
    """One client: the handshake, then batches of requests served on this thread.

    Each receive takes whatever the socket holds (up to :data:`RECV_SIZE`); the
    requests complete in it (at most :data:`BATCH_MAX`) are one batch, served in
    the order received: a run of writes goes to the backend as one
    ``write_many`` (where it has one: one log append, one flush), reads are
    served inline, and the batch's replies leave in one ``sendmsg``.  A request
    that would wait (a write held by a sync site link, or one the backend did not
    take: a full ring, a suspended device; every write of a backend without
    ``write_many``) is handed to the connection's *waiter*, a thread that runs
    such requests one after the other and replies to each as it completes; a
    FLUSH follows them there while any is outstanding, so it completes after
    every write received before it."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.proto = p.ServerConnection(_Exports(server))
        self.send_lock = threading.Lock()
        self.export: Export | None = None
        self.handshake_deadline: float | None = None
        # requests handed to the waiter and not replied to yet
        self.waiter: _Waiter | None = None

    def send(self, data: bytes) -> None:
        if data:
            with self.send_lock:
                self.sock.sendall(data)

    def send_replies(self, parts: list[bytes]) -> None:
        """Reply headers and data, in one ``sendmsg`` (several if the kernel takes
        less, or more buffers than one call carries)."""
        with self.send_lock:
            sendmsg_all(self.sock, parts)

    def run(self) -> None:
        limits = self.server.limits
        self.handshake_deadline = (None if limits.handshake_timeout is None
                                   else time.monotonic() + limits.handshake_timeout)
        self.send(self.proto.data_to_send())
        try:
            if self._handshake():
                self._transmit()
        finally:
            if self.waiter is not None:
                self.waiter.close()

    def _handshake(self) -> bool:
        """Options until an export is chosen (True) or the client leaves."""
        while True:
            event = self.proto.next_event()
            self.send(self.proto.data_to_send())
            if event is p.NEED_DATA:
                self.proto.receive_data(self._receive_handshake())
                continue
            if isinstance(event, p.Disconnect):
                return False
            assert isinstance(event, p.ExportSelected), event
            self.export = self.server.exports[event.name]
            self.handshake_deadline = None
            return True

    def _transmit(self) -> None:
        idle = self.server.limits.idle_timeout
        last_request = time.monotonic()
        received_at = time.monotonic_ns()
        _set_recv_timeout(self.sock, idle)
        batch: list[p.Request] = []
        while True:
            if not batch:
                batch = self.proto.requests(BATCH_MAX)
                if batch:
                    self._serve(batch, received_at)
                    batch = []
                    last_request = time.monotonic()
                    continue
            event = self.proto.next_event()
            if isinstance(event, p.Request):
                batch.append(event)
                if len(batch) < BATCH_MAX:
                    continue
            if batch:
                self._serve(batch, received_at)
                batch = []
                last_request = time.monotonic()
                if isinstance(event, p.Request):
                    continue      # (a full batch: more may be buffered)
            if isinstance(event, p.Disconnect):
                return
            assert event is p.NEED_DATA, event
            data = self._receive(idle, last_request)
            received_at = time.monotonic_ns()
            self.proto.receive_data(data)

    def _receive(self, idle: float | None, last_request: float) -> bytes:
        """What the socket holds (waiting for some): ``b""`` when the client
        closed.  ClientTimeout when no whole request came for ``idle`` seconds
        (a request stalled half-sent included)."""
        while True:
            if idle is not None:
                left = last_request + idle - time.monotonic()
                if left <= 0:
                    raise ClientTimeout(f"no whole request in {idle}s")
                _set_recv_timeout(self.sock, left)
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:   # SO_RCVTIMEO expired with nothing received
                continue

    def _receive_handshake(self) -> bytes:
        """The bytes of the handshake the socket holds, within its deadline (set
        before each receive).  A receive cut short by something else than its
        timeout (a signal) returns what it got."""
        limits = self.server.limits
        while True:
            timeout = limits.idle_timeout
            if self.handshake_deadline is not None:
                timeout = self.handshake_deadline - time.monotonic()
                if timeout <= 0:
                    raise ClientTimeout("handshake not finished in "
                                        f"{limits.handshake_timeout}s")
            _set_recv_timeout(self.sock, timeout)
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:   # SO_RCVTIMEO expired with nothing received
                continue

    # -- serving ---------------------------------------------------------------

    def _serve(self, batch: list[p.Request], received_at: int) -> None:
        """Serve a batch in order; the replies not handed to the waiter leave in
        one send."""
        export = self.export
        assert export is not None
        replies = _Replies()
        writes: list[p.Request] = []
        removed = self.server.exports.get(export.name) is not export
        with export.io() as backend:
            for req in batch:
                error = errno.ESHUTDOWN if removed else self._refusal(req, export)
                if not error and req.command in WRITES:
                    writes.append(req)
                    continue
                if writes:
                    self._write_run(backend, export, writes, received_at, replies)
                    writes = []
                if not error and req.command == p.Cmd.FLUSH and self._writes_waiting():
                    # after the writes handed over before it; the replies of those
                    # done here leave first (the client sees its writes, then the
                    # flush)
                    self._send(replies, export, received_at)
                    replies = _Replies()
                    self._hand_off(export, backend, req, received_at)
                    continue
                data = b""
                if not error:
                    error, data = self._attempt(req, functools.partial(_do, backend, req))
                self._reply(replies, req, error, data)
            if writes:
                self._write_run(backend, export, writes, received_at, replies)
        self._send(replies, export, received_at)

    def _write_run(self, backend: Backend, export: Export, writes: list[p.Request],
                   received_at: int, replies: _Replies) -> None:
        """Writes received one after the other: one ``write_many`` (where the
        backend has it) for those it takes, the waiter for the rest."""
        write_many = getattr(backend, "write_many", None)
        outcomes: list[AckWait | None] = []
        if write_many is not None:
            try:
                outcomes = write_many([_write_op(req) for req in writes])
            except Exception as e:   # the log failed: no write of the run is acknowledged
                error = self._errno_of(writes[0], e)
                for req in writes:
                    self._reply(replies, req, error)
                return
        held: list[tuple[p.Request, AckWait]] = []
        for req, outcome in zip(writes, outcomes, strict=False):
            if outcome is None:
                self._reply(replies, req)
            else:
                held.append((req, outcome))
        if held:
            self._hand_off_held(export, held, received_at)
        for req in writes[len(outcomes):]:
            self._hand_off(export, backend, req, received_at)

    def _refusal(self, req: p.Request, export: Export) -> int:
        """The errno a request to a live export is refused with before it reaches
        the backend (0: none)."""
        error = self.proto.check(req)
        if not error and export.read_only and req.command in WRITES:
            return errno.EPERM
        return error

    def _reply(self, replies: _Replies, req: p.Request, error: int = 0,
               data: bytes = b"") -> None:
        head, payload = self.proto.reply_parts(req.handle, error, data)
        replies.parts.append(head)
        if payload:
            replies.parts.append(payload)
        replies.commands[req.command] = replies.commands.get(req.command, 0) + 1

    def _send(self, replies: _Replies, export: Export, received_at: int) -> None:
        """Send the replies gathered; their service times are counted as they are
        handed to the socket, not after: a client that has its reply finds its
        request in the next scrape."""
        if not replies.parts:
            return
        elapsed = time.monotonic_ns() - received_at
        for command, n in replies.commands.items():
            self.server.record_latency(export.name, command, elapsed, n)
        with contextlib.suppress(OSError):
            self.send_replies(replies.parts)

    def _attempt(self, req: p.Request, fn: Callable[[], bytes]) -> tuple[int, bytes]:
        """``fn()`` (the request served): (0, its data), or (errno, b"")."""
        try:
            return 0, fn()
        except Exception as e:
            return self._errno_of(req, e), b""

    @staticmethod
    def _errno_of(req: p.Request, exc: Exception) -> int:
        """The reply's errno for a request the backend failed (the one funnel)."""
        name = p.Cmd(req.command).name if req.command in COMMAND_NAMES else req.command
        if isinstance(exc, OSError):
            log.warning("nbd: %s failed: %s", name, exc)
            return exc.errno or errno.EIO
        if isinstance(exc, UserError | ValueError):
            # the backend refused the request (e.g. unaligned I/O): the client's fault
            log.info("nbd: %s refused: %s", name, exc)
            return errno.EINVAL
        log.error("nbd: %s failed", name, exc_info=exc)
        return errno.EIO

    # -- the waiter ------------------------------------------------------------

    def _writes_waiting(self) -> bool:
        return self.waiter is not None and self.waiter.writes_waiting()

    def _waiter(self) -> _Waiter:
        if self.waiter is None:
            self.waiter = _Waiter(self.server.workers)
        return self.waiter

    def _hand_off(self, export: Export, backend: Backend, req: p.Request,
                  received_at: int) -> None:
        """The waiter serves ``req`` and replies; the request counts as in flight
        on the export until then."""
        export.hold()

        def done(error: int, data: bytes) -> None:
            export.release()
            replies = _Replies()
            self._reply(replies, req, error, data)
            self._send(replies, export, received_at)

        self._waiter().submit(req, lambda: self._attempt(req, lambda: _do(backend, req)),
                              done)

    def _hand_off_held(self, export: Export, held: list[tuple[p.Request, AckWait]],
                       received_at: int) -> None:
        """Writes of one batch, logged already, whose acknowledgement site links
        hold: one task of the waiter waits for them in log order and their
        replies leave in one send.  A thread and a send per write would cost a
        hand-off each, and the pool's size would cap how many sync writes are in
        flight; one wait for the batch costs what its last write costs, since the
        site links release writes by durable position, in log order."""
        for _ in held:
            export.hold()

        def serve() -> None:
            replies = _Replies()
            for req, wait in held:
                error, _data = self._attempt(req, functools.partial(_acked, wait))
                export.release()
                self._reply(replies, req, error)
            self._send(replies, export, received_at)

        self._waiter().submit_writes(len(held), serve)


@dataclass(slots=True)
class _Replies:
    """Replies gathered to leave in one send, and how many of each command."""

    parts: list[bytes] = field(default_factory=list)
    commands: dict[int, int] = field(default_factory=dict)


class _Waiter:
    """Requests of one connection that wait (sync site links, a full ring, a
    suspended device...), served on a small pool; a FLUSH waits there for the
    writes handed over before it."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="nbd-io")
        self.cond = threading.Condition()
        self.writes: set[int] = set()    # tickets of the writes not done
        self.next_ticket = 0

    def writes_waiting(self) -> bool:
        with self.cond:
            return bool(self.writes)

    def submit(self, req: p.Request, attempt: Callable[[], tuple[int, bytes]],
               done: Callable[[int, bytes], None]) -> None:
        if req.command in WRITES:
            self.submit_writes(1, lambda: done(*attempt()))
            return
        with self.cond:
            ticket = self.next_ticket

        def run() -> None:
            if req.command == p.Cmd.FLUSH:
                with self.cond:
                    self.cond.wait_for(lambda: not self.writes or min(self.writes) >= ticket)
            done(*attempt())

        self.pool.submit(run)

    def submit_writes(self, count: int, serve: Callable[[], None]) -> None:
        """``count`` writes served together by ``serve`` (which replies to them):
        a FLUSH received after them waits for it."""
        with self.cond:
            tickets = range(self.next_ticket, self.next_ticket + count)
            self.writes.update(tickets)
            self.next_ticket += count

        def run() -> None:
            try:
                serve()
            finally:   # (once replied: a flush after them replies after them)
                with self.cond:
                    self.writes.difference_update(tickets)
                    self.cond.notify_all()

        self.pool.submit(run)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _write_op(req: p.Request) -> WriteOp:
    """A write request as one write of a batch."""
    if req.command == p.Cmd.WRITE:
        return (req.offset, req.data, req.length, req.fua)
    if req.command == p.Cmd.WRITE_ZEROES:
        return (req.offset, bytes(req.length), req.length, req.fua)
    return (req.offset, None, req.length, req.fua)   # TRIM


def _acked(wait: AckWait) -> bytes:
    """A logged write's reply, once its acknowledgement came (``wait`` raises
    if it cannot)."""
    wait()
    return b""


def _do(backend: Backend, req: p.Request) -> bytes:
    cmd = req.command
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
