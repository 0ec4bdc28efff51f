"""The NBD server out of file descriptors (RLIMIT_NOFILE lowered in a child
process): its accept loop waits instead of spinning, and serves the queued
clients once descriptors are free again."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FREE_FDS = 16          # descriptors the child has left for connections
CLIENTS = 24           # FREE_FDS accepted, the rest queued in the backlog
GREETING_SIZE = 18
WINDOW = 1.5           # seconds of CPU time measured while out of descriptors

CHILD = f"""
import os, resource, sys
from dmrepl.nbd import Export, MemoryBackend, NbdServer
server = NbdServer(sys.argv[1]).start()
server.add_export(Export("d", MemoryBackend(4096)))
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + {FREE_FDS}, resource.getrlimit(
    resource.RLIMIT_NOFILE)[1]))
print("ready", flush=True)
for line in sys.stdin:
    t = os.times()
    print(t.user + t.system, flush=True)
"""


def cpu_seconds(child: subprocess.Popen[str]) -> float:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("cpu\n")
    child.stdin.flush()
    return float(child.stdout.readline())


def test_accept_loop_backs_off_without_fds_and_serves_again(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    clients: list[socket.socket] = []
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for _ in range(CLIENTS):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(10)
            conn.connect(path)
            clients.append(conn)
        time.sleep(0.5)                     # the server has hit EMFILE by now
        before = cpu_seconds(child)
        time.sleep(WINDOW)
        spent = cpu_seconds(child) - before
        assert spent < 0.2 * WINDOW, f"accept loop spun: {spent:.2f}s CPU in {WINDOW}s"
        for conn in clients[:FREE_FDS - 4]:   # accepted ones leave: descriptors free
            conn.close()
        last = clients[-1]                    # queued all along: now greeted
        last.settimeout(10)
        assert len(last.recv(GREETING_SIZE, socket.MSG_WAITALL)) == GREETING_SIZE
    finally:
        for conn in clients:
            conn.close()
        child.kill()
        child.wait(10)
