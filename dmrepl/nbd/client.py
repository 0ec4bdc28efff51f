"""A small NBD client used as a replicator block store for remote sites.

``NbdStore("nbd://HOST:PORT/EXPORT")`` (or ``nbd+unix:///EXPORT?socket=PATH``)
is a :class:`dmrepl.blockio.BlockIO`: the ``nbd`` and ``nbd+unix`` kinds of
:func:`dmrepl.blockio.open_store`.  Every header it sends or receives is packed
from the declarations the server uses (:mod:`dmrepl.nbd._proto`).  Requests are
pipelined (many threads may call at once; a reader thread matches replies by
handle).  Every request has a deadline: a peer that does not answer in ``timeout``
seconds (a cut link) fails the request with ``OSError(ETIMEDOUT)`` and drops the
connection; the next request reconnects (``OSError(EHOSTUNREACH/ECONNREFUSED...)``
while the site is unreachable), so the engine sees a failed site link, and a
restored one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import threading
from collections.abc import Callable, Sequence
from urllib.parse import parse_qs, urlparse

from construct import ConstructError

from dmrepl.blockio._range import Buffer, joined
from dmrepl.nbd import _proto as p
from dmrepl.nbd._socket import ack_at_once, sendmsg_all
from dmrepl.numbers import parse_decimal

RECV_SIZE = 256 << 10   # bytes the reader takes per receive at most

# Reads and writes larger than this go as several requests.
REQUEST_CHUNK = 4 << 20

# The logical block size of an export that does not announce one (NBD_INFO_BLOCK_SIZE).
DEFAULT_BLOCK_SIZE = 512

# Seconds a request may wait for its reply when opened by URL (the daemon's opener).
TIMEOUT_ENV = "DMREPL_NBD_TIMEOUT"

# Wire error numbers back to host errno (the spec's values are Linux's).
REPLY_ERRORS = {v: k for k, v in p.ERRORS.items()}


def is_nbd_url(path: str) -> bool:
    return path.startswith(("nbd://", "nbd+unix://"))


def open_url(url: str) -> NbdStore:
    """The ``nbd``/``nbd+unix`` kind of :func:`dmrepl.blockio.open_store`; the
    reply deadline is ``$DMREPL_NBD_TIMEOUT`` seconds (5)."""
    return NbdStore(url, timeout=parse_decimal(os.environ.get(TIMEOUT_ENV) or "5",
                                               f"{TIMEOUT_ENV} (seconds)"))


class NbdStore:
    # requests are pipelined: the replicator's copiers keep several writes of one
    # epoch in flight (BlockIO.concurrent_writes)
    concurrent_writes = True

    def __init__(self, url: str, timeout: float = 5.0, connect_timeout: float = 3.0) -> None:
        parsed = urlparse(url)
        self.url = url
        self.name = url
        self.logical_block_size = DEFAULT_BLOCK_SIZE
        self.export = parsed.path.lstrip("/")
        self.address: str | tuple[str, int]
        if parsed.scheme == "nbd+unix":
            sockets = parse_qs(parsed.query).get("socket")
            if not sockets:
                raise ValueError(f"{url}: nbd+unix URL needs ?socket=PATH")
            self.address = sockets[0]
        elif parsed.scheme == "nbd":
            self.address = (parsed.hostname or "localhost", parsed.port or 10809)
        else:
            raise ValueError(f"{url}: not an nbd:// or nbd+unix:// URL")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()         # connection state and sending
        self._sock: socket.socket | None = None
        self._pending: dict[int, _Reply] = {}
        self._handles = itertools.count(1)
        self._closed = False
        self.size = 0
        self.flags = 0
        with self._lock:
            self._connect()

    # -- connection ----------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._closed:
            raise OSError(errno.EBADF, "store closed")
        if self._sock is not None:
            return self._sock
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.address)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        # Sends and receives wake up at least every ``timeout`` seconds: a cut link
        # must not leave sendall() blocked forever on a full send buffer.
        sock.settimeout(self.timeout)
        self._sock = sock
        threading.Thread(target=self._reader, args=(sock,), daemon=True,
                         name="nbd-client").start()
        return sock

    def _handshake(self, sock: socket.socket) -> None:
        try:
            flags = p.GREETING.parse(_recv(sock, p.GREETING.sizeof())).flags
        except ConstructError:
            flags = 0
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise OSError(errno.EPROTO, f"{self.url}: not a fixed-newstyle NBD server")
        cflags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if flags & p.FLAG_NO_ZEROES else 0)
        data = p.OPTION_GO_DATA.build({"name": self.export, "requests": []})
        sock.sendall(p.CLIENT_FLAGS.build({"flags": cflags})
                     + p.OPTION.build({"magic": p.IHAVEOPT, "option": p.Opt.GO,
                                       "length": len(data)}) + data)
        while True:
            try:
                reply = p.OPTION_REPLY.parse(_recv(sock, p.OPTION_REPLY.sizeof()))
            except ConstructError:
                raise OSError(errno.EPROTO, f"{self.url}: bad option reply") from None
            payload = _recv(sock, reply.length)
            if reply.reply == p.Rep.ACK:
                return
            if reply.reply == p.Rep.INFO:
                self._info(payload)
            elif reply.reply & p.REP_FLAG_ERROR:
                raise OSError(errno.ENOENT, f"{self.url}: export refused: "
                                            f"{payload.decode(errors='replace')}")

    def _info(self, payload: bytes) -> None:
        """One NBD_INFO reply: the export's size and flags, or its block sizes
        (other kinds are skipped, as the spec asks)."""
        for info in (p.INFO_EXPORT, p.INFO_BLOCK_SIZE):
            try:
                parsed = info.parse(payload)
            except ConstructError:
                continue
            if info is p.INFO_EXPORT:
                self.size, self.flags = parsed.size, parsed.flags
            else:
                self.logical_block_size = parsed.minimum
            return

    def _drop(self, sock: socket.socket, error: OSError) -> None:
        """Forget a broken connection and fail everything in flight on it."""
        with self._lock:
            if self._sock is sock:
                self._sock = None
            pending = [r for r in self._pending.values() if r.sock == id(sock)]
            for h in [h for h, r in self._pending.items() if r.sock == id(sock)]:
                del self._pending[h]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        for reply in pending:
            reply.complete(error=OSError(error.errno, error.strerror))

    def _reader(self, sock: socket.socket) -> None:
        """Complete the requests in flight as their replies come.  One receive
        takes what the socket holds: the replies to an epoch of copies arrive
        together, and are parsed from one buffer (not a system call and a GIL
        hand-off each)."""
        buf = bytearray()
        head_size = p.SIMPLE_REPLY_S.size
        reply: _Reply | None = None   # taken out of _pending, not yet completed
        tcp = sock.family != socket.AF_UNIX   # (an enum conversion each time asked)
        try:
            while True:
                if len(buf) < head_size:
                    if not _receive_into(sock, buf, tcp) and not buf and self._sock is not sock:
                        return      # idle and replaced; request deadlines are in _call
                    continue
                magic, err, handle = p.SIMPLE_REPLY_S.unpack_from(buf)
                if magic != p.SIMPLE_REPLY_MAGIC:
                    raise OSError(errno.EPROTO, "bad reply magic")
                with self._lock:
                    reply = self._pending.pop(handle, None)
                length = reply.read_length if reply is not None and not err else 0
                end = head_size + length
                while len(buf) < end:
                    _receive_into(sock, buf, tcp)  # mid-message: a dead peer is dropped by _call
                data = b""
                if length:
                    with memoryview(buf) as view:
                        data = bytes(view[head_size:end])
                del buf[:end]
                if reply is None:
                    continue
                if err:
                    code = REPLY_ERRORS.get(err, errno.EIO)
                    reply.complete(error=OSError(code, f"remote: {errno.errorcode.get(code)}"))
                else:
                    reply.complete(data)
                reply = None
        except OSError as e:
            if reply is not None:
                reply.complete(error=OSError(e.errno, e.strerror))
            self._drop(sock, e)

    def _send(self, cmd: int, offset: int = 0, length: int = 0,
              data: bytes | memoryview = b"", flags: int = 0) -> Callable[[], bytes]:
        """Send one request; returns the wait for its reply (within ``timeout`` of
        the call to the wait).  The reader thread completes it: several requests
        can be in flight from one thread (one hand-off per reply, no thread per
        request)."""
        return self._send_many([(cmd, offset, length, data, flags)])[0]

    def _send_many(self, requests: Sequence[tuple[int, int, int, Buffer, int]]
                   ) -> list[Callable[[], bytes]]:
        """Send requests (``(command, offset, length, payload, flags)``) with one
        ``sendmsg`` (headers and payloads as they are: nothing copied); returns
        the wait of each (see :meth:`_send`)."""
        replies: list[_Reply] = []
        parts: list[Buffer] = []
        err: OSError | None = None
        with self._lock:
            sock = self._connect()
            handles = []
            for cmd, offset, length, data, flags in requests:
                reply = _Reply(id(sock), length if cmd == p.Cmd.READ else 0)
                handle = next(self._handles)
                self._pending[handle] = reply
                handles.append(handle)
                replies.append(reply)
                parts.append(p.REQUEST_S.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset,
                                              length))
                if len(data):
                    parts.append(data)
            try:
                sendmsg_all(sock, parts)
            except OSError as e:   # including TimeoutError: the peer stopped reading
                for handle in handles:
                    self._pending.pop(handle, None)
                err = e if not isinstance(e, TimeoutError) else OSError(
                    errno.ETIMEDOUT, f"{self.url}: send timed out after {self.timeout}s")
        if err is not None:
            self._drop(sock, err)
            raise err

        def waiter(reply: _Reply) -> Callable[[], bytes]:
            def wait() -> bytes:
                if not reply.wait(self.timeout):
                    timeout = OSError(errno.ETIMEDOUT,
                                      f"{self.url}: no reply in {self.timeout}s")
                    self._drop(sock, timeout)
                    raise timeout
                if reply.error is not None:
                    raise reply.error
                return reply.data
            return wait
        return [waiter(reply) for reply in replies]

    def _call(self, cmd: int, offset: int = 0, length: int = 0,
              data: bytes | memoryview = b"", flags: int = 0) -> bytes:
        return self._send(cmd, offset, length, data, flags)()

    @property
    def fua(self) -> bool:
        """Does the export take FUA writes (each durable once answered)?"""
        return bool(self.flags & p.FLAG_SEND_FUA)

    def start_writes(self, writes: Sequence[tuple[int, Buffer]],
                     fua: bool = False) -> list[Callable[[], None]]:
        """Send writes without waiting for them, with one system call; returns the
        wait for each one's reply (raises OSError as :meth:`pwrite`).  How a site
        link's copier keeps an epoch's writes in flight from its own thread.
        ``fua`` (where the export offers it): each write durable once answered."""
        if fua and not self.fua:
            raise ValueError(f"{self.url}: the export takes no FUA writes")
        flags = p.CMD_FLAG_FUA if fua else 0
        requests: list[tuple[int, int, int, Buffer, int]] = []
        counts = []
        for offset, data in writes:
            view = memoryview(data)
            chunks = range(0, len(view), REQUEST_CHUNK)
            for i in chunks:
                chunk = view[i:i + REQUEST_CHUNK]
                requests.append((p.Cmd.WRITE, offset + i, len(chunk), chunk, flags))
            counts.append(len(chunks))
        sent = self._send_many(requests)
        waits = []
        pos = 0
        for n in counts:
            waits.append(_all_of(sent[pos:pos + n]))
            pos += n
        return waits

    # -- BlockIO -----------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        out = []
        while length > 0:
            n = min(length, REQUEST_CHUNK)
            out.append(self._call(p.Cmd.READ, offset, n))
            offset, length = offset + n, length - n
        return b"".join(out)

    def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        view = memoryview(data)
        for i in range(0, len(view), REQUEST_CHUNK):
            chunk = view[i:i + REQUEST_CHUNK]  # sent from the caller's buffer, not copied
            self._call(p.Cmd.WRITE, offset + i, len(chunk), chunk,
                       p.CMD_FLAG_FUA if fua else 0)

    def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None:
        self.pwrite(offset, bufs[0] if len(bufs) == 1 else joined(bufs))

    def pwritev_durable(self, offset: int, bufs: Sequence[Buffer]) -> None:
        """A FUA write where the export offers FUA, else a write and a flush."""
        data = bufs[0] if len(bufs) == 1 else joined(bufs)
        if self.flags & p.FLAG_SEND_FUA:
            self.pwrite(offset, data, fua=True)
        else:
            self.pwrite(offset, data)
            self.flush()

    def flush(self) -> None:
        self._call(p.Cmd.FLUSH)

    def trim(self, offset: int, length: int) -> None:
        """A hint: sent only where the export takes trims."""
        if not self.flags & p.FLAG_SEND_TRIM:
            return
        while length > 0:
            n = min(length, REQUEST_CHUNK)
            self._call(p.Cmd.TRIM, offset, n)
            offset, length = offset + n, length - n

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(p.REQUEST_S.pack(p.REQUEST_MAGIC, 0, p.Cmd.DISC, 0, 0, 0))
            self._drop(sock, OSError(errno.EBADF, "store closed"))


class _Reply:
    """A request in flight, completed once: by the reader as its reply comes, or
    failed by the drop of its connection (whichever takes it out of the
    store's pending requests).  A lock held until then is the wait (a Future
    cost three times as much per request: a condition and its lock each)."""

    __slots__ = ("_ready", "data", "error", "read_length", "sock")

    def __init__(self, sock: int, read_length: int) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()
        self.sock = sock                  # id() of the connection it was sent on
        self.read_length = read_length    # bytes the reply carries (a read's)
        self.data = b""
        self.error: OSError | None = None

    def complete(self, data: bytes = b"", error: OSError | None = None) -> None:
        self.data, self.error = data, error
        self._ready.release()

    def wait(self, timeout: float) -> bool:
        """Has it completed within ``timeout`` seconds?  (Again: at once.)"""
        if not self._ready.acquire(timeout=timeout):
            return False
        self._ready.release()
        return True


def _all_of(waits: Sequence[Callable[[], bytes]]) -> Callable[[], None]:
    def wait() -> None:
        for w in waits:
            w()
    return wait


def _receive_into(sock: socket.socket, buf: bytearray, tcp: bool) -> bool:
    """Append what the socket holds (waiting for some); False if its timeout
    passed with nothing received.  ``tcp``: a TCP socket (see ack_at_once)."""
    try:
        if tcp:
            ack_at_once(sock)
        chunk = sock.recv(RECV_SIZE)
    except TimeoutError:
        return False
    if not chunk:
        raise OSError(errno.ECONNRESET, "connection closed by the NBD server")
    buf += chunk
    return True


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            if not buf:
                raise      # nothing read: the caller decides (idle reader)
            continue       # mid-message: keep the framing; a dead peer is dropped by _call
        if not chunk:
            raise OSError(errno.ECONNRESET, "connection closed by the NBD server")
        buf += chunk
    return bytes(buf)
