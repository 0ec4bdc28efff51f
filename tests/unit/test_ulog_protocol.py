"""The dm-log-userspace codec: layouts against the C headers, decode/encode, limits."""

from __future__ import annotations

import errno
import struct

import pytest

from cdefs import connector, verify_against_headers
from ulogd import protocol as p
from ulogd.protocol import RequestType as RT


@pytest.fixture(scope="module")
def real_ffi():  # type: ignore[no-untyped-def]
    return verify_against_headers(connector.CDEF, connector.INCLUDES,
                                  module_name="_ulog_connector_check")


def test_cdefs_match_system_headers(real_ffi) -> None:  # type: ignore[no-untyped-def]
    ours = connector.ffi
    for name in ("struct nlmsghdr", "struct cn_msg", "struct dm_ulog_request", "struct cb_id"):
        assert ours.sizeof(name) == real_ffi.sizeof(name), name
    for field in ("luid", "uuid", "padding", "version", "error", "seq", "request_type",
                  "data_size", "data"):
        assert ours.offsetof("struct dm_ulog_request", field) == \
            real_ffi.offsetof("struct dm_ulog_request", field), field
    for field in ("id", "seq", "ack", "len", "flags", "data"):
        assert ours.offsetof("struct cn_msg", field) == real_ffi.offsetof("struct cn_msg", field)
    assert real_ffi.sizeof("struct dm_ulog_request") == 160


def test_construct_layouts_match_cdefs() -> None:
    ffi = connector.ffi
    assert p.NlMsgHdr.sizeof() == ffi.sizeof("struct nlmsghdr") == p.NLMSG_HDR.size
    assert p.CnMsg.sizeof() == ffi.sizeof("struct cn_msg") == p.CN_MSG.size
    assert p.DmUlogRequest.sizeof() == ffi.sizeof("struct dm_ulog_request") == p.ULOG_REQUEST.size
    assert p.HEADERS.size == 196
    # offsets of the construct fields equal the C offsets
    off = 0
    for sc in p.DmUlogRequest.subcons:
        assert off == ffi.offsetof("struct dm_ulog_request", sc.name), sc.name
        off += sc.sizeof()


def test_fast_path_agrees_with_construct() -> None:
    data = p.encode_request(77, 0xFFFF8880DEADBEEF, b"MY-UUID", RT.IN_SYNC, p.encode_u64(5))
    nl = p.NlMsgHdr.parse(data[:16])
    cn = p.CnMsg.parse(data[16:36])
    rq = p.DmUlogRequest.parse(data[36:196])
    assert nl.nlmsg_len == 204 and nl.nlmsg_type == 3 and nl.nlmsg_pid == 0
    assert (cn.idx, cn.val, cn.seq, cn.len) == (7, 1, 77, 168)
    assert rq.luid == 0xFFFF8880DEADBEEF and rq.uuid.rstrip(b"\0") == b"MY-UUID"
    assert (rq.seq, rq.request_type, rq.data_size, rq.version) == (77, 8, 8, 3)
    # and the reply, built by the fast path, parses with construct
    req = p.decode_datagram(data)[0]
    reply = p.encode_reply(req, 0, p.encode_s64(1), portid=1234)
    rq2 = p.DmUlogRequest.parse(reply[36:196])
    assert (rq2.seq, rq2.error, rq2.data_size, rq2.luid) == (77, 0, 8, rq.luid)
    assert p.CnMsg.parse(reply[16:36]).len == 168
    assert p.NlMsgHdr.parse(reply[:16]).nlmsg_pid == 1234


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_request_type_decodes(version: int) -> None:
    u, luid = b"U1", 42
    cases = {
        RT.CTR: (b"2048 core 64", p.Ctr),
        RT.DTR: (b"", p.NoPayload), RT.PRESUSPEND: (b"", p.NoPayload),
        RT.POSTSUSPEND: (b"", p.NoPayload), RT.RESUME: (b"", p.NoPayload),
        RT.GET_REGION_SIZE: (b"", p.NoPayload),
        RT.IS_CLEAN: (p.encode_u64(3), p.OneRegion), RT.IN_SYNC: (p.encode_u64(3), p.OneRegion),
        RT.FLUSH: (b"", p.RegionList), RT.MARK_REGION: (struct.pack("=2Q", 1, 2), p.RegionList),
        RT.CLEAR_REGION: (struct.pack("=Q", 9), p.RegionList),
        RT.GET_RESYNC_WORK: (b"", p.NoPayload),
        RT.SET_REGION_SYNC: (struct.pack("=Qq", 4, 1), p.SetRegionSync),
        RT.GET_SYNC_COUNT: (b"", p.NoPayload), RT.STATUS_INFO: (b"", p.NoPayload),
        RT.STATUS_TABLE: (b"", p.NoPayload),
        RT.IS_REMOTE_RECOVERING: (p.encode_u64(3), p.OneRegion),
    }
    assert len(cases) == 17
    for rtype, (payload, cls) in cases.items():
        [ev] = p.decode_datagram(p.encode_request(1, luid, u, rtype, payload, version))
        assert type(ev) is cls, rtype
        assert ev.key == (u, luid) and ev.version == version and ev.request_type == rtype


