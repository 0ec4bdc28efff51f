"""Helpers shared by the kernel-tier test modules (imported as ``_util``: pytest puts
this directory on ``sys.path`` for the modules in it)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run(*argv: str, timeout: float = 120) -> str:
    """Run a command that must succeed; its stdout."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: rc={proc.returncode} {proc.stderr.strip()}"
    return proc.stdout


def wait_for(what: str, cond: Callable[[], T], timeout: float = 60,
             interval: float = 0.1) -> T:
    """Poll ``cond`` until it returns something true, and return that; fail the test
    naming ``what`` if that takes longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
