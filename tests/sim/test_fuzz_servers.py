"""Slow tier: 100,000+ generated inputs for each server (ulogd through its fake kernel
transport, the NBD server over a socket, the daemon's control socket, and messages to
a real engine and through the daemon).  Run with ``-m slow``; each run prints its seed
and counts.  One server per run, shared by every case; connections are reused while
the protocol allows.

Invariants: every request gets a reply (or, for a malformed frame, a clean close);
errors are the documented ones; the server still answers a valid request after bad
ones (checked every 1,000 cases and at the end); a rejected request changes nothing
observable (status before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzgen import Finding, Gen, run_cases

from dmrepl.daemon._proto import HEADER, FrameDecoder, encode
from dmrepl.daemon.daemon import ControlServer, Daemon, load_engine
from dmrepl.dirtylog import MemoryStorage, open_dirty_log, parse_dirty_log_args
from dmrepl.errors import UserError
from dmrepl.nbd import _proto as nbd
from dmrepl.nbd.backend import MemoryBackend
from dmrepl.nbd.server import Export, NbdServer
from dmrepl.replicator import Replicator
from dmrepl.replicator.errors import ReplicatorError
from dmrepl_testing.ulogd import FakeKernel
from ulogd import protocol as p
from ulogd.main import Daemon as Ulogd
from ulogd.protocol import RequestType as RT

pytestmark = pytest.mark.slow

CASES = int(os.environ.get("FUZZ_CASES", 100_000))
REPLY_TIMEOUT = 10.0


# -- ulogd --------------------------------------------------------------------------

UUIDS = (b"FUZZ-A", b"FUZZ-B")
LUIDS = (1, 2, 3, 4, 5)
HEALTH = (b"HEALTH", 1000)  # a log the generator never addresses
REGIONS = 512  # each constructed log: 4096 sectors in 8-sector regions


def safe_factory(type_name: str, args: Any, target_sectors: int) -> Any:
    """Real logs, disk logs on memory (a fuzzed CTR must never open a host device);
    targets beyond 2^22 sectors are refused (bounding memory is issue 10 item 6,
    another part's subject)."""
    cfg = parse_dirty_log_args(type_name, args, target_sectors)
    if target_sectors > 1 << 22:
        raise p.ReplyTooLarge("fuzz: target too large for a memory log")
    storage = MemoryStorage(1 << 20) if cfg.type_name == "disk" else None
    return open_dirty_log(type_name, args, target_sectors, storage=storage)


CTR_ARGS = ("4096 core 8", "4096 core 8 nosync", "4096 disk mem 8", "4096 clustered-core 8 sync",
            "4096 core 8 sync")


def _ulog_payload(gen: Gen, rtype: int) -> bytes:
    if rtype == RT.CTR:
        words = gen.choice(CTR_ARGS).split()
        if gen.random() < 0.5:
            words = gen.mutate_words(words)
        return " ".join(words).encode("utf-8", "surrogateescape") + gen.choice((b"", b"\0"))
    if rtype in (RT.MARK_REGION, RT.CLEAR_REGION, RT.FLUSH):
        n = gen.randrange(0, 8)
        regions = [gen.randrange(REGIONS) if gen.random() < 0.8 else gen.u64()
                   for _ in range(n)]
        return struct.pack(f"={n}Q", *regions)
    if rtype in (RT.IS_CLEAN, RT.IN_SYNC, RT.IS_REMOTE_RECOVERING):
        return p.encode_u64(gen.randrange(REGIONS) if gen.random() < 0.8 else gen.u64())
    if rtype == RT.SET_REGION_SYNC:
        region = gen.randrange(REGIONS) if gen.random() < 0.8 else gen.u64()
        return struct.pack("=Qq", region, gen.choice((0, 1, -1, 2)))
    return b""


class UlogdRig:
    def __init__(self) -> None:
        self.kernel = FakeKernel()
        self.daemon = Ulogd(self.kernel.transport(), log_factory=safe_factory,
                            control_path=None)
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)
        self.thread.start()
        for uuid in UUIDS:
            for luid in LUIDS[:3]:
                self.construct(uuid, luid)
        self.construct(*HEALTH)

    def construct(self, uuid: bytes, luid: int) -> None:
        assert self.kernel.ctr(uuid, luid, "4096 core 8").error == 0
        assert self.kernel.simple(uuid, luid, RT.RESUME).error == 0

    def log_state(self, uuid: bytes, luid: int) -> Any:
        for log in self.daemon.status_snapshot()["logs"]:
            if log["uuid"] == uuid.decode("ascii", "replace") and log["luid"] == luid:
                return (log["in_sync"], log["dirty"], log["regions"], log["resumed"])
        return None

    def case(self, gen: Gen, i: int) -> None:
        uuid = gen.choice(UUIDS)
        luid = gen.choice(LUIDS)
        rtype = gen.choice(list(RT)) if gen.random() < 0.95 else gen.u64() & 0xFFFFFFFF
        payload = _ulog_payload(gen, rtype) if rtype in RT.__members__.values() else \
            gen.randbytes(gen.randrange(64))
        frame = p.encode_request(self.kernel.seq, luid, uuid, rtype, payload,
                                 3 if gen.random() < 0.95 else gen.randrange(6))
        self.kernel.seq = (self.kernel.seq + 1) & 0xFFFFFFFF
        mutated = gen.random() < 0.3
        if mutated:
            frame = gen.mutate_bytes(frame, 3)
        gen.current = f"datagram {frame.hex()}"
        expected = [e for e in p.decode_datagram(frame) if isinstance(e, p.Request)]
        watched = {(e.uuid, e.luid) for e in expected
                   if e.request_type in (RT.MARK_REGION, RT.CLEAR_REGION,
                                         RT.SET_REGION_SYNC, RT.FLUSH)}
        before = {k: self.log_state(*k) for k in watched}
        self.kernel.send_raw(frame)
        replies = []
        for _ in expected:
            reply = self.kernel.recv(REPLY_TIMEOUT)
            if reply is None:
                raise Finding("no reply to a request", f"{len(replies)} of {len(expected)}")
            replies.append(reply)
        for req, reply in zip(expected, replies, strict=True):
            if reply.seq != req.seq:
                raise Finding("reply out of order", f"{reply.seq} != {req.seq}")
            if reply.error > 0:
                raise Finding("positive error in a reply", str(reply.error))
        rejected = {(e.uuid, e.luid) for e, r in zip(expected, replies, strict=True)
                    if r.error != 0}
        for key in watched & rejected:
            after = self.log_state(*key)
            if after != before[key]:
                raise Finding("a rejected request changed the log",
                              f"{key}: {before[key]} -> {after}")
        # a destroyed or damaged log of the fixed set comes back for the next cases
        if any(e.request_type == RT.DTR for e in expected) or i % 500 == 0:
            for u in UUIDS:
                for lu in LUIDS[:3]:
                    if self.log_state(u, lu) is None:
                        self.construct(u, lu)

    def check(self) -> None:
        reply = self.kernel.request(*HEALTH, RT.GET_REGION_SIZE, timeout=REPLY_TIMEOUT)
        if reply.error != 0 or struct.unpack("=Q", reply.data)[0] != 8:
            raise Finding("health request failed", str(reply))

    def close(self) -> None:
        self.daemon.request_stop()
        self.thread.join(10)
        self.kernel.close()