def test_payload_fields() -> None:
    def one(rtype: int, payload: bytes) -> p.Event:
        return p.decode_datagram(p.encode_request(9, 1, b"u", rtype, payload))[0]

    mark = one(RT.MARK_REGION, struct.pack("=32Q", *range(32)))
    assert isinstance(mark, p.RegionList) and mark.regions == tuple(range(32))
    fl = one(RT.FLUSH, struct.pack("=3Q", 7, 8, 9))  # integrated flush carries marks
    assert isinstance(fl, p.RegionList) and fl.regions == (7, 8, 9)
    srs = one(RT.SET_REGION_SYNC, struct.pack("=Qq", 11, 0))
    assert isinstance(srs, p.SetRegionSync) and (srs.region, srs.in_sync) == (11, False)
    first = one(RT.CTR, b"2048 clustered-disk /dev/loop2 64")
    assert isinstance(first, p.Ctr) and not first.reconnect
    again = one(RT.CTR, b"2048 clustered-disk /dev/loop2 64\0")
    assert isinstance(again, p.Ctr) and again.reconnect and again.args == first.args
    # upper bits of request_type are reserved: masked
    [ev] = p.decode_datagram(p.encode_request(1, 1, b"u", 0x1000 | RT.IN_SYNC, p.encode_u64(0)))
    assert isinstance(ev, p.OneRegion) and ev.request_type == RT.IN_SYNC


def test_several_messages_in_one_datagram() -> None:
    a = p.encode_request(1, 1, b"a", RT.IN_SYNC, p.encode_u64(1))
    b = p.encode_request(2, 2, b"bb", RT.CTR, b"100 core 2")  # unaligned length: padded
    assert len(b) % 4 == 0
    evs = p.decode_datagram(a + b + a)
    assert [e.seq for e in evs if isinstance(e, p.Request)] == [1, 2, 1]


def test_malformed_and_dropped() -> None:
    good = p.encode_request(5, 1, b"u", RT.IN_SYNC, p.encode_u64(1))
    assert isinstance(p.decode_datagram(good[:10])[0], p.Dropped)
    assert isinstance(p.decode_datagram(good[:100])[0], p.Dropped)
    bad_type = bytearray(good)
    struct.pack_into("=H", bad_type, 4, 2)  # NLMSG_ERROR
    assert isinstance(p.decode_datagram(bytes(bad_type))[0], p.Dropped)
    bad_id = bytearray(good)
    struct.pack_into("=I", bad_id, 16, 1)  # cn_proc, not dm
    assert isinstance(p.decode_datagram(bytes(bad_id))[0], p.Dropped)
    short = p.encode_request(5, 1, b"u", RT.IN_SYNC, b"\1\2\3")
    ev = p.decode_datagram(short)[0]
    assert isinstance(ev, p.MalformedRequest) and ev.seq == 5
    odd = p.encode_request(5, 1, b"u", RT.MARK_REGION, b"\0" * 12)
    assert isinstance(p.decode_datagram(odd)[0], p.MalformedRequest)
    lying = bytearray(good)
    struct.pack_into("=I", lying, 36 + 156, 4000)  # data_size beyond the message
    assert isinstance(p.decode_datagram(bytes(lying))[0], p.MalformedRequest)
    unknown = p.decode_datagram(p.encode_request(5, 1, b"u", 99, b"xyz"))[0]
    assert isinstance(unknown, p.UnknownRequest) and unknown.data == b"xyz"
    zero = p.decode_datagram(p.encode_request(5, 1, b"u", 0))[0]
    assert isinstance(zero, p.UnknownRequest)


def test_reply_capacity_enforced() -> None:
    def req(rtype: int, payload: bytes = b"") -> p.Request:
        ev = p.decode_datagram(p.encode_request(3, 1, b"u", rtype, payload))[0]
        assert isinstance(ev, p.Request)
        return ev

    ctr = req(RT.CTR, b"100 disk /dev/x 2")
    assert p.decode_reply(p.encode_reply(ctr, 0, b"/dev/x\0")).data == b"/dev/x\0"
    with pytest.raises(p.ReplyTooLarge):
        p.encode_reply(ctr, 0, b"x" * 128 + b"\0")
    reconnect = req(RT.CTR, b"100 disk /dev/x 2\0")
    with pytest.raises(p.ReplyTooLarge):
        p.encode_reply(reconnect, 0, b"/dev/x\0")
    for rtype in (RT.FLUSH, RT.MARK_REGION, RT.RESUME, RT.DTR, RT.CLEAR_REGION):
        with pytest.raises(p.ReplyTooLarge):
            p.encode_reply(req(rtype), 0, b"\0")
    with pytest.raises(p.ReplyTooLarge):
        p.encode_reply(req(RT.IN_SYNC, p.encode_u64(0)), 0, b"\0" * 16)
    assert len(p.encode_status("x" * 10000)) == p.STATUS_CAPACITY


def test_error_reply_and_ack() -> None:
    ev = p.decode_datagram(p.encode_request(3, 1, b"u", RT.RESUME))[0]
    assert isinstance(ev, p.Request)
    r = p.decode_reply(p.encode_error(ev, errno.ESRCH))
    assert (r.seq, r.error, r.data) == (3, -errno.ESRCH, b"")
