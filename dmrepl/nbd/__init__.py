"""NBD export of replicated devices: a sans-I/O protocol core and a threaded server."""

from dmrepl.nbd._proto import ExportInfo, RemoteProtocolError, ServerConnection
from dmrepl.nbd.backend import Backend, FileBackend, MemoryBackend
from dmrepl.nbd.server import Export, NbdServer

__all__ = ["Backend", "Export", "ExportInfo", "FileBackend", "MemoryBackend", "NbdServer",
           "RemoteProtocolError", "ServerConnection"]