def test_fuzz_ulogd_requests() -> None:
    rig = UlogdRig()
    try:
        run_cases("ulogd requests", CASES, 2001, rig.case, rig.check)
    finally:
        rig.close()


# -- NBD server ------------------------------------------------------------------------

EXPORT = "disk"
EXPORT_SIZE = 1 << 20


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _option(opt: int, data: bytes) -> bytes:
    return nbd.OPTION.build({"magic": nbd.IHAVEOPT, "option": opt, "length": len(data)}) + data


def _go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def _valid_handshake(gen: Gen | None = None) -> bytes:
    """Client flags plus a few options, ending in GO (or EXPORT_NAME)."""
    out = struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    if gen is not None:
        for _ in range(gen.randrange(3)):
            opt = gen.choice((nbd.Opt.LIST, nbd.Opt.INFO, nbd.Opt.STRUCTURED_REPLY,
                              nbd.Opt.STARTTLS, 99))
            data = b"" if opt in (nbd.Opt.LIST, nbd.Opt.STRUCTURED_REPLY) else \
                _go_data(gen.choice((EXPORT, "nope", "")), (nbd.Info.BLOCK_SIZE,))
            out += _option(opt, data)
        if gen.random() < 0.2:
            return out + _option(nbd.Opt.EXPORT_NAME, EXPORT.encode())
    return out + _option(nbd.Opt.GO, _go_data(EXPORT, (nbd.Info.BLOCK_SIZE,)))


