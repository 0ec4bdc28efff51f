"""Blocking client of the daemon's control socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from dmrepl.daemon._proto import ControlError, FrameDecoder, FrameError, encode
from dmrepl.osenv import env_or

SOCKET_ENV = "DMREPL_SOCKET"
DEFAULT_SOCKET = "/run/dmrepl/control.sock"


def default_socket() -> str:
    """The control socket: ``$DMREPL_SOCKET`` if set and not empty, else
    :data:`DEFAULT_SOCKET`."""
    return env_or(SOCKET_ENV, DEFAULT_SOCKET)


class DaemonUnreachable(ControlError):
    """No daemon answers on the control socket."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__("runtime", f"cannot reach the dmrepl daemon at {path}: {reason} "
                                    "(is `dmrepl daemon` running?)")
        self.path = path


class MustBeRoot(ControlError):
    """Refused for want of privilege (e.g. the control socket answered EACCES or
    EPERM): the user must run the command as root."""

    def __init__(self, what: str) -> None:
        super().__init__("permission", f"must be root: {what}")


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = 60) -> None:
        self.path = path or default_socket()
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except PermissionError as e:   # EACCES or EPERM
                raise MustBeRoot(f"the dmrepl daemon's control socket {self.path} "
                                 f"refused us ({e.strerror or e})") from e
            except OSError as e:
                raise DaemonUnreachable(self.path, e.strerror or str(e)) from e
            sock.sendall(encode({"op": op, **args}))
            decoder = FrameDecoder()
            while True:
                data = sock.recv(65536)
                if not data:
                    raise DaemonUnreachable(self.path, "daemon closed the connection")
                frames = decoder.feed(data)
                if frames:
                    break
        except TimeoutError as e:
            raise ControlError("timeout", f"daemon did not answer {op!r} in time") from e
        except FrameError as e:
            raise ControlError("internal", f"bad reply from daemon: {e}") from e
        finally:
            sock.close()
        reply = frames[0]
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        raise ControlError(str(err.get("kind", "internal")), str(err.get("message", reply)))

    def stream(self, op: str, idle: float | None = None,
               **args: Any) -> Iterator[dict[str, Any] | None]:
        """A streaming op (``events``): each item until the daemon ends the stream
        (a ControlError if it refuses the request; DaemonUnreachable if it goes);
        ``None`` once the daemon subscribed us (every change from then on comes)
        and after each ``idle`` seconds without one (the caller may check its own
        reader is still there)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except OSError as e:
                raise DaemonUnreachable(self.path, e.strerror or str(e)) from e
            sock.sendall(encode({"op": op, **args}))
            decoder = FrameDecoder()
            started = False
            while True:
                try:
                    data = sock.recv(65536)
                except TimeoutError as e:
                    if started:
                        yield None
                        continue
                    raise ControlError("timeout", f"daemon did not answer {op!r} in "
                                                  "time") from e
                if not data:
                    raise DaemonUnreachable(self.path, "daemon closed the connection")
                try:
                    frames = decoder.feed(data)
                except FrameError as e:
                    raise ControlError("internal", f"bad reply from daemon: {e}") from e
                for frame in frames:
                    if not started:
                        if not frame.get("ok"):
                            err = frame.get("error") or {}
                            raise ControlError(str(err.get("kind", "internal")),
                                               str(err.get("message", frame)))
                        started = True
                        sock.settimeout(idle)   # events may be hours apart
                        yield None              # subscribed: what follows is new
                    elif frame.get("end"):
                        return
                    else:
                        yield frame["event"]
        finally:
            sock.close()
