"""The NBD client store against our own server (in-process, unix socket and TCP)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from dmrepl.nbd import Export, MemoryBackend, NbdServer
from dmrepl.nbd import _proto as p
from dmrepl.nbd.client import NbdStore, is_nbd_url


def test_roundtrip_unix_and_tcp(tmp_path: Path) -> None:
    backend = MemoryBackend(1 << 20)
    with NbdServer(str(tmp_path / "s")) as srv, NbdServer(("127.0.0.1", 0)) as tcp:
        srv.add_export(Export("d", backend))
        tcp.add_export(Export("d", backend))
        host, port = tcp.address  # type: ignore[misc]
        for url in (f"nbd+unix:///d?socket={tmp_path / 's'}", f"nbd://{host}:{port}/d"):
            assert is_nbd_url(url)
            store = NbdStore(url)
            assert store.size == 1 << 20
            data = os.urandom(65536)
            threads = [threading.Thread(target=store.pwrite, args=(i * 65536, data))
                       for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            store.pwrite(0, b"x" * 10, fua=True)
            store.flush()
            assert store.pread(0, 10) == b"x" * 10
            assert store.pread(65536, 65536) == data
            big = bytearray(os.urandom(512 << 10))  # header and payload sent apart
            store.pwrite(512 << 10, memoryview(big)[:256 << 10])
            store.pwrite(768 << 10, memoryview(big)[256 << 10:])
            assert store.pread(512 << 10, 512 << 10) == big
            assert store.pread(0, 10) == b"x" * 10  # the framing held
            store.close()


def test_unknown_export_and_errors(tmp_path: Path) -> None:
    with NbdServer(str(tmp_path / "s")) as srv:
        srv.add_export(Export("d", MemoryBackend(4096)))
        with pytest.raises(OSError) as exc:
            NbdStore(f"nbd+unix:///nope?socket={tmp_path / 's'}")
        assert exc.value.errno == errno.ENOENT
        store = NbdStore(f"nbd+unix:///d?socket={tmp_path / 's'}")
        with pytest.raises(OSError) as exc:
            store.pwrite(4000, b"y" * 200)
        assert exc.value.errno == errno.ENOSPC
        assert store.pread(0, 4) == bytes(4)      # the connection survived the error
        store.close()


def test_silent_peer_times_out_then_reconnects(tmp_path: Path) -> None:
    """A peer that stops answering (a cut link) fails requests with ETIMEDOUT."""
    backend = MemoryBackend(4096)
    with NbdServer(str(tmp_path / "s")) as srv:
        export = Export("d", backend)
        srv.add_export(export)
        store = NbdStore(f"nbd+unix:///d?socket={tmp_path / 's'}", timeout=0.5)
        export.suspend()                       # requests now hang in the server
        with pytest.raises(OSError) as exc:
            store.pwrite(0, b"z")
        assert exc.value.errno == errno.ETIMEDOUT
        export.resume()
        store.pwrite(0, b"q")                  # a new connection
        assert store.pread(0, 1) == b"q"
        store.close()


def test_unreachable_site() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(OSError):
        NbdStore(f"nbd://127.0.0.1:{port}/d")


def test_peer_that_stops_reading_fails_writes_with_etimedout(tmp_path: Path) -> None:
    """A cut link: the peer neither reads nor answers; sendall must not block forever."""
    path = str(tmp_path / "dead.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    conns: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conns.append(conn)
        conn.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE))
        conn.recv(4)
        head = conn.recv(16)
        conn.recv(struct.unpack(">QII", head)[2])
        info = struct.pack(">HQH", 0, 64 << 20, 1)
        conn.sendall(struct.pack(">QIII", p.REPLY_MAGIC_OPT, p.Opt.GO, p.Rep.INFO, len(info))
                     + info + struct.pack(">QIII", p.REPLY_MAGIC_OPT, p.Opt.GO, p.Rep.ACK, 0))
        # ... and never read again

    t = threading.Thread(target=serve)
    t.start()
    store = NbdStore(f"nbd+unix:///x?socket={path}", timeout=0.5)
    t.join()
    start = time.monotonic()
    with pytest.raises(OSError) as exc:
        store.pwrite(0, bytes(16 << 20))
    assert exc.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - start < 10
    store.close()
    for c in conns:
        c.close()
    listener.close()


def test_writes_in_flight_from_one_thread(tmp_path: Path) -> None:
    """start_writes sends and returns; the waits collect the replies afterwards (a
    copier keeps an epoch in flight from its own thread); a refused write fails
    its own wait only."""
    backend = MemoryBackend(1 << 20)
    with NbdServer(str(tmp_path / "s")) as srv:
        srv.add_export(Export("d", backend))
        store = NbdStore(f"nbd+unix:///d?socket={tmp_path / 's'}")
        try:
            blocks = [os.urandom(4096) for _ in range(32)]
            waits = store.start_writes([(i * 8192, b) for i, b in enumerate(blocks)])
            (bad,) = store.start_writes([((1 << 20) - 512, b"z" * 4096)])   # beyond the end
            big = os.urandom(512 << 10)
            waits += store.start_writes([(0x40000, big)])
            for w in waits:
                w()
            with pytest.raises(OSError) as exc:
                bad()
            assert exc.value.errno == errno.ENOSPC
            for i, b in enumerate(blocks):
                assert store.pread(i * 8192, 4096) == b
            assert store.pread(0x40000, 512 << 10) == big
        finally:
            store.close()
