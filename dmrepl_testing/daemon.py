"""Run a dmrepl daemon as a child process (tests, demo, benchmark).

Readiness is the ready file (written after the control socket listens and the
persisted objects are recreated), never a sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The source tree's root: where ``dmrepl_testing`` (this harness, not installed) is.
REPO_ROOT = Path(__file__).resolve().parents[1]


def harness_env() -> dict[str, str]:
    """The environment for a child the harness starts: the source tree's root on
    ``PYTHONPATH``, so that ``--engine sim`` can import the simulation engine
    wherever the child runs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class DaemonProcess:
    def __init__(self, workdir: str | Path, *, kernel_devices: bool = True,
                 engine: str = "auto", log_name: str = "daemon.log",
                 tuning: dict[str, Any] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.tuning = dict(tuning or {})
        self.extra_args = extra_args  # more `dmrepl daemon` options
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.workdir / "control.sock")
        self.state_dir = str(self.workdir / "state")
        self.ready_file = str(self.workdir / "ready")
        logdir = os.environ.get("DMREPL_DAEMON_LOG_DIR")   # e.g. a host-visible dir in the VM
        self.log_path = (Path(logdir) / f"{os.getpid()}-{self.workdir.name}-{log_name}"
                         if logdir else self.workdir / log_name)
        self.kernel_devices = kernel_devices
        self.engine = engine
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def nbd_socket(self) -> str:
        return os.path.join(self.state_dir, "nbd.sock")

    def start(self, timeout: float = 180) -> DaemonProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ready_file)
        argv = [sys.executable, "-m", "dmrepl.cli.main", "--socket", self.socket, "daemon",
                "--state-dir", self.state_dir, "--ready-file", self.ready_file,
                "--engine", self.engine]
        if not self.kernel_devices:
            argv.append("--no-kernel-devices")
        for key, value in self.tuning.items():
            argv += ["--tuning", f"{key}={int(value) if isinstance(value, bool) else value}"]
        argv += self.extra_args
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     env=harness_env())
        log.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.ready_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"daemon not ready in {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``dmrepl --socket S ARGV...`` run in this process (``run()(argv)``): a new
        Python per command costs a minute in a loaded TCG VM.  Not thread-safe
        (stdout/stderr are redirected)."""
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from dmrepl.cli.main import run
        full = ["--socket", self.socket, *argv]
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = run()(full)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
        return subprocess.CompletedProcess(["dmrepl", *full], code, out.getvalue(),
                                           err.getvalue())

    def cli_process(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The same through a real ``python -m dmrepl.cli.main`` process."""
        return subprocess.run([sys.executable, "-m", "dmrepl.cli.main", "--socket",
                               self.socket, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait for the clean shutdown.  A daemon that does not stop
        in time dumps its threads' stacks into its log (SIGUSR1: faulthandler)
        before it is killed, and the error carries the log's tail."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)
                # the dump is written by the signal handler itself; give it a moment
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
                self.proc.kill()
                self.proc.wait(30)
                raise TimeoutError(f"daemon did not stop within {timeout}s of SIGTERM; "
                                   f"its log:\n{self.log()}") from None
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- kernel lab: loop-backed dm disks and remote sites in network namespaces -----

def trace(msg: str) -> None:
    """Progress lines for slow VM runs (DMREPL_TRACE=1, pytest -s)."""
    if os.environ.get("DMREPL_TRACE"):
        print(f"[trace {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class KernelLab:
    """Creates what kernel tests and the demo need, and removes it all on close().

    * :meth:`disk`: a dm ``linear`` device over a loop device over a file in $TMPDIR.
    * :meth:`site`: a remote site in its own network namespace, joined by a veth
      pair with netem on it, exporting a disk over NBD/TCP with qemu-nbd.
    """

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"{os.getpid() % 100000}"
        self._cleanup: list[tuple[str, object]] = []
        self._sites = 0

    def _push(self, what: str, fn: object) -> None:
        self._cleanup.append((what, fn))

    def close(self) -> None:
        errors = []
        while self._cleanup:
            what, fn = self._cleanup.pop()
            try:
                fn()  # type: ignore[operator]
            except Exception as e:   # keep cleaning up; report at the end
                errors.append(f"{what}: {e}")
        if errors:
            raise RuntimeError("cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> KernelLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def disk(self, name: str, size_mb: int) -> str:
        from dmrepl.dm import DmControl, Target
        tmp = os.environ.get("TMPDIR", "/tmp")
        backing = os.path.join(tmp, f"{name}.img")
        with open(backing, "wb") as f:
            f.truncate(size_mb << 20)
        self._push(f"unlink {backing}", lambda: os.unlink(backing))
        loop = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                              capture_output=True, text=True).stdout.strip()
        self._push(f"losetup -d {loop}",
                   lambda: subprocess.run(["losetup", "-d", loop], check=True))
        trace(f"disk {name}: {loop}")
        dm = DmControl()
        dm.create_device(name, [Target(0, (size_mb << 20) // 512, "linear", f"{loop} 0")])
        self._push(f"dm remove {name}", lambda: _dm_remove(name))
        return dm.ensure_node(name)

    def site(self, disks: str | list[str], *, delay_ms: float = 20,
             loss: float = 0) -> RemoteSite:
        self._sites += 1
        site = RemoteSite(f"{self.tag}-{self._sites}", self._sites,
                          [disks] if isinstance(disks, str) else disks, delay_ms, loss)
        self._push(f"site {site.ns}", site.close)
        trace(f"site {site.ns} starting")
        site.start()
        trace(f"site {site.ns} up at {site.url}")
        return site


def _dm_remove(name: str) -> None:
    from dmrepl.dm import DmControl
    dm = DmControl()
    for _ in range(100):
        try:
            if dm.exists(name):
                dm.remove(name)
            break
        except OSError:
            time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/mapper/{name}")


def _create_netns(name: str) -> None:
    """``netns.create`` without pyroute2's helper process (slow under TCG): a forked
    child unshares its network namespace and pyroute2 ``netns.attach`` pins it."""
    import ctypes

    from pyroute2 import netns
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.fork()
    if pid == 0:   # child: no Python-level cleanup, just the two syscalls
        code = 1
        try:
            if libc.unshare(0x40000000) == 0:   # CLONE_NEWNET
                netns.attach(name, os.getpid())
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"cannot create network namespace {name}")


class RemoteSite:
    """A second site: netns + veth (netem on the link) + qemu-nbd exporting ``disk``."""

    PORT = 10809

    def __init__(self, tag: str, index: int, disks: list[str], delay_ms: float,
                 loss: float) -> None:
        self.ns = f"dmrepl-site-{tag}"
        self.host_if = f"drh{tag}"[:15]
        self.site_if = f"drs{tag}"[:15]
        self.host_ip = f"10.77.{index}.1"
        self.site_ip = f"10.77.{index}.2"
        self.disks = disks
        self.delay_ms = delay_ms
        self.loss = loss
        tmp = os.environ.get("TMPDIR", "/tmp")
        self.pid_files = [os.path.join(tmp, f"{self.ns}-{i}.pid") for i in range(len(disks))]
        self.export = "remote"
        self._taken = 0

    def take(self, n: int = 1) -> list[int]:
        """Indexes of ``n`` disks no one took before (a shared site's pool)."""
        if self._taken + n > len(self.disks):
            raise RuntimeError(f"site {self.ns}: {n} more disks wanted, "
                               f"{len(self.disks) - self._taken} left")
        self._taken += n
        return list(range(self._taken - n, self._taken))

    def reset(self, delay_ms: float = 20) -> None:
        """Link up, netem back to ``delay_ms`` without loss (after a test that
        cut or slowed it)."""
        if not self.link_up():
            self.restore()
        if (self.delay_ms, self.loss) != (delay_ms, 0):
            self.netem(delay_ms)

    def link_up(self) -> bool:
        from pyroute2 import IPRoute
        with IPRoute() as ip:
            idx = ip.link_lookup(ifname=self.host_if)[0]
            return bool(ip.get_links(idx)[0].get("flags", 0) & 1)   # IFF_UP

    def url_of(self, i: int) -> str:
        """The nbd:// URL of the i-th disk (qemu-nbd on port PORT+i)."""
        return f"nbd://{self.site_ip}:{self.PORT + i}/{self.export}"

    @property
    def url(self) -> str:
        return self.url_of(0)

    def _in_ns(self) -> Any:
        """An IPRoute socket opened inside the site's namespace (setns in this thread;
        pyroute2's NetNS forks a helper, which is too slow under TCG)."""
        from pyroute2 import IPRoute, netns
        netns.pushns(self.ns)
        try:
            return IPRoute()
        finally:
            netns.popns()

    def start(self) -> None:
        import pyroute2.config
        from pyroute2 import IPRoute
        pyroute2.config.default_communicate_timeout = 60
        _create_netns(self.ns)
        trace(f"site {self.ns}: namespace created")
        with IPRoute() as ip:
            ip.link("add", ifname=self.host_if, kind="veth", peer=self.site_if)
            host = ip.link_lookup(ifname=self.host_if)[0]
            site = ip.link_lookup(ifname=self.site_if)[0]
            ip.link("set", index=site, net_ns_fd=self.ns)
            ip.addr("add", index=host, address=self.host_ip, prefixlen=24)
            ip.link("set", index=host, state="up")
        with self._in_ns() as nsip:
            lo = nsip.link_lookup(ifname="lo")[0]
            nsip.link("set", index=lo, state="up")
            site = nsip.link_lookup(ifname=self.site_if)[0]
            nsip.addr("add", index=site, address=self.site_ip, prefixlen=24)
            nsip.link("set", index=site, state="up")
        self.netem(self.delay_ms, self.loss, add=True)
        trace(f"site {self.ns}: link up; starting qemu-nbd")
        # one qemu-nbd per disk, started together (each takes seconds under TCG);
        # with --fork each parent exits once its server listens
        procs = [subprocess.Popen(["ip", "netns", "exec", self.ns, "qemu-nbd", "--fork",
                                   "--persistent", "--shared=8", "-f", "raw", "--cache=none",
                                   "-x", self.export, "-b", self.site_ip,
                                   "-p", str(self.PORT + i), "--pid-file", self.pid_files[i],
                                   disk], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for i, disk in enumerate(self.disks)]
        failed = []
        for i, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                failed.append(f"disk {self.disks[i]}: {out.decode(errors='replace').strip()}")
        if failed:
            raise RuntimeError("qemu-nbd failed: " + "; ".join(failed))

    def netem(self, delay_ms: float, loss: float = 0, add: bool = False) -> None:
        """Delay (one way, host -> site and back) and loss (percent) on the link."""
        from pyroute2 import IPRoute
        self.delay_ms, self.loss = delay_ms, loss
        half = int(delay_ms * 1000 / 2)
        with IPRoute() as ip:
            idx = ip.link_lookup(ifname=self.host_if)[0]
            ip.tc("add" if add else "change", "netem", idx, delay=half, loss=loss)
        with self._in_ns() as nsip:
            idx = nsip.link_lookup(ifname=self.site_if)[0]
            nsip.tc("add" if add else "change", "netem", idx, delay=half)

    def _set_link(self, state: str) -> None:
        from pyroute2 import IPRoute
        with IPRoute() as ip:
            idx = ip.link_lookup(ifname=self.host_if)[0]
            ip.link("set", index=idx, state=state)
            if state == "up":
                with contextlib.suppress(Exception):
                    ip.addr("add", index=idx, address=self.host_ip, prefixlen=24)

    def cut(self) -> None:
        self._set_link("down")

    def restore(self) -> None:
        self._set_link("up")
        # the route comes back with the link; wait until the site answers TCP
        import socket
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((self.site_ip, self.PORT), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        from pyroute2 import IPRoute, netns
        for pid_file in self.pid_files:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                with open(pid_file) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):       # wait until it let go of the disk
                    os.kill(pid, 0)
                    time.sleep(0.05)
        with IPRoute() as ip:
            for idx in ip.link_lookup(ifname=self.host_if):
                ip.link("del", index=idx)
        netns.remove(self.ns)


def converged(st: dict[str, Any]) -> bool:
    """Every site link up, in sync, and has applied and flushed every logged write.

    As the engine's own ``drained()``: every logged entry counts, up to the ring's
    ``next_seq - 1``, not only the committed ones (``durable_seq``): without
    durable acks a write returns before its entry is committed, and the copiers
    apply only committed entries.  ``lag_ios`` must be 0 too (the engine rebuilds
    it from the replayed entries when a log is reopened after a crash)."""
    last = st["ring"]["next_seq"] - 1
    return st["ring"]["durable_seq"] >= last and all(
        s["state"] == "up" and s["consistent"] and not s["resyncing"]
        and s["applied_seq"] >= last and s["durable_seq"] >= last and s["lag_ios"] == 0
        for s in st["slinks"].values())


# -- a replicated setup: log/local/remote disks, a site, a replicator, devices ---

class Replicated:
    """``ndev`` devices NAME-0.. in replicator NAME-rep, local + remote (site link 1).

    The remote site is a new one (its own namespace, link and disks), or the disks
    ``site_disks`` of a running ``site`` (shared between tests: each test takes
    disks of its own, see :meth:`RemoteSite.take`).  ``structure``: each
    device's ``dmrepl create --structure``."""

    def __init__(self, lab: KernelLab, daemon: DaemonProcess, name: str, *,
                 size_mb: int = 64, log_mb: int = 32, remote_policy: str = "async ios 1000",
                 delay_ms: float = 20, ndev: int = 1, region_sectors: int = 1024,
                 site: RemoteSite | None = None, site_disks: list[int] | None = None,
                 structure: str = "auto") -> None:
        self.lab, self.daemon, self.name = lab, daemon, name
        self.size_mb = size_mb
        self.log = lab.disk(f"{name}-log", log_mb)
        self.locals = [lab.disk(f"{name}-l{i}", size_mb) for i in range(ndev)]
        if site is None:
            self.remotes = [lab.disk(f"{name}-r{i}", size_mb) for i in range(ndev)]
            self.site = lab.site(self.remotes, delay_ms=delay_ms)
            site_disks = list(range(ndev))
        else:
            assert site_disks is not None and len(site_disks) == ndev
            self.site = site
            self.remotes = [site.disks[i] for i in site_disks]
            if site.delay_ms != delay_ms or site.loss:
                site.netem(delay_ms)
        self.rep = f"{name}-rep"
        self.devs = [f"{name}-{i}" for i in range(ndev)]
        policy = remote_policy.split()
        self.rep_table = (f"0 1 replicator ringbuffer 4 {self.log} 0 auto "
                          f"{(log_mb << 20) // 512 - 8} blockdev 2 0 sync "
                          f"blockdev {1 + len(policy)} 1 {remote_policy}")
        trace(f"create {self.rep}")
        self.check(daemon.cli("create", self.rep, "--table", self.rep_table))
        sectors = (size_mb << 20) // 512
        self.dev_tables = [
            f"0 {sectors} replicator-dev {self.rep} {i} 0 1 {self.locals[i]} nolog 0 "
            f"1 1 {self.site.url_of(site_disks[i])} core 2 {region_sectors} nosync"
            for i in range(ndev)]
        for dev, table in zip(self.devs, self.dev_tables, strict=True):
            trace(f"create {dev}")
            self.check(daemon.cli("create", dev, "--table", table,
                                  *(["--structure", structure] if structure != "auto" else [])))
            trace(f"created {dev}")

    def check(self, proc: subprocess.CompletedProcess[str]) -> str:
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, proc.args))} -> {proc.returncode}: "
                                 f"{proc.stderr}\n{self.daemon.log()}")
        return proc.stdout

    def mapper(self, i: int = 0) -> str:
        return f"/dev/mapper/{self.devs[i]}"

    def status(self) -> dict[str, Any]:
        import json
        out = json.loads(self.check(self.daemon.cli("status", self.rep, "--json")))
        return out[0]["detail"]

    def describe(self, i: int = 0) -> dict[str, Any]:
        """Device ``i``'s ``dmrepl status NAME --json``."""
        import json
        return dict(json.loads(self.check(self.daemon.cli("status", self.devs[i],
                                                           "--json")))[0])

    def slink(self, nr: int = 1) -> dict[str, Any]:
        return self.status()["slinks"][str(nr)]

    def wait_for(self, what: str, pred: Any, timeout: float = 120,
                 interval: float = 0.2) -> dict[str, Any]:
        """Poll the replicator status until ``pred(status)``; fail with the last status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if pred(st):
                return st
            trace(f"waiting for {what}: {st['slinks']}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {st['slinks']}")
            time.sleep(interval)

    def journals_in_sync(self) -> bool:
        """Every device's kernel mirror has every region in its journal leg, and
        every kernel journal is drained (true for a device that is neither)."""
        import json
        for dev in self.devs:
            desc = json.loads(self.check(self.daemon.cli("status", dev, "--json")))[0]
            journal = desc.get("journal")
            if journal is not None and journal["in_sync"] < journal["regions"]:
                trace(f"{dev}: journal leg {journal}")
                return False
            remote_leg = desc.get("remote_leg")
            if remote_leg is not None and not remote_leg["in_sync"]:
                trace(f"{dev}: remote leg {remote_leg}")
                return False
            kjournal = desc.get("kernel_journal")
            if kjournal is not None and not kjournal["drained"]:
                trace(f"{dev}: kernel journal {kjournal}")
                return False
        return True

    def wait_converged(self, timeout: float = 180) -> dict[str, Any]:
        """The remote site equals the local devices: every device's mirror is in
        sync (what it missed is in the log) and the log is copied everywhere."""
        deadline = time.monotonic() + timeout
        while not self.journals_in_sync():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the mirrors' journal legs")
            time.sleep(0.2)
        return self.wait_for("remote in sync", converged,
                             max(1.0, deadline - time.monotonic()))

    def __enter__(self) -> Replicated:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.remove()
        else:       # the test failed: clean up what can go, keep its error
            for name in [*self.devs, self.rep]:
                self.daemon.cli("remove", name, "--wait", "10")

    def remove(self, wait: float = 120) -> None:
        """Remove the devices and the replicator (waiting up to ``wait`` seconds for
        their writes to drain); fails with the CLI's error if one stays."""
        for name in [*self.devs, self.rep]:
            self.check(self.daemon.cli("remove", name, "--wait", str(wait)))
