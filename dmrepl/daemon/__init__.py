"""The dmrepl daemon (replicators, NBD exports, kernel devices) and its control protocol."""

from dmrepl.daemon._proto import ControlError, FrameDecoder, encode
from dmrepl.daemon.client import Client, DaemonUnreachable

__all__ = ["Client", "ControlError", "DaemonUnreachable", "FrameDecoder", "encode"]
