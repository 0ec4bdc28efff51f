"""The dm-log-userspace connector protocol, sans I/O.

Theory of operation
-------------------
The kernel module ``dm-log-userspace`` sends one request per netlink message to
connector group ``CN_IDX_DM`` (7).  A message is three headers back to back, all
in host byte order::

    struct nlmsghdr (16) | struct cn_msg (20) | struct dm_ulog_request (160) | data

:func:`decode_datagram` turns a received datagram (which may hold several
netlink messages) into typed, immutable request events; :func:`encode_reply`
turns a request plus a result back into the bytes the kernel expects.  Nothing
here touches a socket or a clock.

Rules (see shared/reference/kernel-protocol.md):

* replies are matched by the kernel on ``dm_ulog_request.seq``; we echo the
  request header with ``error`` (a negative errno) and ``data_size`` set;
* a reply never carries more data than the kernel's buffer for that request
  (:data:`REPLY_CAPACITY`): more would earn ``-ENOSPC`` and a retry loop;
* the reconnect CTR (sent after ``-ESRCH``) carries a trailing NUL and has a
  reply capacity of 0: it must not name the log device (a cmirrord bug);
* ``FLUSH`` may carry marks (``integrated_flush`` is stripped from the CTR
  string, so any payload on a FLUSH *is* a list of regions to mark);
* an unknown request type still gets an answer (``-EINVAL``): silence makes the
  kernel retry every 15 s forever (another cmirrord bug).

The wire structs are declared once, with construct, below.  The hot path uses a
:class:`struct.Struct` *derived* from those declarations (:func:`struct_format`),
never a hand-written format; a unit test proves both agree with the C compiler.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from construct import Bytes, Construct, Int16un, Int32sn, Int32un, Int64sn, Int64un
from construct import Struct as CStruct

from cdefs import dm_ioctl
from cdefs.connector import lib
from dmrepl.flatstruct import flat_struct, struct_format

# ---------------------------------------------------------------------------
# Wire structs, declared once (native byte order: the kernel ABI)
# ---------------------------------------------------------------------------

#: C: ``struct nlmsghdr`` from <linux/netlink.h>, 16 bytes.
NlMsgHdr = CStruct(
    "nlmsg_len" / Int32un,      # C: __u32, length including this header
    "nlmsg_type" / Int16un,     # C: __u16, NLMSG_DONE for connector messages
    "nlmsg_flags" / Int16un,    # C: __u16
    "nlmsg_seq" / Int32un,      # C: __u32
    "nlmsg_pid" / Int32un,      # C: __u32, sender port id
)

#: C: ``struct cn_msg`` (with its ``struct cb_id``) from <linux/connector.h>, 20 bytes.
CnMsg = CStruct(
    "idx" / Int32un,            # C: id.idx, CN_IDX_DM
    "val" / Int32un,            # C: id.val, CN_VAL_DM_USERSPACE_LOG
    "seq" / Int32un,            # C: __u32, matches ACK-only replies
    "ack" / Int32un,            # C: __u32, positive errno in ACK-only replies
    "len" / Int16un,            # C: __u16, bytes after this header
    "flags" / Int16un,          # C: __u16
)

#: C: ``struct dm_ulog_request`` from <linux/dm-log-userspace.h>, 160 bytes.
DmUlogRequest = CStruct(
    "luid" / Int64un,           # C: __u64, kernel address of the log: unique while alive
    "uuid" / Bytes(lib.DM_UUID_LEN),  # C: char[129], NUL-terminated
    "padding" / Bytes(3),       # C: char[3]
    "version" / Int32un,        # C: __u32, DM_ULOG_REQUEST_VERSION (3 today)
    "error" / Int32sn,          # C: __s32, negative errno in replies
    "seq" / Int32un,            # C: __u32, the kernel's global request counter
    "request_type" / Int32un,   # C: __u32, DM_ULOG_* (low 8 bits)
    "data_size" / Int32un,      # C: __u32, payload bytes after this struct
)

#: C: ``struct { int64_t i; region_t r; }`` (GET_RESYNC_WORK reply, dm-log-userspace-base.c).
ResyncWork = CStruct("i" / Int64sn, "r" / Int64un)
#: C: ``struct { region_t r; int64_t i; }`` (SET_REGION_SYNC payload: region first).
RegionSync = CStruct("region" / Int64un, "in_sync" / Int64sn)
#: C: ``struct { int64_t is_recovering; uint64_t in_sync_hint; }`` (IS_REMOTE_RECOVERING reply).
RemoteRecovering = CStruct("is_recovering" / Int64sn, "in_sync_hint" / Int64un)
#: C: ``region_t`` / ``uint64_t`` (region arguments and u64 replies).
U64 = Int64un
#: C: ``int64_t`` (IS_CLEAN / IN_SYNC replies).
S64 = Int64sn


def _native(*parts: Construct) -> struct.Struct:
    return flat_struct(*parts, order="=")


def _fields_format(st: Any, keep: frozenset[str]) -> str:
    """The format of struct ``st`` with the fields not in ``keep`` as pad bytes."""
    return "".join(struct_format(sc, "=") if sc.name in keep else f"{sc.sizeof()}x"
                   for sc in st.subcons)


def field_offset(st: Any, name: str) -> int:
    """Byte offset of field ``name`` in the fixed-size construct struct ``st``."""
    off = 0
    for sc in st.subcons:
        if sc.name == name:
            return off
        off += sc.sizeof()
    raise KeyError(name)


NLMSG_HDR: Final = _native(NlMsgHdr)
CN_MSG: Final = _native(CnMsg)
ULOG_REQUEST: Final = _native(DmUlogRequest)
#: The three headers of one message, as one struct (16 + 20 + 160 = 196 bytes).
HEADERS: Final = _native(NlMsgHdr, CnMsg, DmUlogRequest)
RESYNC_WORK: Final = _native(ResyncWork)
REGION_SYNC: Final = _native(RegionSync)
REMOTE_RECOVERING: Final = _native(RemoteRecovering)
U64_S: Final = _native(U64)
S64_S: Final = _native(S64)

#: The header fields the hot path reads, in one unpack (the others are skipped):
#: nlmsg_len, nlmsg_type, idx, val, len, luid, version, seq, request_type, data_size.
HOT_FIELDS: Final = struct.Struct("=" + "".join((
    _fields_format(NlMsgHdr, frozenset({"nlmsg_len", "nlmsg_type"})),
    _fields_format(CnMsg, frozenset({"idx", "val", "len"})),
    _fields_format(DmUlogRequest, frozenset({"luid", "version", "seq", "request_type",
                                             "data_size"})))))
#: nlmsghdr + cn_msg, written as a whole into an in-place reply.
NL_CN: Final = _native(NlMsgHdr, CnMsg)
#: dm_ulog_request from ``padding`` to ``data_size``, written into an in-place reply.
ULOG_TAIL: Final = struct.Struct("=" + "".join(
    struct_format(sc, "=") for sc in DmUlogRequest.subcons[2:]))

NLMSG_HDRLEN: Final = NLMSG_HDR.size
CN_HDRLEN: Final = CN_MSG.size
ULOG_HDRLEN: Final = ULOG_REQUEST.size
HEADERS_LEN: Final = HEADERS.size
NLMSG_DONE: Final = int(lib.NLMSG_DONE)
NLMSG_ALIGNTO: Final = int(lib.NLMSG_ALIGNTO)
CN_IDX_DM: Final = int(lib.CN_IDX_DM)
CN_VAL_DM_USERSPACE_LOG: Final = int(lib.CN_VAL_DM_USERSPACE_LOG)
CONNECTOR_MAX_MSG_SIZE: Final = int(lib.CONNECTOR_MAX_MSG_SIZE)
REQUEST_MASK: Final = int(lib.DM_ULOG_REQUEST_MASK)
DM_UUID_LEN: Final = int(lib.DM_UUID_LEN)
DM_ULOG_REQUEST_VERSION: Final = int(lib.DM_ULOG_REQUEST_VERSION)
#: DM_NAME_LEN (dm-ioctl.h): the CTR reply buffer.
DM_NAME_LEN: Final = int(dm_ioctl.lib.DM_NAME_LEN)
#: The kernel's preallocated request buffer (dm-log-userspace-transfer.c; not in a
#: uapi header, so not checkable against one).
DM_ULOG_PREALLOCED_SIZE: Final = 512
#: The largest kernel payload: what the preallocated buffer leaves after the headers.
MAX_KERNEL_PAYLOAD: Final = DM_ULOG_PREALLOCED_SIZE - CN_HDRLEN - ULOG_HDRLEN
#: One region argument (``region_t``) and the u64/s64 replies: 8 bytes.
REGION_ARG_SIZE: Final = U64_S.size
#: Offsets in a whole message (nlmsghdr + cn_msg + dm_ulog_request).
UUID_OFFSET: Final = NLMSG_HDRLEN + CN_HDRLEN + field_offset(DmUlogRequest, "uuid")
ULOG_TAIL_OFFSET: Final = NLMSG_HDRLEN + CN_HDRLEN + field_offset(DmUlogRequest, "padding")


class RequestType(IntEnum):
    """DM_ULOG_* request numbers (values taken from the checked cdefs)."""

    CTR = lib.DM_ULOG_CTR
    DTR = lib.DM_ULOG_DTR
    PRESUSPEND = lib.DM_ULOG_PRESUSPEND
    POSTSUSPEND = lib.DM_ULOG_POSTSUSPEND
    RESUME = lib.DM_ULOG_RESUME
    GET_REGION_SIZE = lib.DM_ULOG_GET_REGION_SIZE
    IS_CLEAN = lib.DM_ULOG_IS_CLEAN
    IN_SYNC = lib.DM_ULOG_IN_SYNC
    FLUSH = lib.DM_ULOG_FLUSH
    MARK_REGION = lib.DM_ULOG_MARK_REGION
    CLEAR_REGION = lib.DM_ULOG_CLEAR_REGION
    GET_RESYNC_WORK = lib.DM_ULOG_GET_RESYNC_WORK
    SET_REGION_SYNC = lib.DM_ULOG_SET_REGION_SYNC
    GET_SYNC_COUNT = lib.DM_ULOG_GET_SYNC_COUNT
    STATUS_INFO = lib.DM_ULOG_STATUS_INFO
    STATUS_TABLE = lib.DM_ULOG_STATUS_TABLE
    IS_REMOTE_RECOVERING = lib.DM_ULOG_IS_REMOTE_RECOVERING


#: Size of a table indexed by request number (0 is no request): the largest number + 1.
REQUEST_TYPE_SLOTS: Final = max(RequestType) + 1

#: Largest reply payload the kernel accepts per request type (its buffer size).
#: STATUS_* get the remaining status buffer; we cap them far below any real one.
STATUS_CAPACITY: Final = 512
REPLY_CAPACITY: Final[dict[int, int]] = {
    RequestType.CTR: DM_NAME_LEN,
    RequestType.GET_REGION_SIZE: U64_S.size,
    RequestType.IS_CLEAN: S64_S.size,
    RequestType.IN_SYNC: S64_S.size,
    RequestType.GET_SYNC_COUNT: U64_S.size,
    RequestType.GET_RESYNC_WORK: RESYNC_WORK.size,
    RequestType.IS_REMOTE_RECOVERING: REMOTE_RECOVERING.size,
    RequestType.STATUS_INFO: STATUS_CAPACITY,
    RequestType.STATUS_TABLE: STATUS_CAPACITY,
}


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A request from the kernel: the header fields every request carries."""

    seq: int
    luid: int
    uuid: bytes          # up to the first NUL
    version: int
    request_type: int    # masked with DM_ULOG_REQUEST_MASK

    @property
    def key(self) -> tuple[bytes, int]:
        return (self.uuid, self.luid)


