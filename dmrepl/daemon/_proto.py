"""Control-socket framing: a sans-I/O codec for length-prefixed JSON frames.

    frame = 32-bit big-endian payload length / payload (UTF-8 JSON object)

Requests are ``{"op": NAME, ...arguments}``; replies are ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": {"kind": KIND, "message": TEXT}}``
where KIND is one of :data:`ERROR_KINDS` (the CLI maps it to an exit code).
"""

from __future__ import annotations

import json
from typing import Any

from construct import Int32ub

from dmrepl.errors import DmreplError

HEADER = Int32ub
HEADER_SIZE = HEADER.sizeof()
MAX_FRAME = 16 * 1024 * 1024

ERROR_KINDS = ("user", "notfound", "exists", "busy", "timeout", "runtime", "internal")


class FrameError(DmreplError):
    """The peer sent a malformed frame: close the connection."""


def encode(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.build(len(payload)) + payload


class FrameDecoder:
    """Feed bytes, get whole JSON objects back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        frames: list[dict[str, Any]] = []
        while len(self._buf) >= HEADER_SIZE:
            length = HEADER.parse(bytes(self._buf[:HEADER_SIZE]))
            if length > MAX_FRAME:
                raise FrameError(f"frame length {length} exceeds {MAX_FRAME}")
            if len(self._buf) < HEADER_SIZE + length:
                break
            payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
            del self._buf[:HEADER_SIZE + length]
            try:
                obj = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise FrameError(f"frame is not JSON: {e}") from e
            if not isinstance(obj, dict):
                raise FrameError("frame is not a JSON object")
            frames.append(obj)
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


class ControlError(DmreplError):
    """A request failed in the daemon; ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind if kind in ERROR_KINDS else "internal"
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return {"ok": False, "error": {"kind": self.kind, "message": self.message}}
