"""Control-socket framing: a sans-I/O codec for length-prefixed JSON frames.

    frame = 32-bit big-endian payload length / payload (UTF-8 JSON object)

Requests are ``{"op": NAME, ...arguments}``; replies are ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": {"kind": KIND, "message": TEXT}}``
where KIND is one of :data:`ERROR_KINDS` (the CLI maps it to an exit code).

A streaming op (``events``) answers ``{"ok": true, "stream": true}`` and then
sends ``{"event": ...}`` frames on the same connection until the client closes
it, or ``{"end": true}`` when the daemon stops; its errors are ordinary replies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from construct import Int32ub

from dmrepl.errors import DmreplError

HEADER = Int32ub
HEADER_SIZE = HEADER.sizeof()
MAX_FRAME = 16 * 1024 * 1024

ERROR_KINDS = ("user", "notfound", "exists", "busy", "timeout", "runtime", "internal",
               "permission")


class FrameError(DmreplError):
    """The peer sent a malformed frame: close the connection."""


class BadFrame(FrameError):
    """A whole frame arrived but is not a JSON object.  It was consumed, so the
    stream is still in step: answer it with an error and read on."""


def encode(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.build(len(payload)) + payload


def _parse_payload(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except RecursionError:
        raise BadFrame("frame is not acceptable JSON: it nests too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFrame(f"frame is not JSON: {e}") from None
    except ValueError:
        # json's int() refused it (sys.get_int_max_str_digits)
        raise BadFrame("frame is not acceptable JSON: a number has too many digits") from None
    if not isinstance(obj, dict):
        raise BadFrame("frame is not a JSON object")
    return obj


class FrameDecoder:
    """Feed bytes (:meth:`receive`), pull whole JSON objects (:meth:`next_frame`).

    :meth:`next_frame` raises :class:`BadFrame` for a frame that is not a JSON
    object (consumed: the next call goes on with the frame after it) and
    :class:`FrameError` for a length the stream cannot recover from."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        """The next whole frame, or ``None`` until more bytes arrive."""
        if len(self._buf) < HEADER_SIZE:
            return None
        length = HEADER.parse(bytes(self._buf[:HEADER_SIZE]))
        if length > MAX_FRAME:
            raise FrameError(f"frame length {length} exceeds {MAX_FRAME}")
        if len(self._buf) < HEADER_SIZE + length:
            return None
        payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
        del self._buf[:HEADER_SIZE + length]
        return _parse_payload(payload)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """:meth:`receive` then every whole frame (the first bad one raises)."""
        self.receive(data)
        frames: list[dict[str, Any]] = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
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


class Stream:
    """The result of a streaming op: ``items`` yields each event to send, or
    ``None`` when there was none for a while (the server then checks that the
    client is still there).  :meth:`close` ends it (the client went away)."""

    def __init__(self, items: Iterator[dict[str, Any] | None]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        return self.items

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()