@dataclass(frozen=True, slots=True)
class Ctr(Request):
    args: str
    #: the kernel's reconnect CTR (trailing NUL): reply capacity 0.
    reconnect: bool


@dataclass(frozen=True, slots=True)
class NoPayload(Request):
    """DTR, PRESUSPEND, POSTSUSPEND, RESUME, GET_REGION_SIZE, GET_RESYNC_WORK,
    GET_SYNC_COUNT, STATUS_INFO, STATUS_TABLE: the header says it all."""


@dataclass(frozen=True, slots=True)
class OneRegion(Request):
    """IS_CLEAN, IN_SYNC, IS_REMOTE_RECOVERING: about one region."""

    region: int


@dataclass(frozen=True, slots=True)
class RegionList(Request):
    """MARK_REGION, CLEAR_REGION (up to 32 regions), and FLUSH: empty, or the
    regions to mark first (integrated_flush)."""

    regions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetRegionSync(Request):
    region: int
    in_sync: bool


@dataclass(frozen=True, slots=True)
class UnknownRequest(Request):
    """A request type we do not know: answered with ``-EINVAL``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MalformedRequest(Request):
    """A parseable header with a bad payload: answered with ``-EINVAL``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """Bytes that cannot be answered (no usable header): counted, not replied to."""

    reason: str