class NbdRig:
    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "nbd.sock")
        self.backend = MemoryBackend(EXPORT_SIZE)
        self.server = NbdServer(self.path, workers=4).start()
        self.server.add_export(Export(EXPORT, self.backend))
        self.conn: socket.socket | None = None
        self.handle = 0

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(REPLY_TIMEOUT)
        s.connect(self.path)
        return s

    def transmission(self) -> socket.socket:
        """A connection in transmission phase (reused across cases)."""
        if self.conn is None:
            s = self.connect()
            greeting = _recv_exactly(s, nbd.GREETING.sizeof())
            nbd.GREETING.parse(greeting)
            s.sendall(_valid_handshake())
            while True:  # option replies until the ACK of GO
                head = _recv_exactly(s, nbd.OPTION_REPLY.sizeof())
                rep = nbd.OPTION_REPLY.parse(head)
                _recv_exactly(s, rep.length)
                if rep.reply == nbd.Rep.ACK:
                    break
                if rep.reply & (1 << 31):
                    raise Finding("valid GO refused", str(rep))
            self.conn = s
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def handshake_case(self, gen: Gen) -> None:
        data = _valid_handshake(gen)
        if gen.random() < 0.8:
            data = gen.mutate_bytes(data, 4)
        gen.current = f"handshake bytes after the greeting: {data.hex()}"
        s = self.connect()
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the server sees EOF after our bytes
            while True:
                try:
                    if not s.recv(65536):
                        return  # closed: as it must once the client has gone
                except ConnectionResetError:
                    return
                except TimeoutError:
                    raise Finding("handshake: server neither answered nor closed", "") \
                        from None
        finally:
            s.close()

    def request_case(self, gen: Gen) -> None:
        s = self.transmission()
        cmd = gen.choice(list(nbd.Cmd)) if gen.random() < 0.9 else gen.randrange(1 << 16)
        flags = 0 if gen.random() < 0.6 else gen.choice(
            (nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, gen.randrange(1 << 16)))
        offset = gen.randrange(0, EXPORT_SIZE, 512) if gen.random() < 0.7 else gen.u64()
        length = gen.choice((512, 4096, 1, 0)) if gen.random() < 0.7 else gen.u64() & 0xFFFFFFFF
        if cmd == nbd.Cmd.DISC:
            cmd = nbd.Cmd.READ  # a disconnect ends the reused connection: not a case
        self.handle += 1
        magic = nbd.REQUEST_MAGIC if gen.random() < 0.97 else gen.u64() & 0xFFFFFFFF
        head = nbd.REQUEST_S.pack(magic, flags, cmd, self.handle, offset & (2**64 - 1), length)
        payload = b""
        if cmd == nbd.Cmd.WRITE and length <= nbd.MAX_REQUEST:
            payload = gen.randbytes(min(length, 64)) * (length // 64 + 1)
            payload = payload[:length]
        gen.current = f"request {head.hex()} + {len(payload)} payload bytes"
        before = hashlib.blake2b(self.backend.data).digest() \
            if cmd in (nbd.Cmd.WRITE, nbd.Cmd.WRITE_ZEROES, nbd.Cmd.TRIM) else None
        s.sendall(head + payload)
        if cmd == nbd.Cmd.WRITE and length > nbd.MAX_REQUEST:
            s.shutdown(socket.SHUT_WR)  # the payload will not come
        try:
            reply = _recv_exactly(s, nbd.SIMPLE_REPLY.sizeof())
        except TimeoutError:
            self.drop()
            raise Finding("no reply and no close", "") from None
        except ConnectionResetError:
            reply = b""
        if not reply:
            self.drop()
            valid = magic == nbd.REQUEST_MAGIC and cmd in list(nbd.Cmd) and \
                offset + length <= EXPORT_SIZE and length <= nbd.MAX_REQUEST
            if valid and flags in (0, nbd.CMD_FLAG_FUA) and cmd != nbd.Cmd.BLOCK_STATUS:
                raise Finding("valid request: connection closed without a reply", "")
            return
        r = nbd.SIMPLE_REPLY.parse(reply)
        if r.handle != self.handle:
            self.drop()
            raise Finding("reply to another handle", f"{r.handle} != {self.handle}")
        if r.error == 0 and cmd == nbd.Cmd.READ:
            data = _recv_exactly(s, length)
            if data != bytes(self.backend.data[offset:offset + length]):
                raise Finding("read returned other data", "")
        if r.error != 0 and before is not None \
                and hashlib.blake2b(self.backend.data).digest() != before:
            raise Finding("a rejected write changed the export", f"error {r.error}")
        if cmd == nbd.Cmd.WRITE and length > nbd.MAX_REQUEST:
            self.drop()

    def case(self, gen: Gen, i: int) -> None:
        if gen.random() < 0.25:
            self.handshake_case(gen)
        else:
            self.request_case(gen)

    def check(self) -> None:
        self.drop()
        s = self.transmission()
        self.handle += 1
        s.sendall(nbd.REQUEST_S.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.READ, self.handle, 0, 4096))
        r = nbd.SIMPLE_REPLY.parse(_recv_exactly(s, nbd.SIMPLE_REPLY.sizeof()))
        if r.error or _recv_exactly(s, 4096) != bytes(self.backend.data[:4096]):
            raise Finding("health read failed", str(r))

    def close(self) -> None:
        self.drop()
        self.server.close()


