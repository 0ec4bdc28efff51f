"""Dispatch of kernel requests to dirty logs, and the serving loop.

:class:`Dispatcher` is pure (bytes in, bytes out, plus the dirty logs): it keeps
every log the kernel constructed, keyed by ``(uuid, luid)`` so the live and the
inactive table of one device (same uuid, different luid) are distinct logs.

Rules
-----
* Every request with a usable header gets exactly one reply; undecodable bytes
  are counted as drops (there is nothing to reply to).
* A request for an unknown ``(uuid, luid)`` is answered ``-ESRCH``: the kernel
  then re-sends CTR (with a trailing NUL) and RESUME and retries.  This is how a
  restarted daemon gets its logs back.  DTR of an unknown log succeeds.
* An initial CTR for a known key replaces the entry: the old one is an orphan
  (the kernel never sends DTR when a table constructor fails after our CTR, and
  luids are kernel addresses that get reused).  A *reconnect* CTR for a known
  key keeps the entry and its state (the kernel merely lost contact).
* A request whose work grows with the log's size (CTR, RESUME, POSTSUSPEND)
  runs, when ``offload`` is set, off the serving thread as a :class:`Job`; the
  log's later requests wait for it (in order), other logs keep being answered.
* What a CTR may ask for is bounded by :class:`LogLimits`: beyond them it is
  refused with -ENOMEM and one log line naming the limit and its option.
* Marks are made durable before the MARK reply (not only before FLUSH): a daemon
  killed between MARK and FLUSH would otherwise lose marks the kernel will never
  repeat (the "lost-mark hazard").  The FLUSH that follows finds nothing to
  write.  Durability work is coalesced: one ``flush()`` per log per batch of
  datagrams, after all the batch's requests were applied, before any reply.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dmrepl.dirtylog import bitmap_memory, parse_dirty_log_args
from dmrepl.errors import UserError
from dmrepl.eventlog import EventLog
from dmrepl.numbers import parse_int
from ulogd import protocol as p
from ulogd.protocol import RequestType as RT

log = logging.getLogger("ulogd.server")

LogFactory = Callable[[str, Sequence[str], int], Any]

_LAT_RING = 2048  # latencies kept per log (ns), a power of two; allocated as they come
_LAT_MASK = _LAT_RING - 1
_ZERO8 = p.encode_s64(0)
_ONE8 = p.encode_s64(1)
_NO_WORK = p.encode_resync_work(False, 0)
_FLUSHING = frozenset({RT.FLUSH, RT.MARK_REGION})
# Requests whose work grows with the log (reading, writing or filling whole bitsets).
_SIZED = frozenset({RT.RESUME, RT.POSTSUSPEND})

DEFAULT_MAX_LOGS = 8192
DEFAULT_MAX_REGIONS = 1 << 28  # 64 MiB of bitsets; 128 TiB in 512 KiB regions
DEFAULT_MAX_BITMAP_BYTES = 1 << 30
_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class LogLimits:
    """What the kernel may make one ulogd hold (``ulogd run --max-*``)."""

    max_logs: int = DEFAULT_MAX_LOGS
    max_regions: int = DEFAULT_MAX_REGIONS  # a log
    max_bitmap_bytes: int = DEFAULT_MAX_BITMAP_BYTES  # all logs' bitsets together


class LimitExceeded(Exception):
    """A CTR asks for more than :class:`LogLimits` allow: refused with -ENOMEM."""

    errno = errno.ENOMEM

# the in-place hot path (Dispatcher.handle_into)
_HOT = p.HOT_FIELDS.unpack_from
_NL_CN_INTO = p.NL_CN.pack_into
_TAIL_INTO = p.ULOG_TAIL.pack_into
_U64_FROM = p.U64_S.unpack_from
_S64_INTO = p.S64_S.pack_into
_RR_INTO = p.REMOTE_RECOVERING.pack_into
_HDRS = p.HEADERS_LEN
_ULOG = p.ULOG_HDRLEN
_UUID_AT = p.UUID_OFFSET
_TAIL_AT = p.ULOG_TAIL_OFFSET
_NLMSG_DONE = p.NLMSG_DONE
_CN_IDX = p.CN_IDX_DM
_CN_VAL = p.CN_VAL_DM_USERSPACE_LOG
_TYPE_MASK = p.REQUEST_MASK
_ALIGN_ADD = p.NLMSG_ALIGN_ADD
_ALIGN_MASK = p.NLMSG_ALIGN_MASK
_REGION = p.REGION_ARG_SIZE
_REGIONS = p.region_array
# a region list's length in bytes is a multiple of _REGION, a power of two
_REGION_MOD = _REGION - 1
_REGION_SHIFT = _REGION.bit_length() - 1
_S64_LEN = p.S64_S.size
_RR_LEN = p.REMOTE_RECOVERING.size
_IN_SYNC, _FLUSH, _MARK, _CLEAR, _IRR = (int(RT.IN_SYNC), int(RT.FLUSH), int(RT.MARK_REGION),
                                         int(RT.CLEAR_REGION), int(RT.IS_REMOTE_RECOVERING))


def default_log_factory(type_name: str, args: Sequence[str], target_sectors: int) -> Any:
    from dmrepl.dirtylog import open_dirty_log

    return open_dirty_log(type_name, args, target_sectors)


class LogEntry:
    """One constructed log and its bookkeeping."""

    __slots__ = ("args", "bitmap_bytes", "counts", "ctr_string", "dlog", "errors", "lat",
                 "lat_n", "luid", "raw_uuid", "restore_pending", "resumed", "sync_bits",
                 "touched", "type_name", "uuid", "watermark")

    def __init__(self, uuid: bytes, luid: int, dlog: Any, type_name: str, ctr_string: str):
        self.uuid = uuid
        self.raw_uuid = uuid.ljust(p.DM_UUID_LEN, b"\0")  # the uuid field as the kernel sends it
        self.luid = luid
        self.dlog = dlog
        self.type_name = type_name
        self.ctr_string = ctr_string
        self.counts = [0] * p.REQUEST_TYPE_SLOTS
        self.errors = 0
        self.lat = array("q")  # grows to _LAT_RING entries, then is a ring
        self.lat_n = 0
        self.bitmap_bytes = 0  # counted against LogLimits.max_bitmap_bytes
        self.resumed = False
        self.touched = False      # marks/clears not yet flushed
        self.watermark = 0        # regions below it are known in sync
        self.sync_bits = bytearray()  # our copy of the sync bits (for the state file)
        self.restore_pending = False  # reconnect CTR: restore the sync bits at RESUME

    def in_sync_hint(self) -> int:
        """How many leading regions are in sync (IS_REMOTE_RECOVERING's hint)."""
        d = self.dlog
        n = d.region_count
        if d.get_sync_count() >= n:
            return n
        first = d.first_out_of_sync(self.watermark)
        self.watermark = n if first is None else first
        return self.watermark

    def record_latency(self, ns: int) -> None:
        i = self.lat_n
        if i < _LAT_RING:
            self.lat.append(ns)
        else:
            self.lat[i & _LAT_MASK] = ns
        self.lat_n = i + 1

    def latency_percentiles(self) -> dict[str, float | None]:
        n = min(self.lat_n, _LAT_RING)
        if not n:
            return {"p50_us": None, "p99_us": None, "max_us": None}
        vals = sorted(self.lat[:n])
        return {"p50_us": vals[n // 2] / 1000, "p99_us": vals[min(n - 1, (n * 99) // 100)] / 1000,
                "max_us": vals[-1] / 1000}


class SyncStateStore:
    """The sync bits of every live log, in files under a runtime directory.

    Why: after a daemon restart the kernel reconnects (CTR + RESUME) but keeps its
    ``in_sync_hint``, which after a completed resync equals the region count, so
    it never asks for resync work again until the next real resume.  A log that
    came back with fewer in-sync regions than the kernel believes would send
    writes to those regions to the default leg only, and nothing would ever copy
    them.  So the sync bits the kernel last saw are kept here (a tmpfs such as
    /run lives exactly as long as the kernel's belief) and restored on reconnect.
    Clean/dirty bits need no such care: ``disk`` logs keep them on the log device.
    """

    MAGIC = b"ULOGD-SYNC 1\n"

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, entry: LogEntry) -> str:
        return os.path.join(self.directory, f"{entry.uuid.hex()}-{entry.luid:x}.sync")

    def save(self, entry: LogEntry) -> None:
        path = self._path(entry)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.MAGIC + entry.ctr_string.encode() + b"\n" + bytes(entry.sync_bits))
        os.replace(tmp, path)

    def load(self, entry: LogEntry) -> bytes | None:
        try:
            with open(self._path(entry), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        head = self.MAGIC + entry.ctr_string.encode() + b"\n"
        if not data.startswith(head):
            return None
        bits = data[len(head):]
        return bits if len(bits) == (entry.dlog.region_count + 7) // 8 else None

    def delete(self, entry: LogEntry) -> None:
        try:
            os.unlink(self._path(entry))
        except FileNotFoundError:
            pass


# What a finished request leaves: (entry, error, payload, needs durable flush).
Outcome = tuple[LogEntry | None, int, bytes, bool]


class Job:
    """One request's work, to run off the serving thread (:meth:`run`, no lock held),
    then :meth:`Dispatcher.finish` (lock held) applies it and answers it and the
    requests for its log that arrived meanwhile."""

    __slots__ = ("done", "error", "key", "req", "result", "t0", "work")

    def __init__(self, key: tuple[bytes, int], req: p.Request, t0: int,
                 work: Callable[[], Any],
                 done: Callable[[Any, Exception | None], Outcome]) -> None:
        self.key = key
        self.req = req
        self.t0 = t0
        self.work = work
        self.done = done
        self.result: Any = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except Exception as e:  # handed to done(), which answers with its errno
            self.error = e


def _request_name(rtype: int) -> str:
    try:
        return RT(rtype).name
    except ValueError:
        return str(rtype)


class Dispatcher:
    """Applies decoded requests to the logs and produces the reply datagrams."""

    def __init__(self, log_factory: LogFactory = default_log_factory, *, portid: int = 0,
                 persist_marks: bool = True, fast_path: bool = True,
                 state_dir: str | None = None,
                 clock: Callable[[], int] = time.perf_counter_ns,
                 limits: LogLimits | None = None, offload: bool = False,
                 events: EventLog | None = None) -> None:
        # log create/destroy, suspend/resume, refused requests (``ulogd events``)
        self.events = events if events is not None else EventLog()
        self.logs: dict[tuple[bytes, int], LogEntry] = {}
        # the newest entry per luid, for the hot path (which then checks the uuid)
        self._by_luid: dict[int, LogEntry] = {}
        self.factory = log_factory
        self.portid = portid
        self.persist_marks = persist_marks
        self.fast_path = fast_path
        self.state = SyncStateStore(state_dir) if state_dir else None
        self.clock = clock
        self.lock = threading.Lock()
        self.dropped: dict[str, int] = {}
        self.unknown_key = 0
        self.errors = 0
        self.requests = 0
        self.limits = limits if limits is not None else LogLimits()
        self.bitmap_bytes = 0  # of every log, and reserved by CTRs under way
        self.offload = offload
        self._ctr_pending = 0
        # logs with a Job under way -> their requests that arrived meanwhile
        self._busy: dict[tuple[bytes, int], list[p.Request]] = {}
        self._jobs: list[Job] = []
        self._handlers: dict[int, Callable[[Any, LogEntry], tuple[int, bytes]]] = {
            RT.DTR: self._dtr,
            RT.PRESUSPEND: self._presuspend,
            RT.POSTSUSPEND: self._postsuspend,
            RT.RESUME: self._resume,
            RT.GET_REGION_SIZE: self._get_region_size,
            RT.IS_CLEAN: self._is_clean,
            RT.IN_SYNC: self._in_sync,
            RT.FLUSH: self._flush,
            RT.MARK_REGION: self._mark,
            RT.CLEAR_REGION: self._clear,
            RT.GET_RESYNC_WORK: self._get_resync_work,
            RT.SET_REGION_SYNC: self._set_region_sync,
            RT.GET_SYNC_COUNT: self._get_sync_count,
            RT.STATUS_INFO: self._status_info,
            RT.STATUS_TABLE: self._status_table,
            RT.IS_REMOTE_RECOVERING: self._is_remote_recovering,
        }

    def current_state(self) -> list[dict[str, Any]]:
        """Each log as the fields of an ``exists`` event (``ulogd events --now``);
        the caller holds :attr:`lock`."""
        return [{"uuid": _u(e.uuid), "luid": e.luid, "type": e.type_name, "args": e.ctr_string,
                 "suspended": not e.resumed} for e in self.logs.values()]

    # -- batch entry point ---------------------------------------------------

    def handle_batch(self, datagrams: Sequence[bytes], t0: int | None = None) -> list[bytes]:
        """Replies to every request in ``datagrams``, durability work done first.

        The reference path: every message is decoded into a typed event.  The
        serving loop calls it for whatever :meth:`handle_into` declines.
        """
        if t0 is None:
            t0 = self.clock()
        requests: list[p.Request] = []
        for dgram in datagrams:
            for ev in p.decode_datagram(dgram):
                if isinstance(ev, p.Dropped):
                    reason = ev.reason.split(" ")[0]
                    self.dropped[reason] = self.dropped.get(reason, 0) + 1
                    log.warning("dropped message: %s", ev.reason)
                    continue
                self.requests += 1
                requests.append(ev)
        return self._answer(requests, t0)

    def _answer(self, requests: Sequence[p.Request], t0: int) -> list[bytes]:
        pending: list[tuple[LogEntry | None, int, bytes, p.Request]] = []
        to_flush: list[LogEntry] = []
        for ev in requests:
            outcome = self._apply(ev, t0)
            if outcome is None:
                continue  # answered when its log's Job is finished
            ent, err, payload, needs_flush = outcome
            if needs_flush and ent is not None and ent not in to_flush:
                to_flush.append(ent)
            pending.append((ent, err, payload, ev))
        failed: dict[int, int] = {}
        for ent in to_flush:
            err = self._durable(ent)
            if err:
                failed[id(ent)] = err
        replies: list[bytes] = []
        lat = self.clock() - t0
        for ent, err, payload, req in pending:
            if ent is not None:
                if failed and not err and id(ent) in failed and req.request_type in _FLUSHING:
                    err, payload = failed[id(ent)], b""
                ent.record_latency(lat)
                if err:
                    ent.errors += 1
                    self.errors += 1
            elif err:
                self.errors += 1
            replies.append(self._encode(req, err, payload))
        return replies

    def handle_into(self, buf: bytearray, size: int, t0: int,
                    # the protocol's constants as locals (default-argument binding):
                    # no global or attribute lookups per request; never passed
                    _nlmsg_done: int = _NLMSG_DONE, _cn_idx: int = _CN_IDX,
                    _cn_val: int = _CN_VAL, _type_mask: int = _TYPE_MASK,
                    _align_add: int = _ALIGN_ADD, _align_mask: int = _ALIGN_MASK,
                    _region: int = _REGION, _region_mod: int = _REGION_MOD,
                    _region_shift: int = _REGION_SHIFT,
                    _regions: Callable[[int], Any] = _REGIONS,
                    _s64_len: int = _S64_LEN, _rr_len: int = _RR_LEN) -> int:
        """The hot path: answer the request in ``buf[:size]`` in place.

        Takes a datagram holding exactly one well-formed IN_SYNC,
        IS_REMOTE_RECOVERING, FLUSH, MARK_REGION or CLEAR_REGION for a known log,
        applies it (marks durable first, as in :meth:`handle_batch`), overwrites
        the request with its reply and returns the reply's length.  Nothing is
        allocated but the region tuples: the headers are echoed in place, the way
        the kernel laid them out.  Anything else (and any exception) returns -1
        with ``buf`` unchanged: the caller then hands the bytes to
        :meth:`handle_batch`, the reference behaviour (a unit test checks that
        both answer byte for byte alike).
        """
        if size < _HDRS or not self.fast_path:
            return -1
        nl_len, nl_type, idx, val, cn_len, luid, version, seq, raw_type, dsize = _HOT(buf)
        if nl_type != _nlmsg_done or idx != _cn_idx or val != _cn_val \
                or nl_len != _HDRS + dsize or cn_len != _ULOG + dsize \
                or (nl_len + _align_add) & _align_mask != size:
            return -1
        entry = self._by_luid.get(luid)
        if entry is None or not buf.startswith(entry.raw_uuid, _UUID_AT):
            return -1
        rtype = raw_type & _type_mask
        dlog = entry.dlog
        try:
            if rtype == _IN_SYNC:
                if dsize != _region:
                    return -1
                answer = 1 if dlog.in_sync(_U64_FROM(buf, _HDRS)[0]) else 0
                _S64_INTO(buf, _HDRS, answer)
                n = _s64_len
            elif rtype == _FLUSH or rtype == _MARK or rtype == _CLEAR:
                if dsize & _region_mod:
                    return -1
                if dsize:
                    regions = (_U64_FROM(buf, _HDRS) if dsize == _region
                               else _regions(dsize >> _region_shift).unpack_from(buf, _HDRS))
                    if rtype == _CLEAR:
                        dlog.clear_regions(regions)
                    else:
                        dlog.mark_regions(regions)
                    entry.touched = True
                n = 0
            elif rtype == _IRR:
                if dsize != _region or _U64_FROM(buf, _HDRS)[0] >= dlog.region_count:
                    return -1
                _RR_INTO(buf, _HDRS, 0, entry.in_sync_hint())
                n = _rr_len
            else:
                return -1
        except Exception:
            return -1  # the typed path will produce the proper error reply
        err = 0
        if entry.touched and (rtype == _FLUSH or (rtype == _MARK and self.persist_marks)):
            try:
                dlog.flush()
                entry.touched = False
            except Exception as e:
                err = self._flush_error(entry, e)
                entry.errors += 1
                self.errors += 1
        self.requests += 1
        entry.counts[rtype] += 1
        i = entry.lat_n
        if i < _LAT_RING:
            entry.lat.append(self.clock() - t0)
        else:
            entry.lat[i & _LAT_MASK] = self.clock() - t0
        entry.lat_n = i + 1
        reply_len = _HDRS + n
        _NL_CN_INTO(buf, 0, reply_len, _nlmsg_done, 0, seq, self.portid, _cn_idx, _cn_val, seq,
                    0, _ULOG + n, 0)
        _TAIL_INTO(buf, _TAIL_AT, b"", version, err, seq, rtype, n)
        return reply_len

    def _durable(self, entry: LogEntry) -> int:
        if not entry.touched:
            return 0
        try:
            entry.dlog.flush()
        except Exception as e:  # LogDeviceError and anything unexpected
            return self._flush_error(entry, e)
        entry.touched = False
        return 0

    def _flush_error(self, entry: LogEntry, e: Exception) -> int:
        log.error("flush of log %s/%d failed: %s", _u(entry.uuid), entry.luid, e)
        return -(getattr(e, "errno", None) or errno.EIO)

    # -- one request -----------------------------------------------------------

    def _apply(self, req: p.Request, t0: int) -> Outcome | None:
        """The request's outcome, or None if it is answered later (see :class:`Job`)."""
        rtype = req.request_type
        if isinstance(req, p.MalformedRequest):
            log.warning("malformed request type %d seq %d: %s", rtype, req.seq, req.reason)
            return None, -errno.EINVAL, b"", False
        if isinstance(req, p.UnknownRequest):
            log.warning("unknown request type %d (seq %d) answered -EINVAL", rtype, req.seq)
            return None, -errno.EINVAL, b"", False
        backlog = self._busy.get((req.uuid, req.luid))
        if backlog is not None:
            backlog.append(req)  # after the Job under way for its log, in order
            return None
        if rtype == RT.CTR:
            assert isinstance(req, p.Ctr)
            return self._ctr(req, t0)
        entry = self.logs.get((req.uuid, req.luid))
        if entry is None:
            if rtype == RT.DTR:
                return None, 0, b"", False
            self.unknown_key += 1
            self.events.emit("error", "refused", "log", uuid=_u(req.uuid), luid=req.luid,
                             request=_request_name(rtype), errno=errno.ESRCH,
                             error="unknown log")
            log.info("request type %d for unknown log %s/%d: -ESRCH (kernel will reconnect)",
                     rtype, _u(req.uuid), req.luid)
            return None, -errno.ESRCH, b"", False
        entry.counts[rtype] += 1
        handler = self._handlers[rtype]
        if rtype in _SIZED:
            return self._run(Job((req.uuid, req.luid), req, t0, lambda: handler(req, entry),
                                 lambda result, error: self._handled(req, entry, result, error)),
                             entry)
        try:
            result = handler(req, entry)
        except Exception as e:
            return self._handled(req, entry, None, e)
        ent, err, payload, _ = self._handled(req, entry, result, None)
        needs_flush = rtype == RT.FLUSH or (rtype == RT.MARK_REGION and self.persist_marks)
        return ent, err, payload, needs_flush and not err

    def _handled(self, req: p.Request, entry: LogEntry, result: tuple[int, bytes] | None,
                 error: Exception | None) -> Outcome:
        """A handler's (error, payload), or the errno its exception stands for."""
        if error is None:
            assert result is not None
            return entry, result[0], result[1], False
        rtype = req.request_type
        self.events.emit("error", "refused", "log", uuid=_u(req.uuid), luid=req.luid,
                         request=_request_name(rtype), error=str(error))
        if isinstance(error, (UserError, IndexError)):
            log.warning("request type %d on %s/%d rejected: %s", rtype, _u(req.uuid), req.luid,
                        error)
            return entry, -errno.EINVAL, b"", False
        eno = getattr(error, "errno", None)
        log.error("request type %d on %s/%d failed: %s", rtype, _u(req.uuid), req.luid, error,
                  exc_info=error if eno is None else None)
        return entry, -(eno or errno.EIO), b"", False

    def _run(self, job: Job, entry: LogEntry | None) -> Outcome | None:
        """Run ``job`` now, or (``offload``) leave it to :meth:`take_jobs`' caller."""
        if not self.offload:
            job.run()
            return job.done(job.result, job.error)
        self._busy[job.key] = []
        if entry is not None and self._by_luid.get(entry.luid) is entry:
            del self._by_luid[entry.luid]  # the fast path declines it: it waits too
        self._jobs.append(job)
        return None

    def take_jobs(self) -> list[Job]:
        """The Jobs started since the last call: run each (``job.run()``, any thread,
        no lock), then :meth:`finish` it (with ``self.lock`` held)."""
        jobs, self._jobs = self._jobs, []
        return jobs

    def finish(self, job: Job) -> list[bytes]:
        """The replies to a Job's request and to its log's requests that waited."""
        entry, err, payload, _ = job.done(job.result, job.error)
        if entry is not None:
            entry.record_latency(self.clock() - job.t0)
            if err:
                entry.errors += 1
        if err:
            self.errors += 1
        replies = [self._encode(job.req, err, payload)]
        backlog = self._busy.pop(job.key)
        if entry is not None and self.logs.get(job.key) is entry \
                and entry.luid not in self._by_luid:
            self._by_luid[entry.luid] = entry
        return replies + self._answer(backlog, self.clock())

    def _encode(self, req: p.Request, err: int, payload: bytes) -> bytes:
        try:
            return p.encode_reply(req, err, payload, self.portid)
        except p.ReplyTooLarge as e:
            log.error("%s", e)
            self.errors += 1
            return p.encode_reply(req, -errno.EINVAL, b"", self.portid)

    def _ctr(self, req: p.Ctr, t0: int) -> Outcome | None:
        key = (req.uuid, req.luid)
        old = self.logs.get(key)
        if old is not None and req.reconnect:
            log.info("reconnect CTR for known log %s/%d: kept", _u(req.uuid), req.luid)
            old.counts[RT.CTR] += 1
            self._by_luid[req.luid] = old
            return old, 0, b"", False
        words = req.args.split()
        try:
            if len(words) < 2:
                raise UserError(f"constructor string {req.args!r}: need <sectors> <type> ...")
            target_sectors = parse_int(words[0], "target length (sectors)")
            config = parse_dirty_log_args(words[1], words[2:], target_sectors)
            need = bitmap_memory(config)
            self._check_limits(req, config.region_count, need, old)
        except Exception as e:
            return self._ctr_failed(req, e)
        # Reserved now: CTRs under way count against the limits too.
        self._ctr_pending += 1
        self.bitmap_bytes += need
        return self._run(Job(key, req, t0,
                             lambda: self.factory(words[1], words[2:], target_sectors),
                             lambda dlog, error: self._constructed(req, words, need, dlog,
                                                                   error)),
                         None)

    def _check_limits(self, req: p.Ctr, regions: int, need: int, old: LogEntry | None) -> None:
        lim = self.limits
        what = f"CTR {_u(req.uuid)}/{req.luid} refused"
        if regions > lim.max_regions:
            raise LimitExceeded(f"{what}: {regions} regions ({need / _MIB:.1f} MiB of bitmaps) "
                                f"exceed the limit of {lim.max_regions} regions a log "
                                f"(ulogd run --max-regions)")
        logs = len(self.logs) + self._ctr_pending - (old is not None)
        if logs >= lim.max_logs:
            raise LimitExceeded(f"{what}: {logs} logs held, the limit "
                                f"(ulogd run --max-logs {lim.max_logs})")
        in_use = self.bitmap_bytes - (old.bitmap_bytes if old is not None else 0)
        if in_use + need > lim.max_bitmap_bytes:
            raise LimitExceeded(f"{what}: {need / _MIB:.1f} MiB of bitmaps asked, "
                                f"{in_use / _MIB:.1f} MiB in use of the limit "
                                f"{lim.max_bitmap_bytes / _MIB:.1f} MiB "
                                f"(ulogd run --max-bitmap-memory)")

    def _ctr_failed(self, req: p.Ctr, e: Exception) -> Outcome:
        self.events.emit("error", "refused", "log", uuid=_u(req.uuid), luid=req.luid,
                         request=RT.CTR.name, error=str(e))
        if isinstance(e, LimitExceeded):
            log.error("%s", e)
            return None, -errno.ENOMEM, b"", False
        log.error("CTR %s/%d %r failed: %s", _u(req.uuid), req.luid, req.args, e)
        eno = getattr(e, "errno", None) if not isinstance(e, UserError) else None
        return None, -(eno or errno.EINVAL), b"", False

    def _constructed(self, req: p.Ctr, words: list[str], need: int, dlog: Any,
                     error: Exception | None) -> Outcome:
        self._ctr_pending -= 1
        if error is not None:
            self.bitmap_bytes -= need
            return self._ctr_failed(req, error)
        key = (req.uuid, req.luid)
        old = self.logs.get(key)
        if old is not None:
            log.warning("CTR for existing log %s/%d: replacing the orphan", _u(req.uuid),
                        req.luid)
            self._close(old)
        entry = LogEntry(req.uuid, req.luid, dlog, words[1], req.args)
        entry.bitmap_bytes = need
        entry.restore_pending = req.reconnect
        if self.state is not None and not req.reconnect:
            self.state.delete(entry)
        entry.counts[RT.CTR] += 1
        self.logs[key] = entry
        self._by_luid[req.luid] = entry
        self.events.emit("create", "log-create", "log", uuid=_u(req.uuid), luid=req.luid,
                         args=req.args, reconnect=bool(req.reconnect))
        log.info("constructed log %s/%d: %s%s", _u(req.uuid), req.luid, req.args,
                 " (reconnect)" if req.reconnect else "")
        payload = b""
        if (not req.reconnect and req.version >= 2 and getattr(dlog, "type_name", "") == "disk"):
            name = words[2].encode() + b"\0"
            if len(name) <= p.DM_NAME_LEN:
                payload = name
        return entry, 0, payload, False

    def _close(self, entry: LogEntry) -> None:
        self.bitmap_bytes -= entry.bitmap_bytes
        entry.bitmap_bytes = 0
        try:
            entry.dlog.close()
        except Exception as e:
            log.error("closing log %s/%d: %s", _u(entry.uuid), entry.luid, e)

    # -- handlers: (request, entry) -> (error, payload) -------------------------

    def _dtr(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        del self.logs[(entry.uuid, entry.luid)]
        if self._by_luid.get(entry.luid) is entry:
            del self._by_luid[entry.luid]
        if self.state is not None:
            self.state.delete(entry)
        self._close(entry)
        self.events.emit("destroy", "log-destroy", "log", uuid=_u(entry.uuid),
                         luid=entry.luid)
        log.info("destroyed log %s/%d", _u(entry.uuid), entry.luid)
        return 0, b""

    def _presuspend(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        entry.dlog.presuspend()
        return 0, b""

    def _postsuspend(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        entry.dlog.postsuspend()
        entry.touched = False
        entry.resumed = False
        self.events.emit("change", "suspend", "log", uuid=_u(entry.uuid), luid=entry.luid)
        return 0, b""

    def _resume(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        dlog = entry.dlog
        dlog.resume()
        entry.resumed = True
        entry.watermark = 0
        self.events.emit("change", "resume", "log", uuid=_u(entry.uuid), luid=entry.luid)
        if self.state is None:
            return 0, b""
        if entry.restore_pending:
            entry.restore_pending = False
            saved = self.state.load(entry)
            if saved is None:
                log.warning("log %s/%d reconnected without saved sync state: regions out of "
                            "sync now may not be resynced before the next resume",
                            _u(entry.uuid), entry.luid)
            else:
                changed = dlog.set_sync_bits(saved)
                log.info("log %s/%d: restored the sync state the kernel knows (%d regions "
                         "changed)", _u(entry.uuid), entry.luid, changed)
        entry.sync_bits = bytearray(dlog.get_sync_bits())
        self.state.save(entry)
        return 0, b""

    def _get_region_size(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        return 0, p.encode_u64(entry.dlog.region_size)

    def _is_clean(self, req: p.OneRegion, entry: LogEntry) -> tuple[int, bytes]:
        return 0, _ONE8 if entry.dlog.is_clean(req.region) else _ZERO8

    def _in_sync(self, req: p.OneRegion, entry: LogEntry) -> tuple[int, bytes]:
        return 0, _ONE8 if entry.dlog.in_sync(req.region) else _ZERO8

    def _flush(self, req: p.RegionList, entry: LogEntry) -> tuple[int, bytes]:
        if req.regions:
            entry.dlog.mark_regions(req.regions)
            entry.touched = True
        return 0, b""

    def _mark(self, req: p.RegionList, entry: LogEntry) -> tuple[int, bytes]:
        entry.dlog.mark_regions(req.regions)
        entry.touched = True
        return 0, b""

    def _clear(self, req: p.RegionList, entry: LogEntry) -> tuple[int, bytes]:
        entry.dlog.clear_regions(req.regions)
        entry.touched = True
        return 0, b""

    def _get_resync_work(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        region = entry.dlog.get_resync_work()
        if region is None:
            return 0, _NO_WORK
        return 0, p.encode_resync_work(True, region)

    def _set_region_sync(self, req: p.SetRegionSync, entry: LogEntry) -> tuple[int, bytes]:
        entry.dlog.set_region_sync(req.region, req.in_sync)
        entry.touched = True
        if not req.in_sync and req.region < entry.watermark:
            entry.watermark = req.region
        bits = entry.sync_bits
        if self.state is not None and bits:
            byte, mask = req.region >> 3, 1 << (req.region & 7)
            old = bits[byte]
            new = old | mask if req.in_sync else old & ~mask
            if new != old:
                bits[byte] = new
                self.state.save(entry)
        return 0, b""

    def _get_sync_count(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        return 0, p.encode_u64(entry.dlog.get_sync_count())

    def _status_info(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        return 0, p.encode_status(entry.dlog.status_info())

    def _status_table(self, req: Any, entry: LogEntry) -> tuple[int, bytes]:
        return 0, p.encode_status(entry.dlog.status_table())

    def _is_remote_recovering(self, req: p.OneRegion,
                              entry: LogEntry) -> tuple[int, bytes]:
        # One node: nobody else recovers; local recovery is the region hash's job.
        if req.region >= entry.dlog.region_count:
            return -errno.EINVAL, b""
        return 0, p.encode_remote_recovering(False, entry.in_sync_hint())

    # -- status ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Status of every log (call with ``self.lock`` held when serving)."""
        logs = []
        for entry in self.logs.values():
            d = entry.dlog
            counts = d.counts() if hasattr(d, "counts") else None
            sync_count = counts.sync_count if counts is not None else d.get_sync_count()
            dirty = counts.dirty_count if counts is not None else None
            logs.append({
                "uuid": _u(entry.uuid),
                "luid": entry.luid,
                "type": entry.type_name,
                "region_size": d.region_size,
                "regions": d.region_count,
                "in_sync": sync_count,
                "dirty": dirty,
                "resumed": entry.resumed,
                "constructor": entry.ctr_string,
                "requests": {RT(t).name: n for t, n in enumerate(entry.counts) if n and t},
                "errors": entry.errors,
                "latency": entry.latency_percentiles(),
            })
        return {
            "logs": logs,
            "requests": self.requests,
            "errors": self.errors,
            "unknown_log_requests": self.unknown_key,
            "dropped": dict(self.dropped),
        }

    def close_all(self) -> None:
        for entry in list(self.logs.values()):
            self._close(entry)
        self.logs.clear()
        self._by_luid.clear()


def _u(uuid: bytes) -> str:
    return uuid.decode("ascii", "replace")