Event = Request | Dropped

_NO_PAYLOAD: Final = frozenset({
    RequestType.DTR, RequestType.PRESUSPEND, RequestType.POSTSUSPEND, RequestType.RESUME,
    RequestType.GET_REGION_SIZE, RequestType.GET_RESYNC_WORK, RequestType.GET_SYNC_COUNT,
    RequestType.STATUS_INFO, RequestType.STATUS_TABLE})
_ONE_REGION: Final = frozenset({
    RequestType.IS_CLEAN, RequestType.IN_SYNC, RequestType.IS_REMOTE_RECOVERING})
_REGION_LIST: Final = frozenset({
    RequestType.FLUSH, RequestType.MARK_REGION, RequestType.CLEAR_REGION})
_region_arrays: dict[int, struct.Struct] = {}
_REGION_ARRAYS_CACHED = 4096  # array lengths whose Struct is kept (a CLEAR carries <= 32)


def region_array(n: int) -> struct.Struct:
    """The struct of ``n`` region arguments (``region_t[n]``), cached for small ``n``."""
    st = _region_arrays.get(n)
    if st is None:
        st = struct.Struct(f"={n}{struct_format(U64, '=')}")
        if n <= _REGION_ARRAYS_CACHED:
            _region_arrays[n] = st
    return st


