"""``ulogd``: the userspace dirty-log server for dm-mirror (dm-log-userspace).

    ulogd run [--log-level LEVEL] [--ready-file PATH] [--control PATH]
    ulogd status [--json] [--control PATH]

``run`` serves in the foreground.  Readiness (the socket has joined the
connector group, so the kernel can reach us) is announced by writing
``--ready-file`` and, under systemd, by ``READY=1`` on ``$NOTIFY_SOCKET``.
SIGTERM/SIGINT only set a flag; the loop notices it, closes every log (a disk
log writes its state) and exits 0.

One ulogd per host: the kernel sends every dm-log-userspace request to each
process on the connector, so ``run`` first claims ``--lock-file`` (and its state
directory, and its control socket if one answers there) and otherwise exits
with :attr:`ExitCode.IN_USE`, touching nothing.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from dmrepl.errors import InUse, UserError
from dmrepl.eventlog import EventLog, stdout_reader_gone
from dmrepl.logfmt import LOG_LEVELS, setup_logging
from dmrepl.numbers import argument
from dmrepl.osenv import sd_notify, version
from dmrepl.ownership import Claim, claim_directory, claim_lock_file
from ulogd.control import DEFAULT_CONTROL_PATH, ControlServer, query, stream_events
from ulogd.server import (
    DEFAULT_MAX_BITMAP_BYTES,
    DEFAULT_MAX_LOGS,
    DEFAULT_MAX_REGIONS,
    Dispatcher,
    Job,
    LogFactory,
    LogLimits,
    default_log_factory,
)
from ulogd.transport import RECV_SIZE, Transport

log = logging.getLogger("ulogd")

#: How long a stop request (SIGTERM) may go unnoticed by a blocked receive.
STOP_POLL_SECONDS = 0.2
DEFAULT_STATE_DIR = "/run/ulogd/state"
#: The host-wide claim on the kernel's connector (one ulogd per kernel).
DEFAULT_LOCK_FILE = "/run/ulogd/ulogd.lock"


class ExitCode(enum.IntEnum):
    """Exit codes of ``ulogd``; stable: scripts and units may rely on them."""
    OK = 0        # success (run: stopped cleanly)
    ERROR = 1     # could not start, or status could not reach the daemon
    USAGE = 2     # the command line is malformed (argparse)
    IN_USE = 9    # run: another ulogd owns the lock file, state dir or control socket


def epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {int(c):>3}  {c.name}" for c in ExitCode)


class Daemon:
    """The serving loop: one thread, one blocking receive and one reply per request.

    Two system calls per request (``recvfrom_into``, ``sendto``), no ``poll``: an
    idle daemon wakes every :data:`STOP_POLL_SECONDS` to notice a stop request.

    A single loop (rather than a thread per log) because the kernel holds each
    mirror's worker until its reply arrives: the critical path is the round
    trip, and a thread handoff would only add to it under the GIL.
    """

    def __init__(self, transport: Transport | None = None, *,
                 log_factory: LogFactory = default_log_factory,
                 control_path: str | None = DEFAULT_CONTROL_PATH,
                 state_dir: str | None = None,
                 persist_marks: bool = True,
                 lock_file: str | None = None,
                 limits: LogLimits | None = None) -> None:
        # Claimed before anything is touched (InUse if another ulogd holds one):
        # the host-wide lock, the state directory, then the control socket.
        self.claims: list[Claim] = []
        try:
            if lock_file:
                self.claims.append(claim_lock_file(lock_file, f"ulogd lock {lock_file}"))
            if state_dir:
                self.claims.append(claim_directory(state_dir, "ulogd state directory"))
            self.events = EventLog()
            self.control = (ControlServer(control_path, self.status_snapshot,
                                          events=self.events, current=self.current_state)
                            if control_path else None)
        except BaseException:
            self._release()
            raise
        try:
            self.transport = transport if transport is not None else Transport()
            self.dispatcher = Dispatcher(log_factory, portid=self.transport.portid,
                                         persist_marks=persist_marks, state_dir=state_dir,
                                         limits=limits, offload=True, events=self.events)
        except BaseException:
            if self.control is not None:
                self.control.close()
            self._release()
            raise
        # Size-dependent requests (CTR, RESUME, POSTSUSPEND) run here, one at a time,
        # so a large log's construction or device read never holds up other logs.
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run_jobs, name="ulogd-jobs", daemon=True)
        self.started = time.time()
        self._stop = False

    def request_stop(self, *_: Any) -> None:
        """The signal handler: only sets a flag (the loop polls it every 0.2 s)."""
        self._stop = True

    def current_state(self) -> list[dict[str, Any]]:
        with self.dispatcher.lock:
            return self.dispatcher.current_state()

    def status_snapshot(self) -> dict[str, Any]:
        with self.dispatcher.lock:
            snap = self.dispatcher.snapshot()
        t = self.transport
        snap.update({
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "received": t.received,
            "enobufs": t.enobufs,
            "foreign_dropped": t.foreign_dropped,
            "send_errors": t.send_errors,
        })
        return snap

    def _run_jobs(self) -> None:
        dispatcher = self.dispatcher
        while (job := self._jobs.get()) is not None:
            job.run()
            with dispatcher.lock:
                replies = dispatcher.finish(job)
                for more in dispatcher.take_jobs():  # started by requests that waited
                    self._jobs.put(more)
            for r in replies:
                self.transport.send(r)

    def serve(self, ready: Any = None) -> None:
        self._worker.start()
        if self.control is not None:
            self.control.start()
        if ready is not None:
            ready()
        transport = self.transport
        transport.use_blocking_receive(STOP_POLL_SECONDS)
        recv_into = transport.recv_into
        send = transport.send
        handle_into = self.dispatcher.handle_into
        handle = self.dispatcher.handle_batch
        lock = self.dispatcher.lock
        take_jobs = self.dispatcher.take_jobs
        jobs = self._jobs
        clock = time.perf_counter_ns
        # One buffer for every request: the hot requests are answered in place in it.
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        try:
            while not self._stop:
                size = recv_into(buf)
                if size < 0:
                    continue
                t0 = clock()
                with lock:
                    reply_len = handle_into(buf, size, t0)
                    if reply_len < 0:
                        replies = handle((bytes(view[:size]),), t0)
                        for job in take_jobs():
                            jobs.put(job)
                if reply_len >= 0:
                    send(view[:reply_len])
                    continue
                for r in replies:
                    send(r)
        finally:
            view.release()
            self.close()

    def close(self) -> None:
        if self._worker.is_alive():
            self._jobs.put(None)  # after the Jobs queued: each is finished and answered
            self._worker.join()
        if self.control is not None:
            self.control.close()
            self.control = None
        with self.dispatcher.lock:
            self.dispatcher.close_all()
        self.transport.close()
        self._release()

    def _release(self) -> None:
        while self.claims:
            self.claims.pop().release()


def make_realtime(priority: int) -> None:
    """SCHED_FIFO and locked memory: every mirror write waits on our round trips, so a
    wakeup delayed behind other runnable tasks (or a page fault) is added to its
    latency.  multipathd does the same for the same reason.  Failures are logged."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError) as e:
        log.warning("cannot switch to SCHED_FIFO %d: %s", priority, e)
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.mlockall(3) != 0:  # MCL_CURRENT | MCL_FUTURE
            log.warning("mlockall failed: %s", os.strerror(ctypes.get_errno()))
    except OSError as e:
        log.warning("mlockall unavailable: %s", e)


