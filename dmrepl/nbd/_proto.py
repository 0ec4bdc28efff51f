"""Sans-I/O server side of the NBD fixed-newstyle protocol.

Spec: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md

Nothing here touches a socket.  A :class:`ServerConnection` is fed bytes with
:meth:`~ServerConnection.receive_data` (``b""`` means the peer closed), hands out
events from :meth:`~ServerConnection.next_event`, and queues the bytes to send,
collected with :meth:`~ServerConnection.data_to_send`.  Option haggling is
handled inside the connection (it only needs the export names and sizes); the
caller sees :class:`ExportSelected` once transmission starts, then one
:class:`Request` per command, and :class:`Disconnect` at the end.

Errors follow the recovery policy of their class: :class:`RemoteProtocolError`
means the peer broke the protocol and the connection must be closed; a request
that is well-formed but wrong (out of range, unknown command) is answered with
an error reply and the connection carries on.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from construct import (
    Bytes,
    Const,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
)

from dmrepl.errors import DmreplError
from dmrepl.flatstruct import flat_struct

# -- wire constants (spec names without the NBD_ prefix) --------------------

NBDMAGIC = 0x4E42444D41474943        # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054        # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x0003E889045565A9  # option reply magic
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# Handshake flags (server, u16) and client flags (u32).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags (u16).
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_CAN_MULTI_CONN = 1 << 8

# Command flags (u16).
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8


# Option reply types with this bit set are errors.
REP_FLAG_ERROR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = REP_FLAG_ERROR + 1
    ERR_POLICY = REP_FLAG_ERROR + 2
    ERR_INVALID = REP_FLAG_ERROR + 3
    ERR_UNKNOWN = REP_FLAG_ERROR + 6


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


# Wire error numbers; the spec fixes these values (they happen to be Linux's).
ERRORS = {
    errno.EPERM: 1, errno.EIO: 5, errno.ENOMEM: 12, errno.EINVAL: 22,
    errno.ENOSPC: 28, errno.EOVERFLOW: 75, errno.ENOTSUP: 95, errno.ESHUTDOWN: 108,
}

# Largest payload we accept in one request.  The kernel client sends at most
# max_sectors_kb (usually far below this); qemu and libnbd default to 32 MiB.
MAX_REQUEST = 32 * 1024 * 1024
# Largest request we ask clients to send (we still accept up to MAX_REQUEST): one
# write becomes one replication log entry, and an entry must fit the ring.
MAX_BLOCK = 1024 * 1024
# Largest option payload (export names are at most 4096 bytes by the spec).
MAX_OPTION = 64 * 1024
# The replicator works in 512-byte sectors: clients must align (qemu, libnbd do).
MIN_BLOCK, PREFERRED_BLOCK = 512, 4096

# -- structs ---------------------------------------------------------------

# S: 64 bits "NBDMAGIC" / S: 64 bits "IHAVEOPT" / S: 16 bits handshake flags
GREETING = Struct("nbdmagic" / Const(NBDMAGIC, Int64ub), "ihaveopt" / Const(IHAVEOPT, Int64ub),
                  "flags" / Int16ub)
# C: 32 bits client flags
CLIENT_FLAGS = Struct("flags" / Int32ub)
# C: 64 bits "IHAVEOPT" / C: 32 bits option / C: 32 bits length of data
OPTION = Struct("magic" / Int64ub, "option" / Int32ub, "length" / Int32ub)
# S: 64 bits reply magic / S: 32 bits option / S: 32 bits reply type / S: 32 bits length
OPTION_REPLY = Struct("magic" / Const(REPLY_MAGIC_OPT, Int64ub), "option" / Int32ub,
                      "reply" / Int32ub, "length" / Int32ub)
# NBD_OPT_EXPORT_NAME answer: 64 bits size / 16 bits transmission flags [/ 124 zero bytes]
EXPORT_NAME_REPLY = Struct("size" / Int64ub, "flags" / Int16ub)
# NBD_INFO_EXPORT: 16 bits type / 64 bits size / 16 bits transmission flags
INFO_EXPORT = Struct("info" / Const(Info.EXPORT, Int16ub), "size" / Int64ub, "flags" / Int16ub)
# NBD_INFO_BLOCK_SIZE: 16 bits type / 32 bits minimum / 32 bits preferred / 32 bits maximum
INFO_BLOCK_SIZE = Struct("info" / Const(Info.BLOCK_SIZE, Int16ub), "minimum" / Int32ub,
                         "preferred" / Int32ub, "maximum" / Int32ub)
# C: 32 bits magic / 16 bits command flags / 16 bits type / 64 bits handle (cookie)
#    / 64 bits offset / 32 bits length
REQUEST = Struct("magic" / Int32ub, "flags" / Int16ub, "type" / Int16ub, "handle" / Int64ub,
                 "offset" / Int64ub, "length" / Int32ub)
# S: 32 bits magic / 32 bits error / 64 bits handle
SIMPLE_REPLY = Struct("magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub), "error" / Int32ub,
                      "handle" / Int64ub)
NAME_PREFIX = Struct("length" / Int32ub)
# NBD_OPT_INFO / NBD_OPT_GO data: 32 bits name length / name / 16 bits number of
# information requests / 16 bits each
OPTION_GO_DATA = Struct("name" / PascalString(Int32ub, "utf8"),
                        "requests" / PrefixedArray(Int16ub, Int16ub))
ZEROES = Bytes(124)


# (for the per-request hot path: construct's parse/build cost ~50 us a call)
REQUEST_S = flat_struct(REQUEST, order=">")
SIMPLE_REPLY_S = flat_struct(SIMPLE_REPLY, order=">")
REQUEST_SIZE = REQUEST.sizeof()
OPTION_SIZE = OPTION.sizeof()


# -- errors ----------------------------------------------------------------

class NbdError(DmreplError):
    """Base of NBD protocol failures."""


class RemoteProtocolError(NbdError):
    """The peer broke the protocol: close the connection (the server keeps serving)."""


class LocalProtocolError(NbdError):
    """We were asked to do something the protocol state does not allow (a bug)."""


# -- events ----------------------------------------------------------------

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class ExportSelected:
    """The handshake is over; transmission on ``name`` starts."""

    name: str


class Request(NamedTuple):
    """One transmission-phase command.  ``data`` is the payload of WRITE only.
    (A named tuple: one is made per request, three times faster than a frozen
    dataclass.)"""

    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = b""

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client said goodbye (NBD_CMD_DISC, NBD_OPT_ABORT) or closed the socket."""

    clean: bool