#: ``NLMSG_ALIGN(len)`` is ``(len + NLMSG_ALIGN_ADD) & NLMSG_ALIGN_MASK``.
NLMSG_ALIGN_ADD: Final = NLMSG_ALIGNTO - 1
NLMSG_ALIGN_MASK: Final = ~NLMSG_ALIGN_ADD


def nlmsg_align(n: int) -> int:
    return (n + NLMSG_ALIGN_ADD) & NLMSG_ALIGN_MASK


def decode_datagram(data: bytes) -> list[Event]:
    """Every netlink message in ``data`` as a request event or a :class:`Dropped`."""
    events: list[Event] = []
    off = 0
    end = len(data)
    unpack_nl = NLMSG_HDR.unpack_from
    while off < end:
        if end - off < NLMSG_HDRLEN:
            events.append(Dropped("trailing bytes shorter than nlmsghdr"))
            break
        nl_len, nl_type, _flags, _nseq, _pid = unpack_nl(data, off)
        if nl_len < NLMSG_HDRLEN or nl_len > end - off:
            events.append(Dropped(f"bad nlmsg_len {nl_len}"))
            break
        events.append(_decode_message(data, off, nl_len, nl_type))
        off += nlmsg_align(nl_len)
    return events


def _decode_message(data: bytes, off: int, nl_len: int, nl_type: int) -> Event:
    if nl_type != NLMSG_DONE:
        return Dropped(f"nlmsg_type {nl_type} is not NLMSG_DONE")
    if nl_len < HEADERS_LEN:
        return Dropped(f"message of {nl_len} bytes cannot hold the headers")
    (_l, _t, _f, _s, _p, idx, val, _cseq, _ack, cn_len, _cflags,
     luid, raw_uuid, _pad, version, _err, seq, rtype, data_size) = HEADERS.unpack_from(data, off)
    if idx != CN_IDX_DM or val != CN_VAL_DM_USERSPACE_LOG:
        return Dropped(f"connector id {idx}:{val} is not {CN_IDX_DM}:{CN_VAL_DM_USERSPACE_LOG}")
    if NLMSG_HDRLEN + CN_HDRLEN + cn_len > nl_len or cn_len < ULOG_HDRLEN:
        return Dropped(f"cn_msg.len {cn_len} does not fit nlmsg_len {nl_len}")
    nul = raw_uuid.find(b"\0")
    uuid = raw_uuid if nul < 0 else raw_uuid[:nul]
    rtype &= REQUEST_MASK
    head = (seq, luid, uuid, version, rtype)
    if data_size > cn_len - ULOG_HDRLEN:
        return MalformedRequest(*head, reason=f"data_size {data_size} exceeds cn_msg.len {cn_len}")
    p = off + HEADERS_LEN
    if rtype in _REGION_LIST:
        if data_size % REGION_ARG_SIZE:
            return MalformedRequest(*head, reason=f"region list of {data_size} bytes")
        n = data_size // REGION_ARG_SIZE
        return RegionList(*head, region_array(n).unpack_from(data, p) if n else ())
    if rtype in _ONE_REGION:
        if data_size != REGION_ARG_SIZE:
            return MalformedRequest(*head, reason=f"region argument of {data_size} bytes")
        return OneRegion(*head, U64_S.unpack_from(data, p)[0])
    if rtype in _NO_PAYLOAD:
        return NoPayload(*head)
    if rtype == RequestType.CTR:
        raw = bytes(data[p:p + data_size])
        reconnect = raw.endswith(b"\0")
        nul = raw.find(b"\0")
        if nul >= 0:
            raw = raw[:nul]
        if not raw:
            return MalformedRequest(*head, reason="empty constructor string")
        return Ctr(*head, raw.decode("ascii", "replace"), reconnect)
    if rtype == RequestType.SET_REGION_SYNC:
        if data_size != REGION_SYNC.size:
            return MalformedRequest(*head, reason=f"set_region_sync of {data_size} bytes")
        region, in_sync = REGION_SYNC.unpack_from(data, p)
        return SetRegionSync(*head, region, bool(in_sync))
    return UnknownRequest(*head, bytes(data[p:p + data_size]))


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------