def _listen_address(text: str) -> str:
    """``--metrics ADDR:PORT``, checked as the command line is parsed (exit USAGE)."""
    from dmrepl.metrics import parse_listen
    try:
        parse_listen(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _cmd_run(args: argparse.Namespace) -> int:
    setup_logging("ulogd", args.log_level)
    try:
        daemon = Daemon(control_path=args.control or None,
                        state_dir=args.state_dir or None,
                        persist_marks=not args.no_persist_marks,
                        lock_file=args.lock_file or None,
                        limits=LogLimits(max_logs=args.max_logs, max_regions=args.max_regions,
                                         max_bitmap_bytes=args.max_bitmap_memory << 20))
    except InUse as e:
        log.error("cannot start: %s", e)
        return ExitCode.IN_USE
    except OSError as e:
        log.error("cannot start: %s", e)
        return ExitCode.ERROR
    endpoint = None
    if args.metrics:
        from dmrepl.metrics import MetricsServer, UlogdCollector
        try:
            endpoint = MetricsServer(args.metrics, [UlogdCollector(daemon.status_snapshot)])
        except UserError as e:
            log.error("cannot start: %s", e)
            daemon.close()
            return ExitCode.ERROR
    if args.realtime:
        make_realtime(args.realtime)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)

    def ready() -> None:
        log.info("serving dm-log-userspace requests (netlink port %d, control %s)",
                 daemon.transport.portid, args.control or "none")
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, args.ready_file)
        sd_notify("READY=1")

    try:
        daemon.serve(ready)
    finally:
        if endpoint is not None:
            endpoint.close()
    log.info("stopped")
    return ExitCode.OK


