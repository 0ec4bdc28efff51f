"""Prometheus text endpoints of both daemons (``--metrics ADDR:PORT``; off by default).

Collectors read the daemons' status snapshots at scrape time: nothing is counted
on the write path for them.  Each metric mirrors a field of ``dmrepl status
--json`` / ``ulogd status --json`` (named in its help text), so a dashboard and
the CLI never disagree."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dmrepl.errors import UserError
from dmrepl.nbd.latency import LatencySnapshot

Snapshot = Callable[[], Any]
#: :meth:`dmrepl.nbd.server.NbdServer.latency_snapshot`
LatencySnapshots = Callable[[], Mapping[tuple[str, str], LatencySnapshot]]


def parse_listen(text: str, option: str = "--metrics") -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6addr]:PORT`` for IPv6); port 0: any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UserError(f"{option} {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9612")
    return host.strip("[]"), int(port)


class MetricsServer:
    """The HTTP endpoint (``/metrics``) over one registry holding ``collectors``."""

    def __init__(self, listen: str, collectors: Iterable[Collector]) -> None:
        host, port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        for c in collectors:
            self.registry.register(c)
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise UserError(f"--metrics {listen}: cannot listen: {e.strerror or e}") from e
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def ratio(part: int, whole: int) -> float:
    return 1.0 if whole == 0 else part / whole


class DmreplCollector(Collector):
    """Site links and devices of every replicator, from the daemon's status op;
    NBD request latencies per export and command, from the NBD server's
    histograms (``nbd_latency``; None: a daemon without an NBD server)."""

    def __init__(self, status: Snapshot, nbd_latency: LatencySnapshots | None = None) -> None:
        self._status = status
        self._nbd_latency = nbd_latency

    def collect(self) -> Iterator[Metric]:
        sl = ["replicator", "slink"]
        g = {
            "up": GaugeMetricFamily("dmrepl_slink_up", "1: the site link is up (state)", labels=sl),
            "forced": GaugeMetricFamily("dmrepl_slink_forced_sync",
                                        "1: in forced sync (forced_sync)", labels=sl),
            "lag_w": GaugeMetricFamily("dmrepl_slink_lag_writes",
                                       "writes not yet applied (lag_writes)", labels=sl),
            "lag_b": GaugeMetricFamily("dmrepl_slink_lag_bytes",
                                       "bytes not yet applied (lag_bytes)", labels=sl),
            "lag_s": GaugeMetricFamily("dmrepl_slink_lag_seconds",
                                       "age of the oldest write not yet applied (lag_seconds)",
                                       labels=sl),
            "sync": GaugeMetricFamily("dmrepl_slink_in_sync_ratio",
                                      "regions in sync / regions (regions_in_sync / regions)",
                                      labels=sl),
            "oos": GaugeMetricFamily("dmrepl_slink_out_of_sync_bytes",
                                     "bytes to resynchronise (bytes_out_of_sync)", labels=sl),
            "resyncing": GaugeMetricFamily("dmrepl_slink_resyncing", "1: resynchronising",
                                           labels=sl),
            "rate": GaugeMetricFamily("dmrepl_slink_resync_rate_bytes_per_second",
                                      "measured resync rate (resync_rate_bps; absent: none)",
                                      labels=sl),
            "eta": GaugeMetricFamily("dmrepl_slink_resync_eta_seconds",
                                     "resync time left at the measured rate "
                                     "(resync_eta_seconds; absent: no rate)", labels=sl),
        }
        c = {
            "copied": CounterMetricFamily("dmrepl_slink_copied_bytes",
                                          "bytes copied (copied_bytes)", labels=sl),
            "resynced": CounterMetricFamily("dmrepl_slink_resync_bytes",
                                            "bytes resynchronised (resync_bytes)", labels=sl),
            "drops": CounterMetricFamily("dmrepl_slink_drops",
                                         "ring-full drops (drops)", labels=sl),
        }
        dl = ["device", "replicator", "dev_nr", "slink"]
        dq = GaugeMetricFamily("dmrepl_device_queued_writes",
                               "the device's writes queued for the site link", labels=dl)
        ds = GaugeMetricFamily("dmrepl_device_in_sync_ratio",
                               "the device's regions in sync on the site link", labels=dl)
        for obj in self._status():
            detail = obj.get("detail")
            if obj.get("type") == "replicator" and isinstance(detail, dict):
                slinks = detail.get("slinks")
                if not isinstance(slinks, dict):
                    continue  # not the replicator engine (the test-only sim's list)
                for nr, s in slinks.items():
                    if "lag_writes" not in s:
                        continue  # not the replicator engine (the test-only sim)
                    lv = [obj["name"], str(nr)]
                    g["up"].add_metric(lv, 1.0 if s["state"] == "up" else 0.0)
                    g["forced"].add_metric(lv, float(s["forced_sync"]))
                    g["lag_w"].add_metric(lv, s["lag_writes"])
                    g["lag_b"].add_metric(lv, s["lag_bytes"])
                    g["lag_s"].add_metric(lv, s["lag_seconds"])
                    g["sync"].add_metric(lv, ratio(s["regions_in_sync"], s["regions"]))
                    g["oos"].add_metric(lv, s["bytes_out_of_sync"])
                    g["resyncing"].add_metric(lv, float(s["resyncing"]))
                    if s["resync_rate_bps"] is not None:
                        g["rate"].add_metric(lv, s["resync_rate_bps"])
                    if s["resync_eta_seconds"] is not None:
                        g["eta"].add_metric(lv, s["resync_eta_seconds"])
                    c["copied"].add_metric(lv, s["copied_bytes"])
                    c["resynced"].add_metric(lv, s["resync_bytes"])
                    c["drops"].add_metric(lv, s["drops"])
            elif isinstance(detail, list):
                for dev in detail:
                    for nr, leg in dev.get("slinks", {}).items():
                        if "queued_writes" not in leg:
                            continue
                        lv = [obj["name"], str(dev.get("replicator", "")),
                              str(dev.get("dev_nr", "")), str(nr)]
                        dq.add_metric(lv, leg["queued_writes"])
                        if "regions" in leg:
                            ds.add_metric(lv, ratio(leg["regions_in_sync"], leg["regions"]))
        yield from g.values()
        yield from c.values()
        yield dq
        yield ds
        if self._nbd_latency is not None:
            yield nbd_latency_metric(self._nbd_latency())


def nbd_latency_metric(snapshots: Mapping[tuple[str, str], LatencySnapshot]) -> Metric:
    h = HistogramMetricFamily(
        "dmrepl_nbd_request_latency_seconds",
        "NBD request service time, request header received to reply sent",
        labels=["export", "command"])
    for (export, command), snap in sorted(snapshots.items()):
        h.add_metric([export, command],
                     [(floatToGoString(le), n) for le, n in snap.buckets],
                     snap.sum_seconds)
    return h


class UlogdCollector(Collector):
    """The dirty logs ulogd serves, from its status snapshot."""

    def __init__(self, status: Snapshot) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        snap = self._status()
        ll = ["uuid"]
        regions = GaugeMetricFamily("ulogd_log_regions", "regions of the log", labels=ll)
        in_sync = GaugeMetricFamily("ulogd_log_regions_in_sync", "regions in sync", labels=ll)
        in_sync_ratio = GaugeMetricFamily("ulogd_log_in_sync_ratio", "regions in sync / regions",
                                  labels=ll)
        dirty = GaugeMetricFamily("ulogd_log_dirty_regions", "regions marked dirty",
                                  labels=ll)
        requests = CounterMetricFamily("ulogd_log_requests", "requests served, per type",
                                       labels=["uuid", "type"])
        errors = CounterMetricFamily("ulogd_log_errors", "requests answered with an error",
                                     labels=ll)
        latency = Metric("ulogd_log_request_latency_seconds",
                         "request latency over the recent requests (p50, p99)", "summary")
        for log in snap.get("logs", []):
            lv = [log["uuid"]]
            regions.add_metric(lv, log["regions"])
            in_sync.add_metric(lv, log["in_sync"])
            in_sync_ratio.add_metric(lv, ratio(log["in_sync"], log["regions"]))
            if log.get("dirty") is not None:
                dirty.add_metric(lv, log["dirty"])
            for kind, n in log.get("requests", {}).items():
                requests.add_metric([log["uuid"], kind], n)
            errors.add_metric(lv, log["errors"])
            lat = log.get("latency", {})
            for q, key in (("0.5", "p50_us"), ("0.99", "p99_us")):
                if lat.get(key) is not None:
                    latency.add_sample("ulogd_log_request_latency_seconds",
                                       {"uuid": log["uuid"], "quantile": q}, lat[key] / 1e6)
            latency.add_sample("ulogd_log_request_latency_seconds_count",
                               {"uuid": log["uuid"]}, sum(log.get("requests", {}).values()))
        total = CounterMetricFamily("ulogd_requests", "requests received",
                                    value=snap.get("requests", 0))
        errs = CounterMetricFamily("ulogd_errors", "requests answered with an error",
                                   value=snap.get("errors", 0))
        yield from (regions, in_sync, in_sync_ratio, dirty, requests, errors, latency, total, errs)