class ReplyTooLarge(ValueError):
    """A reply payload larger than the kernel's buffer for that request type."""


def reply_capacity(req: Request) -> int:
    if isinstance(req, Ctr) and req.reconnect:
        return 0
    return REPLY_CAPACITY.get(req.request_type, 0)


#: Zero bytes padding a message of length ``n`` to NLMSG_ALIGNTO: ``_PAD[n & NLMSG_ALIGN_ADD]``.
_PAD = tuple(bytes(-n % NLMSG_ALIGNTO) for n in range(NLMSG_ALIGNTO))


def encode_reply(req: Request, error: int = 0, payload: bytes = b"", portid: int = 0) -> bytes:
    """The reply to ``req``: ``error`` is 0 or a negative errno.

    Raises :class:`ReplyTooLarge` if ``payload`` exceeds the kernel's buffer.
    """
    n = len(payload)
    if n and n > reply_capacity(req):
        raise ReplyTooLarge(
            f"{n}-byte reply to request type {req.request_type}: capacity {reply_capacity(req)}")
    nl_len = HEADERS_LEN + n
    return HEADERS.pack(
        nl_len, NLMSG_DONE, 0, req.seq, portid,
        CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, req.seq, 0, ULOG_HDRLEN + n, 0,
        req.luid, req.uuid, b"", req.version, error, req.seq, req.request_type, n,
    ) + payload + _PAD[nl_len & NLMSG_ALIGN_ADD]


def encode_error(req: Request, err: int) -> bytes:
    """A reply carrying only ``-err`` (``err`` a positive errno)."""
    return encode_reply(req, -abs(err))


def encode_request(seq: int, luid: int, uuid: bytes, request_type: int, payload: bytes = b"",
                   version: int = DM_ULOG_REQUEST_VERSION) -> bytes:
    """A kernel-style request (for the fake kernel in tests and the forgery check)."""
    n = len(payload)
    nl_len = HEADERS_LEN + n
    return HEADERS.pack(
        nl_len, NLMSG_DONE, 0, seq, 0,
        CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, seq, 0, ULOG_HDRLEN + n, 0,
        luid, uuid, b"", version, 0, seq, request_type, n,
    ) + payload + _PAD[nl_len & NLMSG_ALIGN_ADD]


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply (what the kernel would see): for tests and the fake kernel."""

    seq: int
    error: int
    request_type: int
    luid: int
    uuid: bytes
    data: bytes


def decode_reply(data: bytes) -> Reply:
    (_nl_len, _t, _f, _s, _p, _idx, _val, _cseq, ack, cn_len, _cf,
     luid, raw_uuid, _pad, _v, error, seq, rtype, data_size) = HEADERS.unpack_from(data, 0)
    if cn_len == 0:
        return Reply(_cseq, -ack, 0, 0, b"", b"")
    nul = raw_uuid.find(b"\0")
    return Reply(seq, error, rtype, luid, raw_uuid[:nul] if nul >= 0 else raw_uuid,
                 bytes(data[HEADERS_LEN:HEADERS_LEN + data_size]))


def encode_u64(value: int) -> bytes:
    return U64_S.pack(value)


def encode_s64(value: int) -> bytes:
    return S64_S.pack(value)


def encode_resync_work(found: bool, region: int) -> bytes:
    return RESYNC_WORK.pack(1 if found else 0, region)


def encode_remote_recovering(is_recovering: bool, in_sync_hint: int) -> bytes:
    return REMOTE_RECOVERING.pack(1 if is_recovering else 0, in_sync_hint)


def encode_status(text: str) -> bytes:
    """A status string, NUL-terminated (dm's retrieve_status runs strlen over it)."""
    raw = text.encode("ascii", "replace")[: STATUS_CAPACITY - 1]
    return raw + b"\0"


EINVAL: Final = errno.EINVAL
ESRCH: Final = errno.ESRCH
