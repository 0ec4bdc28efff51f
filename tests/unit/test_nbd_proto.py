"""The sans-I/O NBD server codec, driven with hand-built client bytes."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl.nbd import _proto as p

EXPORTS = {"disk": p.ExportInfo(1 << 20), "ro": p.ExportInfo(4096, read_only=True)}


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


def request(cmd: int, handle: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def parse_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while raw:
        magic, opt, rep, length = struct.unpack(">QIII", raw[:20])
        assert magic == p.REPLY_MAGIC_OPT
        out.append((opt, rep, raw[20:20 + length]))
        raw = raw[20 + length:]
    return out


def events(conn: p.ServerConnection) -> list[object]:
    out: list[object] = []
    if conn.state is p.State.CLOSED:
        return out
    while (ev := conn.next_event()) is not p.NEED_DATA:
        out.append(ev)
        if isinstance(ev, p.Disconnect):
            break
    return out


def new_conn(flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> p.ServerConnection:
    conn = p.ServerConnection(EXPORTS)
    greeting = conn.data_to_send()
    assert greeting == struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT,
                                   p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
    conn.receive_data(struct.pack(">I", flags))
    return conn


def test_go_known_export_starts_transmission() -> None:
    conn = new_conn()
    conn.receive_data(option(p.Opt.GO, go_data("disk")))
    assert events(conn) == [p.ExportSelected("disk")]
    replies = parse_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [p.Rep.INFO, p.Rep.INFO, p.Rep.ACK]
    info, size, flags = struct.unpack(">HQH", replies[0][2])
    assert (info, size) == (p.Info.EXPORT, 1 << 20)
    assert flags & p.FLAG_SEND_FLUSH and flags & p.FLAG_SEND_FUA and flags & p.FLAG_SEND_TRIM
    assert conn.state is p.State.TRANSMISSION


def test_go_unknown_export_is_an_error_reply_not_a_disconnect() -> None:
    conn = new_conn()
    conn.receive_data(option(p.Opt.GO, go_data("nope")))
    assert events(conn) == []
    [(opt, rep, text)] = parse_replies(conn.data_to_send())
    assert (opt, rep) == (p.Opt.GO, p.Rep.ERR_UNKNOWN) and b"nope" in text
    conn.receive_data(option(p.Opt.INFO, go_data("ro")))
    assert events(conn) == []
    assert parse_replies(conn.data_to_send())[-1][1] == p.Rep.ACK
    assert conn.state is p.State.OPTIONS


def test_list_and_unsupported_options() -> None:
    conn = new_conn()
    conn.receive_data(option(p.Opt.LIST) + option(p.Opt.STRUCTURED_REPLY) + option(p.Opt.STARTTLS)
                      + option(p.Opt.ABORT))
    assert events(conn) == [p.Disconnect(clean=True)]
    replies = parse_replies(conn.data_to_send())
    names = [r[2][4:].decode() for r in replies if r[1] == p.Rep.SERVER]
    assert names == ["disk", "ro"]
    assert [r[1] for r in replies[2:]] == [p.Rep.ACK, p.Rep.ERR_UNSUP, p.Rep.ERR_UNSUP,
                                           p.Rep.ACK]


def test_export_name_old_style_with_and_without_zeroes() -> None:
    for flags, pad in ((p.FLAG_C_FIXED_NEWSTYLE, 124), (p.FLAG_C_FIXED_NEWSTYLE
                                                         | p.FLAG_C_NO_ZEROES, 0)):
        conn = new_conn(flags)
        conn.receive_data(option(p.Opt.EXPORT_NAME, b"disk"))
        assert events(conn) == [p.ExportSelected("disk")]
        out = conn.data_to_send()
        assert len(out) == 10 + pad and struct.unpack(">Q", out[:8])[0] == 1 << 20


def test_export_name_unknown_closes() -> None:
    conn = new_conn()
    conn.receive_data(option(p.Opt.EXPORT_NAME, b"nope"))
    with pytest.raises(p.RemoteProtocolError, match="nope"):
        conn.next_event()


@pytest.mark.parametrize("raw,match", [
    (struct.pack(">I", 0), "fixed newstyle"),
    (struct.pack(">I", 0x80000001), "unknown client flags"),
])
def test_bad_client_flags(raw: bytes, match: str) -> None:
    conn = p.ServerConnection(EXPORTS)
    conn.receive_data(raw)
    with pytest.raises(p.RemoteProtocolError, match=match):
        conn.next_event()


def test_bad_option_magic_and_oversized_option() -> None:
    conn = new_conn()
    conn.receive_data(b"GARBAGE!" + bytes(8))
    with pytest.raises(p.RemoteProtocolError, match="option magic"):
        conn.next_event()
    conn = new_conn()
    conn.receive_data(struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, 1 << 30))
    with pytest.raises(p.RemoteProtocolError, match="too long"):
        conn.next_event()


def transmitting() -> p.ServerConnection:
    conn = new_conn()
    conn.receive_data(option(p.Opt.GO, go_data("disk")))
    events(conn)
    conn.data_to_send()
    return conn


STREAM = (request(p.Cmd.WRITE, 7, 4096, 5, p.CMD_FLAG_FUA, b"hello")
          + request(p.Cmd.READ, 8, 0, 512) + request(p.Cmd.FLUSH, 9)
          + request(p.Cmd.TRIM, 10, 0, 4096) + request(p.Cmd.DISC, 11))
EXPECTED = [p.Request(p.Cmd.WRITE, p.CMD_FLAG_FUA, 7, 4096, 5, b"hello"),
            p.Request(p.Cmd.READ, 0, 8, 0, 512), p.Request(p.Cmd.FLUSH, 0, 9, 0, 0),
            p.Request(p.Cmd.TRIM, 0, 10, 0, 4096), p.Disconnect(clean=True)]


def test_requests_whole_buffer() -> None:
    conn = transmitting()
    conn.receive_data(STREAM)
    got = events(conn)
    assert got == EXPECTED
    assert isinstance(got[0], p.Request) and got[0].fua


def test_requests_one_byte_at_a_time() -> None:
    conn = transmitting()
    got: list[object] = []
    for i in range(len(STREAM)):
        conn.receive_data(STREAM[i:i + 1])
        got += events(conn)
    assert got == EXPECTED


def batched_events(conn: p.ServerConnection, limit: int = 3) -> list[object]:
    """As :func:`events`, through the batch parser first (as the server reads)."""
    out: list[object] = []
    while conn.state is not p.State.CLOSED:
        batch = conn.requests(limit)
        assert len(batch) <= limit
        out += batch
        if batch:
            continue
        ev = conn.next_event()
        if ev is p.NEED_DATA:
            break
        out.append(ev)
    return out


def test_requests_in_batches_whole_buffer() -> None:
    conn = transmitting()
    conn.receive_data(STREAM)
    assert batched_events(conn) == EXPECTED


def test_a_batch_stops_before_a_malformed_request() -> None:
    for bad, match in ((b"\xde\xad\xbe\xef" + bytes(24), "request magic"),
                       (request(p.Cmd.WRITE, 2, 0, p.MAX_REQUEST + 1), "exceeds")):
        conn = transmitting()
        conn.receive_data(request(p.Cmd.FLUSH, 1) + bad)
        assert conn.requests(64) == [p.Request(p.Cmd.FLUSH, 0, 1, 0, 0)]
        assert conn.requests(64) == []
        with pytest.raises(p.RemoteProtocolError, match=match):
            conn.next_event()


@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), max_size=40),
       st.integers(min_value=0, max_value=4))
def test_requests_any_fragmentation(cuts: list[int], limit: int) -> None:
    """``limit`` 0: one event at a time (``next_event``); else through the batch
    parser, ``limit`` requests at most per batch (as the server reads)."""
    conn = transmitting()

    def parse() -> list[object]:
        return events(conn) if not limit else batched_events(conn, limit)
    got: list[object] = []
    pos = 0
    for n in cuts:
        conn.receive_data(STREAM[pos:pos + n])
        pos += n
        got += parse()
    conn.receive_data(STREAM[pos:])
    got += parse()
    assert got == EXPECTED


def test_requests_with_trailing_bytes_wait_for_more() -> None:
    conn = transmitting()
    conn.receive_data(request(p.Cmd.FLUSH, 1) + request(p.Cmd.READ, 2)[:10])
    assert events(conn) == [p.Request(p.Cmd.FLUSH, 0, 1, 0, 0)]
    assert conn.next_event() is p.NEED_DATA


def test_eof_mid_request_is_a_protocol_error_and_clean_eof_is_not() -> None:
    conn = transmitting()
    conn.receive_data(request(p.Cmd.READ, 2)[:10])
    conn.receive_data(b"")
    with pytest.raises(p.RemoteProtocolError, match="middle"):
        conn.next_event()
    conn = transmitting()
    conn.receive_data(b"")
    assert conn.next_event() == p.Disconnect(clean=True)


def test_bad_request_magic_and_huge_write() -> None:
    conn = transmitting()
    conn.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(p.RemoteProtocolError, match="request magic"):
        conn.next_event()
    conn = transmitting()
    conn.receive_data(request(p.Cmd.WRITE, 1, 0, p.MAX_REQUEST + 1))
    with pytest.raises(p.RemoteProtocolError, match="exceeds"):
        conn.next_event()


def test_check_and_reply() -> None:
    conn = transmitting()
    ok = p.Request(p.Cmd.READ, 0, 1, 0, 512)
    assert conn.check(ok) == 0
    assert conn.check(p.Request(p.Cmd.READ, 0, 1, (1 << 20) - 1, 2)) == errno.EINVAL
    assert conn.check(p.Request(p.Cmd.WRITE, 0, 1, 1 << 20, 1)) == errno.ENOSPC
    assert conn.check(p.Request(99, 0, 1, 0, 0)) == errno.EINVAL
    assert conn.reply(5, 0, b"abc") == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 5) + b"abc"
    # errors never carry data; unknown host errnos become EIO on the wire
    assert conn.reply(5, errno.EINVAL, b"abc") == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC,
                                                              22, 5)
    assert conn.reply(5, errno.EBADF)[4:8] == struct.pack(">I", 5)


def test_reply_before_transmission_is_a_local_error() -> None:
    with pytest.raises(p.LocalProtocolError):
        new_conn().reply(1)


def test_hot_path_structs_match_their_construct_declarations() -> None:
    fields = {"magic": p.REQUEST_MAGIC, "flags": 1, "type": 2, "handle": 3, "offset": 4,
              "length": 5}
    assert p.REQUEST_S.size == p.REQUEST.sizeof() == p.REQUEST_SIZE
    assert p.REQUEST_S.pack(*fields.values()) == p.REQUEST.build(fields)
    assert p.SIMPLE_REPLY_S.size == p.SIMPLE_REPLY.sizeof()
    assert p.SIMPLE_REPLY_S.pack(p.SIMPLE_REPLY_MAGIC, 22, 7) == \
        p.SIMPLE_REPLY.build({"error": 22, "handle": 7})


def test_bytes_wanted_reads_header_then_payload_uncopied() -> None:
    conn = transmitting()
    assert conn.bytes_wanted() == p.REQUEST_SIZE
    head = request(p.Cmd.WRITE, 9, 4096, 8192)
    conn.receive_data(head[:10])
    assert conn.next_event() is p.NEED_DATA and conn.bytes_wanted() == p.REQUEST_SIZE - 10
    conn.receive_data(head[10:])
    assert conn.next_event() is p.NEED_DATA and conn.bytes_wanted() == 8192
    payload = bytes(range(256)) * 32
    conn.receive_data(payload)
    ev = conn.next_event()
    assert ev == p.Request(p.Cmd.WRITE, 0, 9, 4096, 8192, payload)
    assert isinstance(ev, p.Request) and ev.data is payload      # handed over as received
    assert conn.bytes_wanted() == p.REQUEST_SIZE
    # a payload that comes in pieces is assembled as before
    conn.receive_data(head + payload[:100])
    assert conn.next_event() is p.NEED_DATA and conn.bytes_wanted() == 8192 - 100
    conn.receive_data(payload[100:] + request(p.Cmd.FLUSH, 10))
    assert events(conn) == [p.Request(p.Cmd.WRITE, 0, 9, 4096, 8192, payload),
                            p.Request(p.Cmd.FLUSH, 0, 10, 0, 0)]
    # EOF after a write header, before its payload: mid-message
    conn.receive_data(head)
    conn.receive_data(b"")
    with pytest.raises(p.RemoteProtocolError, match="middle"):
        conn.next_event()
