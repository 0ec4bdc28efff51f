"""Prometheus endpoints of both daemons (issue 13 point 3): scraped over HTTP on
an ephemeral localhost port, each metric checked against the status JSON it
mirrors.  The collectors read the status at scrape time."""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmrepl.daemon._engine import load_engine
from dmrepl.daemon.daemon import Daemon
from dmrepl.errors import UserError
from dmrepl.metrics import DmreplCollector, MetricsServer, UlogdCollector, parse_listen
from dmrepl.nbd.client import NbdStore
from dmrepl_testing.daemon import DaemonProcess
from dmrepl_testing.ulogd import FakeKernel
from ulogd.control import query
from ulogd.main import Daemon as Ulogd
from ulogd.main import main as ulogd_main
from ulogd.protocol import RequestType as RT

MB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def files(tmp: Path, *names: str) -> list[str]:
    out = []
    for n in names:
        with open(tmp / n, "wb") as f:
            f.truncate(MB)
        out.append(str(tmp / n))
    return out


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(str(tmp_path / "state"), kernel_devices=False, engine=load_engine("auto"))
    yield d
    d.shutdown()


def test_dmrepl_metrics_mirror_the_status(daemon: Daemon, tmp_path: Path) -> None:
    log, local, remote = files(tmp_path, "log", "local", "remote")
    with open(log, "r+b") as f:
        f.truncate(4 * MB)
    for name, table in (
            ("rep", f"0 1 replicator ringbuffer 4 {log} 0 auto 8192 blockdev 2 0 async "
                    "blockdev 2 1 async"),
            ("vol", f"0 2048 replicator-dev rep 0 0 1 {local} nolog 0 1 1 {remote} core 2 8 "
                    "nosync")):
        r = daemon.handle({"op": "create", "name": name, "table": table})
        assert r["ok"], r
    rep = daemon.objects["rep"].engine  # type: ignore[attr-defined]
    rep.stop()  # the copies wait: the writes stay queued for both site links
    daemon.objects["vol"].devs[0].write(0, b"\x5a" * 8192)  # type: ignore[attr-defined]
    server = MetricsServer("127.0.0.1:0", [DmreplCollector(daemon.op_status)])
    try:
        got = scrape(server.port)
    finally:
        server.close()
    status = {d["name"]: d for d in daemon.op_status()}
    s1 = status["rep"]["detail"]["slinks"][1]
    lv = (("replicator", "rep"), ("slink", "1"))
    assert got[("dmrepl_slink_up", lv)] == 1.0
    assert got[("dmrepl_slink_lag_writes", lv)] == s1["lag_writes"] == 1
    assert got[("dmrepl_slink_lag_bytes", lv)] == s1["lag_bytes"] == 8192
    assert 0 < got[("dmrepl_slink_lag_seconds", lv)] <= s1["lag_seconds"]  # read later
    assert got[("dmrepl_slink_in_sync_ratio", lv)] == s1["regions_in_sync"] / s1["regions"] < 1
    assert got[("dmrepl_slink_resyncing", lv)] == 0.0
    assert got[("dmrepl_slink_copied_bytes_total", lv)] == s1["copied_bytes"]
    assert ("dmrepl_slink_resync_eta_seconds", lv) not in got  # no rate: no ETA
    leg = status["vol"]["detail"][0]["slinks"][1]
    dl = (("dev_nr", "0"), ("device", "vol"), ("replicator", "rep"), ("slink", "1"))
    assert got[("dmrepl_device_queued_writes", dl)] == leg["queued_writes"] == 1
    assert got[("dmrepl_device_in_sync_ratio", dl)] == (256 - 2) / 256
    rep.start()


