"""The NBD client's bytes on the wire are the declarations' build (``_proto``): the
client and the server share each wire struct, so neither can drift alone."""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path

import pytest

from dmrepl.nbd import _proto as p
from dmrepl.nbd.client import NbdStore

SIZE = 1 << 20


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        assert chunk, "client closed early"
        buf += chunk
    return buf


def handshake(conn: socket.socket, seen: dict[str, bytes]) -> None:
    """The server's side of a GO handshake (what the client sent: in ``seen``)."""
    flags = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    conn.sendall(p.GREETING.build({"flags": flags}))
    seen["client_flags"] = recv_exact(conn, p.CLIENT_FLAGS.sizeof())
    seen["option"] = recv_exact(conn, p.OPTION.sizeof())
    length = p.OPTION.parse(seen["option"]).length
    seen["go"] = recv_exact(conn, length)
    for rep, payload in (
            (p.Rep.INFO, p.INFO_EXPORT.build(
                {"size": SIZE, "flags": p.TRANSMISSION_FLAGS})),
            (p.Rep.INFO, p.INFO_BLOCK_SIZE.build(
                {"minimum": 4096, "preferred": 4096, "maximum": 1 << 20})),
            (p.Rep.ACK, b"")):
        conn.sendall(p.OPTION_REPLY.build({"option": p.Opt.GO, "reply": rep,
                                           "length": len(payload)}) + payload)


def test_replies_that_arrive_together_complete_each_their_own_request(
        tmp_path: Path) -> None:
    """A server that answers a whole epoch in one send, out of order, with a read's
    data between the headers and one error: every wait gets its own outcome."""
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    n_writes, failing = 19, 7     # the 8th write is refused

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            handshake(conn, {})
            got = []
            while len(got) < n_writes + 1:
                req = p.REQUEST.parse(recv_exact(conn, p.REQUEST.sizeof()))
                if req.type == p.Cmd.WRITE:
                    recv_exact(conn, req.length)
                got.append(req)
            replies = []
            for i, req in reversed(list(enumerate(got))):
                error = p.ERRORS[errno.EIO] if i == failing else 0
                data = bytes([req.offset // 4096 % 251]) * req.length \
                    if req.type == p.Cmd.READ else b""
                replies.append(p.SIMPLE_REPLY.build({"error": error, "handle": req.handle})
                               + data)
            conn.sendall(b"".join(replies))
            while conn.recv(4096):     # until the client's disconnect
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    store = NbdStore(f"nbd+unix:///disk?socket={path}", timeout=5)
    try:
        waits = store.start_writes([(i * 4096, b"w" * 4096) for i in range(n_writes)])
        assert store.pread(5 * 4096, 4096) == bytes([5]) * 4096
        for i, wait in enumerate(waits):
            if i == failing:
                with pytest.raises(OSError) as exc:
                    wait()
                assert exc.value.errno == errno.EIO
            else:
                wait()
    finally:
        store.close()
        listener.close()


def test_client_headers_equal_the_declarations_build(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    seen: dict[str, bytes] = {}
    requests: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            handshake(conn, seen)
            while True:
                head = recv_exact(conn, p.REQUEST.sizeof())
                requests.append(head)
                req = p.REQUEST.parse(head)
                if req.type == p.Cmd.DISC:
                    return
                if req.type == p.Cmd.WRITE:
                    recv_exact(conn, req.length)
                reply = p.SIMPLE_REPLY.build({"error": 0, "handle": req.handle})
                data = bytes(req.length) if req.type == p.Cmd.READ else b""
                conn.sendall(reply + data)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    store = NbdStore(f"nbd+unix:///disk?socket={path}", timeout=5)
    assert (store.size, store.logical_block_size) == (SIZE, 4096)
    assert store.pread(4096, 512) == bytes(512)
    store.pwrite(8192, b"w" * 512)
    store.pwritev_durable(0, [b"d" * 512])
    store.flush()
    store.trim(0, 4096)
    store.close()
    server.join(10)
    listener.close()

    assert seen["client_flags"] == p.CLIENT_FLAGS.build(
        {"flags": p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES})
    assert seen["option"] == p.OPTION.build(
        {"magic": p.IHAVEOPT, "option": p.Opt.GO, "length": len(seen["go"])})
    assert seen["go"] == p.OPTION_GO_DATA.build({"name": "disk", "requests": []})
    expected = [(p.Cmd.READ, 0, 4096, 512), (p.Cmd.WRITE, 0, 8192, 512),
                (p.Cmd.WRITE, p.CMD_FLAG_FUA, 0, 512), (p.Cmd.FLUSH, 0, 0, 0),
                (p.Cmd.TRIM, 0, 0, 4096), (p.Cmd.DISC, 0, 0, 0)]
    assert len(requests) == len(expected)
    for raw, (cmd, flags, offset, length) in zip(requests, expected, strict=True):
        handle = p.REQUEST.parse(raw).handle
        assert raw == p.REQUEST.build({"magic": p.REQUEST_MAGIC, "flags": flags, "type": cmd,
                                       "handle": handle, "offset": offset,
                                       "length": length})
