"""Our NBD server against real clients: qemu-img, nbdinfo, nbdcopy (no kernel needed)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.nbd import Export, FileBackend, MemoryBackend, NbdServer
from dmrepl.nbd import _proto as p

SIZE = 16 << 20
needs = pytest.mark.skipif(not all(shutil.which(t) for t in ("qemu-img", "nbdinfo", "nbdcopy")),
                           reason="qemu-img/nbdinfo/nbdcopy not installed")
pytestmark = needs


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[NbdServer, str, MemoryBackend]]:
    sock = str(tmp_path / "nbd.sock")
    backend = MemoryBackend(SIZE)
    with NbdServer(sock) as srv:
        srv.add_export(Export("disk", backend))
        yield srv, sock, backend


def url(sock: str, name: str = "disk") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_nbdinfo_and_qemu_img_info(server: tuple[NbdServer, str, MemoryBackend]) -> None:
    _, sock, _ = server
    info = sh("nbdinfo", "--json", url(sock))
    assert info.returncode == 0, info.stderr
    assert f'"export-size": {SIZE}' in info.stdout
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert f'"{flag}": true' in info.stdout
    qi = sh("qemu-img", "info", "--output=json", url(sock))
    assert qi.returncode == 0 and f'"virtual-size": {SIZE}' in qi.stdout
    listing = sh("nbdinfo", "--list", f"nbd+unix://?socket={sock}")
    assert 'export="disk"' in listing.stdout


def test_nbdcopy_in_and_qemu_img_convert_out(
        server: tuple[NbdServer, str, MemoryBackend], tmp_path: Path) -> None:
    _, sock, backend = server
    src = tmp_path / "src"
    src.write_bytes(os.urandom(SIZE))
    # many requests in flight on several connections
    cp = sh("nbdcopy", "--requests=16", "--connections=2", "--flush", str(src), url(sock))
    assert cp.returncode == 0, cp.stderr
    assert bytes(backend.data) == src.read_bytes()
    assert backend.flushes >= 1
    out = tmp_path / "out"
    conv = sh("qemu-img", "convert", "-O", "raw", url(sock), str(out))
    assert conv.returncode == 0, conv.stderr
    assert out.read_bytes() == src.read_bytes()


def test_qemu_io_zero_and_discard(server: tuple[NbdServer, str, MemoryBackend]) -> None:
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io not installed")
    _, sock, backend = server
    backend.data[:] = b"\xff" * SIZE
    r = sh("qemu-io", "-f", "raw", "-c", "write -z 4096 8192", "-c", "discard 65536 4096",
           "-c", "write -f -P 0x5a 0 512", "-c", "flush", url(sock))
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    assert backend.data[4096:12288] == bytes(8192)
    assert backend.data[:512] == b"\x5a" * 512 and backend.data[512] == 0xFF


def test_file_backend_roundtrip(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(SIZE))
    src = tmp_path / "src"
    src.write_bytes(os.urandom(SIZE))
    sock = str(tmp_path / "s.sock")
    backend = FileBackend(str(disk))
    with NbdServer(sock) as srv:
        srv.add_export(Export("f", backend))
        assert sh("nbdcopy", str(src), url(sock, "f")).returncode == 0
    backend.close()
    assert disk.read_bytes() == src.read_bytes()


def handshake(sock_path: str, name: str = "disk") -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    assert len(recv_exact(s, 18)) == 18
    s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    s.sendall(struct.pack(">QII", p.IHAVEOPT, p.Opt.EXPORT_NAME, len(name)) + name.encode())
    assert len(recv_exact(s, 10)) == 10
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_bad_input_closes_connection_server_keeps_serving(
        server: tuple[NbdServer, str, MemoryBackend]) -> None:
    _, sock, _ = server
    # garbage instead of client flags
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    recv_exact(s, 18)
    s.sendall(b"\x00\x00\x00\x00" + b"junk" * 10)
    assert s.recv(100) == b""          # closed by the server
    s.close()
    # bad request magic mid-transmission
    s = handshake(sock)
    s.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert s.recv(100) == b""
    s.close()
    # out-of-range read: an error reply, the connection stays usable
    s = handshake(sock)
    s.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, 42, SIZE, 512))
    magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert (magic, err, handle) == (p.SIMPLE_REPLY_MAGIC, 22, 42)
    s.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, 43, 0, 8))
    assert struct.unpack(">IIQ", recv_exact(s, 16))[1:] == (0, 43)
    assert recv_exact(s, 8) == bytes(8)
    s.close()
    # and real clients still work
    assert sh("nbdinfo", url(sock)).returncode == 0


def test_suspended_export_holds_requests_until_resume(
        server: tuple[NbdServer, str, MemoryBackend]) -> None:
    srv, sock, backend = server
    export = srv.exports["disk"]
    export.suspend(timeout=5)
    s = handshake(sock)
    s.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 4) + b"abcd")
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):
        s.recv(16)
    assert bytes(backend.data[:4]) == bytes(4)
    export.resume()
    s.settimeout(10)
    assert struct.unpack(">IIQ", recv_exact(s, 16))[1:] == (0, 1)
    assert bytes(backend.data[:4]) == b"abcd"
    s.close()


class GatedBackend(MemoryBackend):
    """Writes wait for ``gate``; records the order of completed writes and flushes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        import threading
        self.gate = threading.Event()
        self.order: list[str] = []

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        assert self.gate.wait(30), "gate never opened"
        super().write(offset, data, fua)
        self.order.append(f"write {offset}")

    def flush(self) -> None:
        super().flush()
        self.order.append("flush")


def test_flush_waits_for_earlier_writes_without_holding_up_other_requests(
        tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    backend = GatedBackend(SIZE)
    with NbdServer(sock) as srv:
        srv.add_export(Export("disk", backend))
        s = handshake(sock)
        s.sendall(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 4) + b"abcd"
                  + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.FLUSH, 2, 0, 0)
                  + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.READ, 3, 512, 4))
        # the read behind the flush is answered while the write (and so the
        # flush) still waits: the reader is not blocked by the flush
        assert struct.unpack(">IIQ", recv_exact(s, 16))[1:] == (0, 3)
        assert recv_exact(s, 4) == bytes(4)
        assert backend.order == []
        backend.gate.set()
        replies = [struct.unpack(">IIQ", recv_exact(s, 16))[1:] for _ in range(2)]
        assert sorted(replies) == [(0, 1), (0, 2)]
        assert backend.order == ["write 0", "flush"]
        s.close()
