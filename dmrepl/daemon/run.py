"""``dmrepl daemon``: the process around the :class:`~dmrepl.daemon.daemon.Daemon`.

The engine is loaded first (the real one or a clear failure), then the state
directory and the control socket are claimed, the objects of the last run are
recreated, readiness is announced (the ready file and, under systemd, ``READY=1``
on ``$NOTIFY_SOCKET``: a ``Type=notify`` unit is started only once the devices of
the last run are back), and requests are served until
SIGTERM/SIGINT; the shutdown is bounded (a thread dump and a forced exit after
:data:`SHUTDOWN_DEADLINE`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from typing import Any

from dmrepl.daemon._engine import EngineUnavailable, load_engine
from dmrepl.daemon.control import ControlServer
from dmrepl.daemon.daemon import Daemon
from dmrepl.eventlog import log_events
from dmrepl.logfmt import setup_logging
from dmrepl.nbd.server import NbdLimits
from dmrepl.osenv import sd_notify

log = logging.getLogger("dmrepl.daemon")

SHUTDOWN_DEADLINE = 60.0   # seconds a SIGTERM shutdown may take before a forced exit

__all__ = ["SHUTDOWN_DEADLINE", "EngineUnavailable", "run_daemon"]


def run_daemon(socket_path: str, state_dir: str, ready_file: str | None = None, *,
               kernel_devices: bool = True, engine: str = "auto",
               tuning: dict[str, Any] | None = None,
               nbd_limits: NbdLimits | None = None, metrics: str | None = None,
               log_level: str = "info") -> int:
    """``dmrepl daemon``: serve until SIGTERM/SIGINT, then shut down cleanly.

    Another daemon on the same state directory or control socket: raises
    :class:`~dmrepl.errors.InUse` (exit code IN_USE) before touching either; an
    engine that cannot be imported: :class:`EngineUnavailable`, before either.
    ``metrics``: ``ADDR:PORT`` of a Prometheus endpoint (read at scrape time from
    the status op), started once the devices are recreated."""
    setup_logging("dmrepl-daemon", log_level)
    # The state directory is claimed first (Daemon), then the control socket:
    # a second daemon stops at whichever another one holds, having touched nothing.
    daemon = Daemon(state_dir, kernel_devices=kernel_devices, engine=load_engine(engine),
                    tuning=tuning, nbd_limits=nbd_limits)
    # every state change (restored objects' too) is logged at its level
    event_logger = log_events(daemon.events, logging.getLogger("dmrepl.events"))
    try:
        server = ControlServer(daemon, socket_path)
    except BaseException:
        daemon.shutdown()
        raise

    def on_signal(signum: int, frame: object) -> None:
        del frame
        log.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # thread dump on demand
    endpoint = None
    try:
        daemon.restore()
        daemon.watch_journal_legs()
        if metrics:
            from dmrepl.metrics import DmreplCollector, MetricsServer
            endpoint = MetricsServer(metrics, [DmreplCollector(
                daemon.op_status, nbd_latency=daemon.nbd.latency_snapshot)])
            log.info("metrics: port %d, http://%s/metrics", endpoint.port, metrics)
        if ready_file:
            tmp = ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, ready_file)
        log.info("ready: control %s, nbd %s", socket_path, daemon.nbd_socket)
        sd_notify("READY=1")
        server.serve_forever()
    finally:
        # A shutdown that cannot finish (a request stuck in a wedged kernel or
        # engine) must not keep SIGTERM waiting forever: dump the threads and exit.
        faulthandler.dump_traceback_later(SHUTDOWN_DEADLINE, exit=True)
        started = time.monotonic()
        if endpoint is not None:
            endpoint.close()
        daemon.shutdown()
        faulthandler.cancel_dump_traceback_later()
        event_logger.join(5)   # the last events (objects closed) reach the log
        if ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file)
        log.info("shut down in %.1fs", time.monotonic() - started)
    # NBD worker threads may still sit in requests of connections that ended with
    # the kernel devices; the interpreter would wait for them at exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
