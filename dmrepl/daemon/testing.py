"""Run a dmrepl daemon as a child process (tests, demo, benchmark).

Readiness is the ready file (written after the control socket listens and the
persisted objects are recreated), never a sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class DaemonProcess:
    def __init__(self, workdir: str | Path, *, kernel_devices: bool = True,
                 engine: str = "auto", log_name: str = "daemon.log") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.workdir / "control.sock")
        self.state_dir = str(self.workdir / "state")
        self.ready_file = str(self.workdir / "ready")
        self.log_path = self.workdir / log_name
        self.kernel_devices = kernel_devices
        self.engine = engine
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def nbd_socket(self) -> str:
        return os.path.join(self.state_dir, "nbd.sock")

    def start(self, timeout: float = 60) -> DaemonProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ready_file)
        argv = [sys.executable, "-m", "dmrepl.cli.main", "--socket", self.socket, "daemon",
                "--state-dir", self.state_dir, "--ready-file", self.ready_file,
                "--engine", self.engine]
        if not self.kernel_devices:
            argv.append("--no-kernel-devices")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.ready_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"daemon not ready in {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def cli(self, *argv: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dmrepl.cli.main", "--socket",
                               self.socket, *argv], capture_output=True, text=True,
                              input=input, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait for the clean shutdown."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                raise
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