def test_ulogd_metrics_mirror_the_status(tmp_path: Path) -> None:
    kernel = FakeKernel()
    control = str(tmp_path / "control")
    ulogd = Ulogd(kernel.transport(), control_path=control)
    thread = threading.Thread(target=ulogd.serve, daemon=True)
    thread.start()
    server = MetricsServer("127.0.0.1:0", [UlogdCollector(ulogd.status_snapshot)])
    try:
        uuid = b"METRICS-UUID-1"
        assert kernel.ctr(uuid, 1, "8192 core 1024 nosync").error == 0
        assert kernel.simple(uuid, 1, RT.RESUME).error == 0
        assert kernel.regions(uuid, 1, RT.MARK_REGION, [3, 4]).error == 0
        assert kernel.simple(uuid, 1, RT.FLUSH).error == 0
        got = scrape(server.port)
        [lg] = query(control)["logs"]
    finally:
        server.close()
        ulogd.request_stop()
        thread.join(10)
        kernel.close()
    u = (("uuid", "METRICS-UUID-1"),)
    assert got[("ulogd_log_regions", u)] == lg["regions"] == 8
    assert got[("ulogd_log_regions_in_sync", u)] == lg["in_sync"]
    assert got[("ulogd_log_dirty_regions", u)] == lg["dirty"] == 2
    assert got[("ulogd_log_requests_total", (("type", "MARK_REGION"), ("uuid",
                                                                     "METRICS-UUID-1")))] == 1
    for q in ("0.5", "0.99"):
        assert got[("ulogd_log_request_latency_seconds", (("quantile", q), *u))] > 0
    assert got[("ulogd_requests_total", ())] >= 4


def test_listen_address_grammar() -> None:
    assert parse_listen("127.0.0.1:9612") == ("127.0.0.1", 9612)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9612", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(UserError):
            parse_listen(bad)
    with pytest.raises(SystemExit) as e:
        ulogd_main(["run", "--metrics", "nope"])
    assert e.value.code == 2


def test_dmrepl_daemon_serves_metrics_with_the_option(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", kernel_devices=False, engine="sim",
                      extra_args=("--metrics", "127.0.0.1:0"))
    d.start()
    try:
        m = re.search(r"metrics: port (\d+)", d.log())
        assert m, d.log()
        assert scrape(int(m.group(1))) is not None
    finally:
        assert d.stop() == 0, d.log()


def test_dmrepl_daemon_serves_nbd_request_latencies(tmp_path: Path) -> None:
    log, local, remote = files(tmp_path, "log", "local", "remote")
    with open(log, "r+b") as f:
        f.truncate(4 * MB)
    d = DaemonProcess(tmp_path / "d", kernel_devices=False, engine="sim",
                      extra_args=("--metrics", "127.0.0.1:0"))
    d.start()
    try:
        for name, table in (
                ("rep", f"0 1 replicator ringbuffer 4 {log} 0 auto 8192 blockdev 2 0 async "
                        "blockdev 2 1 async"),
                ("vol", f"0 2048 replicator-dev rep 0 0 1 {local} nolog 0 1 1 {remote} "
                        "core 2 8 nosync")):
            r = d.cli("create", name, "--table", table)
            assert r.returncode == 0, r.stderr
        store = NbdStore(f"nbd+unix:///vol?socket={d.nbd_socket}", timeout=30)
        try:
            for i in range(3):
                store.pwrite(i * 4096, b"\x5a" * 4096)
            store.flush()
            for i in range(5):
                assert store.pread(i * 4096, 4096)[:1] in (b"\x5a", b"\0")
            store.flush()
        finally:
            store.close()
        m = re.search(r"metrics: port (\d+)", d.log())
        assert m, d.log()
        got = scrape(int(m.group(1)))
    finally:
        assert d.stop() == 0, d.log()
    name = "dmrepl_nbd_request_latency_seconds"
    for command, n in (("write", 3), ("read", 5), ("flush", 2)):
        lv = (("command", command), ("export", "vol"))
        assert got[(f"{name}_count", lv)] == n
        assert got[(f"{name}_sum", lv)] > 0
        buckets = sorted((float(dict(labels)["le"]), v) for (s, labels), v in got.items()
                         if s == f"{name}_bucket"
                         and ("command", command) in labels and ("export", "vol") in labels)
        assert buckets[-1] == (float("inf"), n)
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)      # cumulative
    assert not any(s.startswith(name) and ("command", "trim") in labels
                   for s, labels in got)    # never requested: absent