def test_fuzz_nbd_requests(tmp_path: Path) -> None:
    rig = NbdRig(tmp_path)
    try:
        run_cases("nbd requests", CASES, 2002, rig.case, rig.check)
    finally:
        rig.close()


# -- the daemon: control frames and op_message ----------------------------------------

DEV_SECTORS = 128
SAFE_TOKEN = re.compile(r"[^/:\\]*")


class DaemonRig:
    """An in-process daemon (no kernel devices) with one replicator ``rep`` and one
    device ``vol`` on small files, and its control socket."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files = {}
        for name in ("log", "l0", "r0", "fl", "fr", "fx"):
            path = tmp / name
            path.write_bytes(b"")
            os.truncate(path, (4096 + 64) * 512 if name == "log" else DEV_SECTORS * 512)
            self.files[name] = str(path)
        self.daemon = Daemon(str(tmp / "state"), kernel_devices=False,
                             engine=load_engine("replicator"))
        self.path = str(tmp / "control.sock")
        self.server = ControlServer(self.daemon, self.path)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.conn: socket.socket | None = None
        self.decoder = FrameDecoder()
        f = self.files
        self.rep_table = (f"0 1 replicator ringbuffer 4 {f['log']} 0 create 4096 "
                          "blockdev 2 0 async blockdev 4 1 async ios 100")
        self.vol_table = (f"0 {DEV_SECTORS} replicator-dev rep 0 0 1 {f['l0']} nolog 0 "
                          f"1 1 {f['r0']} core 2 8 nosync")
        self.call_ok("create", name="rep", table=self.rep_table)
        self.call_ok("create", name="vol", table=self.vol_table)

    # -- transport
    def connect(self) -> socket.socket:
        if self.conn is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(REPLY_TIMEOUT)
            s.connect(self.path)
            self.conn, self.decoder = s, FrameDecoder()
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def exchange(self, raw: bytes, frames: int) -> list[dict[str, Any]] | None:
        """Send raw bytes holding ``frames`` complete frames; their replies, or None
        when the daemon closed the connection first."""
        s = self.connect()
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            self.drop()
            return None
        replies: list[dict[str, Any]] = []
        while len(replies) < frames:
            try:
                data = s.recv(1 << 20)
            except TimeoutError:
                self.drop()
                raise Finding("control: no reply and no close", f"{len(replies)}/{frames}") \
                    from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.drop()
                time.sleep(0.01)  # a dying server thread reports before the next case
                return None
            replies += self.decoder.feed(data)
        return replies

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        replies = self.exchange(encode({"op": op, **args}), 1)
        if not replies:
            raise Finding("control: valid frame, connection closed", op)
        return replies[0]

    def call_ok(self, op: str, **args: Any) -> Any:
        reply = self.call(op, **args)
        if not reply.get("ok"):
            raise Finding(f"control: {op} failed", str(reply)[:300])
        return reply["result"]

    def tables(self) -> Any:
        return self.call_ok("table")

    # -- generation
    def safe_words(self, words: list[str]) -> list[str]:
        """Paths and major:minor only to our own files: the daemon runs as root."""
        ok = tuple(self.files.values())
        return [w if w in ok or SAFE_TOKEN.fullmatch(w) else self.files["fx"] for w in words]

    def table_text(self, gen: Gen) -> str:
        f = self.files
        samples = (
            f"0 1 replicator ringbuffer 4 {f['fl']} 0 auto 4096 blockdev 2 0 async",
            f"0 {DEV_SECTORS} replicator-dev fzrep 0 0 1 {f['fr']} nolog 0",
            f"0 {DEV_SECTORS} replicator-dev rep 5 0 1 {f['fr']} nolog 0 "
            f"1 1 {f['fx']} core 2 8 nosync",
            self.vol_table, self.rep_table)
        words = gen.choice(samples).split()
        if gen.random() < 0.8:
            words = gen.mutate_words(words)
        return " ".join(self.safe_words(words))

    def value(self, gen: Gen, depth: int = 0) -> Any:
        r = gen.randrange(12)
        if r == 0:
            return gen.choice((0, -1, 1, 2**63, 2**64, -(2**70), 10**400))
        if r == 1:
            return gen.choice((None, True, False, 1.5, float("1e308")))
        if r == 2 and depth < 3:
            return [self.value(gen, depth + 1) for _ in range(gen.randrange(3))]
        if r == 3 and depth < 3:
            return {gen.word(): self.value(gen, depth + 1) for _ in range(gen.randrange(3))}
        if r == 4:
            return self.table_text(gen)
        if r == 5:
            return gen.choice(("rep", "vol", "fzA", "fzB", "", "x" * 300, "../x", ".x"))
        return gen.word()

    def frame_case(self, gen: Gen) -> None:
        op = gen.choice(("ping", "create", "remove", "load", "suspend", "resume", "message",
                         "status", "table", "ls", "wait", "nosuch", "__init__", "_save",
                         "handle", ""))
        request: dict[str, Any] = {"op": op}
        keys = ("name", "table", "uuid", "sector", "args", "kind", "wait", "event_nr",
                "timeout", "extra")
        for key in gen.sample(keys, gen.randrange(4)):
            request[key] = self.value(gen)
        if op in ("remove", "load", "suspend", "resume", "create") \
                and request.get("name") in ("rep", "vol"):
            request["name"] = "fzA"  # the fixture stays; fuzzed objects come and go
        if op == "wait":
            request["timeout"] = 0  # a legal long wait is not a fault
        if op == "remove":
            request.pop("wait", None)
        shape = gen.randrange(10)
        if shape < 6:  # a well-framed JSON object
            text = json.dumps(request, allow_nan=True)
            raw, frames = HEADER.build(len(text.encode())) + text.encode(), 1
        elif shape == 6:  # deep nesting, or a huge number
            depth = gen.choice((10, 100, 1000, 5000, 100000))
            text = gen.choice(('{"op":"ping","x":' + "[" * depth + "]" * depth + "}",
                               '{"op":"status","name":' + "9" * depth + "}",
                               '{"op":"message","name":"rep","sector":' + "1" * depth
                               + ',"args":["start"]}'))
            raw, frames = HEADER.build(len(text)) + text.encode(), 1
        elif shape == 7:  # not JSON / not an object
            body = gen.choice((b"{", b"[1,2]", b"null", b"\xff\xfe", b"", b"{\"op\":}",
                               gen.randbytes(gen.randrange(40)), b"1" * 5000))
            raw, frames = HEADER.build(len(body)) + body, 1
        elif shape == 8:  # a damaged frame of a valid request
            text = json.dumps(request).encode()
            raw, frames = gen.mutate_bytes(HEADER.build(len(text)) + text, 3), 1
        else:  # two frames in one write
            text = json.dumps(request).encode()
            one = HEADER.build(len(text)) + text
            raw, frames = one + one, 2
        gen.current = f"control bytes {raw[:300]!r}{'...' if len(raw) > 300 else ''}"
        local = FrameDecoder()
        try:
            decoded: list[dict[str, Any]] | None = local.feed(raw)
        except Exception:
            decoded = None  # malformed: a clean close is a right answer
        if decoded is not None and len(decoded) < frames:
            # an incomplete frame (a damaged length): the daemon rightly waits for more;
            # end the conversation so it sees EOF
            self.exchange(raw, len(decoded))
            self.drop()
            return
        before = self.tables() if op in ("message", "load", "suspend", "resume") else None
        replies = self.exchange(raw, frames)
        if local.pending:
            self.drop()  # the rest of a frame: the next one would not parse after it
        if replies is None:
            if decoded is not None:
                raise Finding("control: well-formed frame, closed without a reply",
                              f"op {op!r}")
            return
        for reply in replies:
            if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
                raise Finding("control: malformed reply", str(reply)[:200])
            if not reply["ok"]:
                kind = reply["error"]["kind"]
                if kind == "internal":
                    raise Finding(f"control: internal error for op {op!r}",
                                  reply["error"]["message"][:200])
        if before is not None and all(not r["ok"] for r in replies):
            after = self.tables()
            if after != before:
                raise Finding(f"control: rejected {op} changed the tables",
                              f"{before} -> {after}")
        if op in ("create", "load") and any(r["ok"] for r in replies):
            self.cleanup()

    def cleanup(self) -> None:
        for obj in self.call_ok("ls"):
            if obj["name"] not in ("rep", "vol"):
                self.call("remove", name=obj["name"])

    def message_args(self, gen: Gen, replicator: bool) -> list[str]:
        if replicator:
            samples = ("start", "stop", "resume all", "suspend all", "statistics on",
                       "statistics reset", "slink message 1 policy sync",
                       "slink message 1 policy async", "slink message 1 fallbehind ios 50",
                       "slink message 1 resync_rate 4m", "slink del 1",
                       "slink add 4 1 async ios 10", "replog statistics on",
                       "replog resize 4096")
        else:
            samples = ("start", "stop", "0 del 1", f"0 add 1 1 {self.files['r0']} core 2 8",
                       "device del 1", "0 info", "postsuspend")
        words = gen.choice(samples).split()
        if gen.random() < 0.7:
            words = gen.mutate_words(words)
        return self.safe_words(words)

    def message_case(self, gen: Gen) -> None:
        replicator = gen.random() < 0.6
        name = "rep" if replicator else "vol"
        args = self.message_args(gen, replicator)
        sector: Any = 0 if gen.random() < 0.9 else self.value(gen)
        gen.current = f"message {name} {sector!r} {args!r}"
        before = self.tables()
        reply = self.call("message", name=name, sector=sector, args=args)
        if reply["ok"]:
            return
        if reply["error"]["kind"] == "internal":
            raise Finding("message: internal error", reply["error"]["message"][:200])
        after = self.tables()
        if after != before:
            raise Finding("a rejected message changed the tables", f"{before} -> {after}")

    def case(self, gen: Gen, i: int) -> None:
        if gen.random() < 0.5:
            self.frame_case(gen)
        else:
            self.message_case(gen)

    def check(self) -> None:
        self.drop()
        if self.call_ok("ping")["pid"] != os.getpid():
            raise Finding("ping: another daemon answers", "")
        names = {o["name"] for o in self.call_ok("ls")}
        if not {"rep", "vol"} <= names:
            raise Finding("the fixture objects are gone", str(names))

    def close(self) -> None:
        self.drop()
        self.server.stop()
        self.thread.join(10)
        self.daemon.shutdown()


@pytest.fixture
def daemon_rig(tmp_path: Path) -> Iterator[DaemonRig]:
    rig = DaemonRig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def test_fuzz_control_frames_and_daemon_messages(daemon_rig: DaemonRig) -> None:
    run_cases("control frames + daemon messages", CASES, 2003, daemon_rig.case,
              daemon_rig.check)


# -- engine messages against a real engine on small files -------------------------------

class EngineRig:
    def __init__(self, tmp: Path) -> None:
        self.files = {}
        for name in ("log", "l0", "r0", "r1", "x"):
            path = tmp / name
            path.write_bytes(b"")
            os.truncate(path, (4096 + 64) * 512 if name == "log" else DEV_SECTORS * 512)
            self.files[name] = str(path)
        f = self.files
        self.rep = Replicator.from_table(
            f"0 1 replicator ringbuffer 4 {f['log']} 0 create 4096 "
            "blockdev 2 0 async blockdev 4 1 async ios 100", retry_interval=0.01)
        self.dev = self.rep.add_device(f"0 {DEV_SECTORS} replicator-dev rep 0 0 1 {f['l0']} "
                                       f"nolog 0 1 1 {f['r0']} core 2 8 nosync")
        self.rep.start()

    def safe_words(self, words: list[str]) -> list[str]:
        ok = tuple(self.files.values())
        return [w if w in ok or SAFE_TOKEN.fullmatch(w) else self.files["x"] for w in words]

    def observable(self) -> tuple[str, str]:
        return self.rep.status("table"), self.dev.status("table")

    def case(self, gen: Gen, i: int) -> None:
        f = self.files
        on_rep = gen.random() < 0.6
        if on_rep:
            samples = ("start", "stop", "resume all", "suspend all", "statistics on",
                       "statistics off", "slink message 1 policy sync",
                       "slink message 1 policy async+stall", "slink message 1 fallbehind ios 50",
                       "slink message 1 fallbehind size 1m", "slink message 1 resync_rate 4m",
                       "slink del 1", "slink add 4 1 async ios 10", "slink add 2 2 sync",
                       "replog statistics reset", "replog resize 4096", "replog resize 8192")
        else:
            samples = ("start", "stop", "postsuspend", "0 del 1",
                       f"0 add 1 1 {f['r0']} core 2 8", f"0 add 2 1 {f['r1']} core 2 16 sync",
                       "device del 1", f"device add 0 1 {f['x']} nolog 0")
        words = gen.choice(samples).split()
        if gen.random() < 0.7:
            words = gen.mutate_words(words)
        args = self.safe_words(words)
        target = self.rep if on_rep else self.dev
        gen.current = f"{'replicator' if on_rep else 'device'} message {args!r}"
        before = self.observable()
        try:
            target.message(args)
        except (UserError, ReplicatorError, OSError) as e:
            after = self.observable()
            if after != before:
                raise Finding("a rejected message changed the status",
                              f"{type(e).__name__}: {e}; {before} -> {after}") from e
        if i % 50 == 0:  # some I/O between messages, so state changes have effects
            self.rep.message(["resume", "all"])  # a stopped device's writes wait
            self.dev.message(["start"])
            self.dev.write(gen.randrange(DEV_SECTORS) * 512, b"x" * 512)

    def check(self) -> None:
        for what in ("info", "table"):
            self.rep.status(what)
            self.dev.status(what)
        self.dev.read(0, 512)

    def close(self) -> None:
        self.rep.close()


def test_fuzz_engine_messages(tmp_path: Path) -> None:
    rig = EngineRig(tmp_path)
    try:
        run_cases("engine messages", CASES, 2004, rig.case, rig.check)
    finally:
        rig.close()