Event = ExportSelected | Request | Disconnect | _NeedData


@dataclass(frozen=True, slots=True)
class ExportInfo:
    size: int
    read_only: bool = False


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


TRANSMISSION_FLAGS = (FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM
                      | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN)


_WRITE, _DISC = int(Cmd.WRITE), int(Cmd.DISC)   # (compared once per request)
# check()'s sets, of plain ints: an IntEnum member's comparisons cost a call each
_SERVED = frozenset(int(c) for c in (Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM,
                                     Cmd.WRITE_ZEROES, Cmd.CACHE))
_FLUSH = int(Cmd.FLUSH)
_READS = frozenset((int(Cmd.READ), int(Cmd.CACHE)))
_WRITES_DATA = frozenset((int(Cmd.WRITE), int(Cmd.WRITE_ZEROES)))


class ServerConnection:
    """The server half of one NBD connection, as a state machine over bytes.

    :param exports: export name -> :class:`ExportInfo`; looked up on every option,
        so a mapping that changes under us (exports added/removed) is fine.
    """

    def __init__(self, exports: Mapping[str, ExportInfo]) -> None:
        self._exports = exports
        self._in = bytearray()
        # a write whose header is parsed, waiting for its payload; the payload when
        # it arrived as one piece (kept as received: no copy)
        self._write_head: tuple[int, int, int, int] | None = None
        self._payload: bytes | None = None
        self._out = bytearray(GREETING.build({"flags": FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES}))
        self._eof = False
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.export: str | None = None
        self.export_size = 0

    # -- I/O side --------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed."""
        if not data:
            self._eof = True
        elif (self._write_head is not None and not self._in and self._payload is None
              and len(data) == self._write_head[3]):
            self._payload = data      # exactly the awaited write payload: no copy
        else:
            self._in += data

    def bytes_wanted(self) -> int:
        """How many bytes complete the message being received, when known (the
        rest of a request header or of a write payload), else 0.  Reading exactly
        that many (e.g. ``recv(n, MSG_WAITALL)``) hands a payload over uncopied."""
        if self.state is not State.TRANSMISSION:
            return 0
        if self._write_head is not None:
            return max(0, self._write_head[3] - len(self._in))
        return max(0, REQUEST_SIZE - len(self._in))

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(self, handle: int, error: int = 0, data: bytes = b"") -> bytes:
        """Build a simple reply; ``error`` is a host errno (mapped to the wire)."""
        if self.state is not State.TRANSMISSION:
            raise LocalProtocolError(f"cannot reply in state {self.state.value}")
        head, data = self.reply_parts(handle, error, data)
        return head + data

    def reply_parts(self, handle: int, error: int = 0, data: bytes = b"") -> tuple[bytes, bytes]:
        """:meth:`reply` as (header, payload), to be sent without joining them."""
        if self.state is not State.TRANSMISSION:
            raise LocalProtocolError(f"cannot reply in state {self.state.value}")
        wire = 0 if not error else ERRORS.get(error, ERRORS[errno.EIO])
        return SIMPLE_REPLY_S.pack(SIMPLE_REPLY_MAGIC, wire, handle), b"" if wire else data

    # -- parsing ---------------------------------------------------------

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        with memoryview(self._in) as view:
            chunk = bytes(view[:n])              # one copy (a slice would be two)
        del self._in[:n]
        return chunk

    def next_event(self) -> Event:
        while True:
            event = self._step()
            if event is not None:
                return event

    def requests(self, limit: int) -> list[Request]:
        """The complete requests buffered, at most ``limit``, parsed in one pass
        (the transmission phase's fast path: a pipelining client sends many per
        receive).  Stops before anything else (a disconnect, a write whose payload
        is not all here, a malformed request): :meth:`next_event` handles it."""
        out: list[Request] = []
        if self.state is not State.TRANSMISSION or self._write_head is not None:
            return out
        buf = self._in
        size = len(buf)
        pos = 0
        unpack = REQUEST_S.unpack_from
        with memoryview(buf) as view:
            while len(out) < limit and size - pos >= REQUEST_SIZE:
                magic, flags, cmd, handle, offset, length = unpack(buf, pos)
                if magic != REQUEST_MAGIC or cmd == _DISC:
                    break
                start = pos + REQUEST_SIZE
                if cmd == _WRITE and length:
                    if length > MAX_REQUEST or size - start < length:
                        break
                    pos = start + length
                    out.append(Request(cmd, flags, handle, offset, length,
                                       bytes(view[start:pos])))   # one copy
                else:
                    pos = start
                    out.append(Request(cmd, flags, handle, offset, length))
        if pos:
            del buf[:pos]
        return out

    def _step(self) -> Event | None:
        if self.state is State.CLOSED:
            return Disconnect(clean=True)
        if self.state is State.CLIENT_FLAGS:
            raw = self._take(CLIENT_FLAGS.sizeof())
            if raw is None:
                return self._eof_or_need()
            flags = CLIENT_FLAGS.parse(raw).flags
            if not flags & FLAG_C_FIXED_NEWSTYLE:
                raise RemoteProtocolError("client does not speak fixed newstyle")
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                raise RemoteProtocolError(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self.state = State.OPTIONS
            return None
        if self.state is State.OPTIONS:
            return self._option()
        return self._request()

    def _eof_or_need(self) -> Event:
        if self._eof:
            partial = bool(self._in) or self._write_head is not None
            clean = not partial and self.state is State.TRANSMISSION
            self.state = State.CLOSED
            if partial:
                raise RemoteProtocolError("peer closed in the middle of a message")
            return Disconnect(clean=clean)
        return NEED_DATA

    def _option(self) -> Event | None:
        if len(self._in) < OPTION_SIZE:
            return self._eof_or_need()
        head = OPTION.parse(bytes(self._in[:OPTION_SIZE]))
        if head.magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {head.magic:#x}")
        if head.length > MAX_OPTION:
            raise RemoteProtocolError(f"option {head.option} data too long ({head.length})")
        if len(self._in) < OPTION_SIZE + head.length:
            return self._eof_or_need()
        del self._in[:OPTION_SIZE]
        data = self._take(head.length) or b""
        return self._handle_option(head.option, data)

    def _opt_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY.build({"option": option, "reply": reply, "length": len(data)})
        self._out += data

    def _opt_error(self, option: int, reply: Rep, message: str) -> None:
        self._opt_reply(option, reply, message.encode())

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == Opt.EXPORT_NAME:
            name = _decode_name(data)
            info = self._exports.get(name)
            if info is None:
                # The only answer the spec allows here is closing the connection.
                raise RemoteProtocolError(f"no export named {name!r}")
            self._out += EXPORT_NAME_REPLY.build({"size": info.size,
                                                  "flags": self._tflags(info)})
            if not self.no_zeroes:
                self._out += bytes(124)
            return self._start(name, info)
        if option == Opt.ABORT:
            self._opt_reply(option, Rep.ACK)
            self.state = State.CLOSED
            return Disconnect(clean=True)
        if option == Opt.LIST:
            if data:
                self._opt_error(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for name in list(self._exports):
                raw = name.encode()
                self._opt_reply(option, Rep.SERVER, NAME_PREFIX.build({"length": len(raw)}) + raw)
            self._opt_reply(option, Rep.ACK)
            return None
        if option in (Opt.INFO, Opt.GO):
            return self._info_or_go(option, data)
        # STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers...: refused,
        # the client falls back to what the base protocol offers.
        self._opt_error(option, Rep.ERR_UNSUP, f"option {option} not supported")
        return None

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        # C: 32 bits name length / name / 16 bits number of requests / 16 bits each
        if len(data) < 6:
            self._opt_error(option, Rep.ERR_INVALID, "option data too short")
            return None
        length = int.from_bytes(data[:4], "big")
        if 4 + length + 2 > len(data):
            self._opt_error(option, Rep.ERR_INVALID, "export name length out of bounds")
            return None
        try:
            name = _decode_name(data[4:4 + length])
        except RemoteProtocolError as e:
            self._opt_error(option, Rep.ERR_INVALID, str(e))
            return None
        nreq = int.from_bytes(data[4 + length:6 + length], "big")
        if 6 + length + 2 * nreq != len(data):
            self._opt_error(option, Rep.ERR_INVALID, "information request count mismatch")
            return None
        info = self._exports.get(name)
        if info is None:
            self._opt_error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return None
        self._opt_reply(option, Rep.INFO, INFO_EXPORT.build(
            {"size": info.size, "flags": self._tflags(info)}))
        self._opt_reply(option, Rep.INFO, INFO_BLOCK_SIZE.build(
            {"minimum": MIN_BLOCK, "preferred": PREFERRED_BLOCK, "maximum": MAX_BLOCK}))
        self._opt_reply(option, Rep.ACK)
        if option == Opt.GO:
            return self._start(name, info)
        return None

    @staticmethod
    def _tflags(info: ExportInfo) -> int:
        return TRANSMISSION_FLAGS | (FLAG_READ_ONLY if info.read_only else 0)

    def _start(self, name: str, info: ExportInfo) -> Event:
        self.state = State.TRANSMISSION
        self.export = name
        self.export_size = info.size
        return ExportSelected(name)

    def _request(self) -> Event | None:
        if self._write_head is None:
            if len(self._in) < REQUEST_SIZE:
                return self._eof_or_need()
            magic, flags, cmd, handle, offset, length = REQUEST_S.unpack_from(self._in)
            if magic != REQUEST_MAGIC:
                raise RemoteProtocolError(f"bad request magic {magic:#x}")
            if cmd == Cmd.WRITE and length > MAX_REQUEST:
                # We cannot even skip the payload safely: drop the connection.
                raise RemoteProtocolError(f"write of {length} bytes exceeds {MAX_REQUEST}")
            if cmd == Cmd.WRITE and length and len(self._in) >= REQUEST_SIZE + length:
                # the whole write is here (a pipelining client): one copy, one cut
                with memoryview(self._in) as view:
                    whole = bytes(view[REQUEST_SIZE:REQUEST_SIZE + length])
                del self._in[:REQUEST_SIZE + length]
                return Request(cmd, flags, handle, offset, length, whole)
            del self._in[:REQUEST_SIZE]
            if cmd == Cmd.DISC:
                self.state = State.CLOSED
                return Disconnect(clean=True)
            if cmd != Cmd.WRITE or not length:
                return Request(cmd, flags, handle, offset, length)
            self._write_head = (flags, handle, offset, length)
        flags, handle, offset, length = self._write_head
        data = self._payload
        if data is None:
            data = self._take(length)
            if data is None:
                return self._eof_or_need()
        self._write_head = self._payload = None
        return Request(Cmd.WRITE, flags, handle, offset, length, data)

    def check(self, request: Request) -> int:
        """Return 0 if ``request`` may be executed, else the errno to reply with."""
        command = request.command
        if command not in _SERVED:
            return errno.EINVAL
        if command == _FLUSH:
            return 0
        if request.length > MAX_REQUEST and command in _READS:
            return errno.EOVERFLOW
        if request.offset + request.length > self.export_size:
            return errno.ENOSPC if command in _WRITES_DATA else errno.EINVAL
        return 0


def _decode_name(raw: bytes) -> str:
    if len(raw) > 4096:
        raise RemoteProtocolError("export name longer than 4096 bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemoteProtocolError("export name is not UTF-8") from e
