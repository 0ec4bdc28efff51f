"""The README's shell examples are run (or listed here as deliberately not run, with
the reason), so they cannot drift: every indented line of README.md is an example;
one that is neither run nor listed fails the test.

Run on the host: the "A replicated device" and "A site that is down for good"
sequences, through the daemon without kernel devices, with the device names of
the examples mapped to files and to a local NBD export (:data:`DEVICES`)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dmrepl.nbd import Export, FileBackend, NbdServer
from dmrepl_testing.daemon import DaemonProcess

REPO = Path(__file__).resolve().parents[2]

#: The sequences run on the host, in README order (a line as written, comment cut).
REPLICATED_DEVICE = [
    'dmrepl create rep --table "0 1 replicator ringbuffer 4 /dev/sdd 0 auto 1048576 '
    'blockdev 2 0 sync blockdev 6 1 async ios 10000 resync_rate 50m"',
    'dmrepl create vol --table "0 2097152 replicator-dev rep 0 0 1 /dev/sdb nolog 0 1 1 '
    'nbd://10.0.0.2:10809/disk core 2 1024 sync"',
    "dmrepl status vol",
    "dmrepl message rep 0 slink message 1 fallbehind ios 0 policy sync",
    "dmrepl remove --wait 60 vol",
    "dmrepl remove rep",
]
SITE_DOWN = [
    "dmrepl message vol 0 device del 1",
    "dmrepl message rep 0 slink del 1",
    "dmrepl remove vol",
]
#: Examples deliberately not run here, with the reason.
NOT_RUN = {
    'dmsetup create m --table "0 N mirror userspace 4 <uuid> clustered-core 1024 nosync '
    '2 /dev/a 0 /dev/b 0"': "a template (N, <uuid>), not a command",
    "tools/demo": "the demo itself (boots a VM); run by hand",
    "tools/test": "the whole test suite itself",
    ".venv/bin/python -m pytest -p no:cacheprovider tests/unit tests/sim -m slow -s -q":
        "the slow tier itself, run on its own",
    "ulogd run --realtime 50 &": "needs root and dm-log-userspace: tests/kernel/test_ulogd.py",
    'dmsetup create m --table "0 2097152 mirror userspace 4 MYUUID clustered-core 1024 '
    'nosync 2 /dev/sdb 0 /dev/sdc 0"': "needs root and dm-mirror: tests/kernel/test_ulogd.py",
    "ulogd status": "needs a running ulogd (kernel): tests/kernel/test_ulogd.py",
    "ulogd status --json": "needs a running ulogd (kernel): tests/kernel/test_ulogd.py",
    "dmrepl daemon &": "started by this test (DaemonProcess, without kernel devices)",
    "mkfs.ext4 /dev/mapper/vol": "needs /dev/mapper (root, kernel): tests/kernel/"
                                 "test_dmrepl_fs.py makes a filesystem on a device",
    "tools/vmtest -- uname -r": "the VM runner itself",
    "dmrepl status": "status lines: tests/sim/test_status_progress.py, test_daemon_cli.py",
    "dmrepl events --now": "tests/sim/test_daemon_events.py; in the VM with a link cut: "
                           "tests/kernel/test_dmrepl_events.py",
    "dmrepl daemon --metrics 127.0.0.1:9134 &": "tests/sim/test_metrics.py scrapes a "
                                                "daemon started with --metrics",
    "tools/vmtest -- .venv/bin/python -m pytest tests/kernel -q --require-kernel":
        "the kernel tier itself",
}
#: The device names of the examples -> what stands for them here (set per test).
DEVICES = {"/dev/sdd": "log", "/dev/sdb": "local",
           "nbd://10.0.0.2:10809/disk": "nbd+unix:///disk?socket={site}"}


def readme_examples() -> list[str]:
    out = []
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("    ") and line.strip():
            out.append(line.split("  #")[0].strip())
    return out


def test_every_readme_example_is_run_or_listed() -> None:
    known = set(REPLICATED_DEVICE) | set(SITE_DOWN) | set(NOT_RUN)
    examples = readme_examples()
    unknown = [e for e in examples if e not in known]
    assert not unknown, f"README examples neither run nor listed in NOT_RUN: {unknown}"
    stale = known - set(examples)
    assert not stale, f"listed here but no longer in the README: {stale}"


@pytest.fixture
def daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    devices = {}
    for dev, name in DEVICES.items():
        if dev.startswith("/dev/"):
            path = tmp_path / name
            with open(path, "wb") as f:
                f.truncate(1 << 30)          # sparse: the examples' 1 GiB devices
            devices[dev] = str(path)
    remote = tmp_path / "remote"
    with open(remote, "wb") as f:
        f.truncate(1 << 30)
    site_sock = str(tmp_path / "site.sock")
    devices["nbd://10.0.0.2:10809/disk"] = DEVICES["nbd://10.0.0.2:10809/disk"].format(
        site=site_sock)
    backend = FileBackend(str(remote))
    with NbdServer(site_sock) as site:
        site.add_export(Export("disk", backend))
        d = DaemonProcess(tmp_path / "d", kernel_devices=False).start()
        try:
            yield d, devices
        finally:
            assert d.stop() == 0, d.log()
            backend.close()


def run_example(d: DaemonProcess, devices: dict[str, str], line: str) -> None:
    for dev, stand_in in devices.items():
        line = line.replace(dev, stand_in)
    argv = shlex.split(line)
    assert argv[0] == "dmrepl"
    r = d.cli(*argv[1:])
    assert r.returncode == 0, (line, r.returncode, r.stderr, d.log())


def test_readme_replicated_device(daemon) -> None:  # type: ignore[no-untyped-def]
    d, devices = daemon
    for line in REPLICATED_DEVICE:
        run_example(d, devices, line)
    assert d.cli("ls").stdout.strip() == "No devices found"


def test_readme_site_down_way_out(daemon) -> None:  # type: ignore[no-untyped-def]
    d, devices = daemon
    for line in REPLICATED_DEVICE[:2]:
        run_example(d, devices, line)
    for line in SITE_DOWN:
        run_example(d, devices, line)
    assert "vol" not in d.cli("ls").stdout
