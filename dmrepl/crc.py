"""CRC32C (Castagnoli): the checksum of every on-disk structure of the replication
log, and (seeded and finished as the kernel does) of the era metadata.

Uses the ``crc32c`` package (hardware-accelerated) when installed, else a
table-driven pure-Python fallback (correct, but slow: about 10 MB/s).
"""

from __future__ import annotations

from collections.abc import Callable

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_py(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Pure-Python CRC32C (same results as the accelerated one)."""
    crc = value ^ 0xFFFFFFFF
    table = _TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c: Callable[..., int]
try:
    from crc32c import crc32c as _accel

    # bound directly, no Python frame in between: it is called on every write
    crc32c = _accel
    ACCELERATED = True
except ImportError:  # pragma: no cover - depends on the environment
    crc32c = crc32c_py
    ACCELERATED = False