def _fmt_status(snap: dict[str, Any]) -> str:
    lines = [f"ulogd pid {snap.get('pid')} uptime {snap.get('uptime_s')}s requests "
             f"{snap.get('requests')} errors {snap.get('errors')} dropped "
             f"{sum(snap.get('dropped', {}).values()) + snap.get('foreign_dropped', 0)} "
             f"enobufs {snap.get('enobufs')}"]
    for lg in snap.get("logs", []):
        lat = lg["latency"]
        p50 = "-" if lat["p50_us"] is None else f"{lat['p50_us']:.0f}us"
        p99 = "-" if lat["p99_us"] is None else f"{lat['p99_us']:.0f}us"
        lines.append(
            f"{lg['uuid']} luid {lg['luid']:#x} {lg['type']} region_size {lg['region_size']} "
            f"regions {lg['regions']} in_sync {lg['in_sync']} dirty {lg['dirty']} "
            f"requests {sum(lg['requests'].values())} p50 {p50} p99 {p99}")
    return "\n".join(lines)


def _cmd_events(args: argparse.Namespace) -> int:
    """JSON lines, flushed each; a closed pipe (``| head``) ends it quietly."""
    try:
        for event in stream_events(args.control, now=args.now):
            if event is None:
                if stdout_reader_gone():
                    return 0
                continue
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"ulogd events: cannot reach the daemon at {args.control}: {e.strerror or e}",
              file=sys.stderr)
        return ExitCode.ERROR
    except ValueError as e:
        print(f"ulogd events: the daemon at {args.control} {e}", file=sys.stderr)
        return ExitCode.ERROR
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        snap = query(args.control)
    except OSError as e:
        print(f"ulogd status: cannot reach the daemon at {args.control}: {e.strerror or e}",
              file=sys.stderr)
        return ExitCode.ERROR
    except ValueError as e:
        print(f"ulogd status: the daemon at {args.control} sent no status: {e}",
              file=sys.stderr)
        return ExitCode.ERROR
    if "error" in snap:
        print(f"ulogd status: the daemon at {args.control} refused: {snap['error']}",
              file=sys.stderr)
        return ExitCode.ERROR
    if args.json:
        print(json.dumps(snap, indent=2))
    else:
        print(_fmt_status(snap))
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ulogd", description=__doc__.split("\n")[0],
                                     epilog=epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve in the foreground", epilog=epilog(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    run.add_argument("--ready-file", help="written (with our pid) once the kernel can reach us")
    run.add_argument("--control", default=DEFAULT_CONTROL_PATH,
                     help="control socket path ('' for none; default %(default)s)")
    run.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                     help="where the sync state of live logs is kept across daemon restarts "
                          "(must be a tmpfs: it must not outlive the kernel; default "
                          "%(default)s; '' for none)")
    run.add_argument("--lock-file", default=DEFAULT_LOCK_FILE,
                     help="held while running: a second ulogd on this host refuses to start "
                          "(exit code 9; default %(default)s; '' for none)")
    run.add_argument("--realtime", type=argument("--realtime", usage_error=True, hi=99),
                     default=0, metavar="PRIO",
                     help="run SCHED_FIFO at this priority with memory locked (0: off)")
    run.add_argument("--no-persist-marks", action="store_true",
                     help="make marks durable at FLUSH only, not at MARK (faster disk logs, "
                          "exposed to the lost-mark hazard if ulogd dies between the two)")
    run.add_argument("--max-logs", type=argument("--max-logs", usage_error=True, lo=1),
                     default=DEFAULT_MAX_LOGS, metavar="N",
                     help="logs held at once; a CTR beyond is refused (default %(default)s)")
    run.add_argument("--max-regions",
                     type=argument("--max-regions", usage_error=True, lo=1),
                     default=DEFAULT_MAX_REGIONS, metavar="N",
                     help="regions of one log; a larger CTR is refused (default %(default)s)")
    run.add_argument("--max-bitmap-memory",
                     type=argument("--max-bitmap-memory", usage_error=True, lo=1),
                     default=DEFAULT_MAX_BITMAP_BYTES >> 20, metavar="MIB",
                     help="MiB of region bitmaps of all logs together (two bits a region; "
                          "default %(default)s)")
    run.set_defaults(func=_cmd_run)
    run.add_argument("--metrics", metavar="ADDR:PORT", type=_listen_address,
                     help="serve Prometheus metrics on http://ADDR:PORT/metrics (default: off)")
    st = sub.add_parser("status", help="show the logs of a running daemon")
    st.add_argument("--json", action="store_true")
    st.add_argument("--control", default=DEFAULT_CONTROL_PATH)
    st.set_defaults(func=_cmd_status)
    ev = sub.add_parser("events", help="stream the changes of a running daemon as JSON "
                                       "lines: logs created/destroyed, suspended/resumed, "
                                       "refused requests")
    ev.add_argument("--now", action="store_true",
                    help="first the current state of every log (kind \"exists\")")
    ev.add_argument("--control", default=DEFAULT_CONTROL_PATH)
    ev.set_defaults(func=_cmd_events)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
