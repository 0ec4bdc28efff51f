"""What each dmrepl subcommand does: talk to the daemon, print the answer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from dmrepl.cli._errors import CliUserError
from dmrepl.cli._status_text import human_lines
from dmrepl.daemon.client import Client, MustBeRoot
from dmrepl.errors import UserError
from dmrepl.eventlog import stdout_reader_gone

Action = Callable[[argparse.Namespace], int | None]


def _client(ns: argparse.Namespace, timeout: float | None = 120) -> Client:
    return Client(ns.socket, timeout=timeout)


def _read_table(ns: argparse.Namespace) -> str:
    if ns.table is not None:
        if ns.file is not None:
            raise CliUserError("give the table either with --table or as FILE, not both")
        return str(ns.table)
    if ns.file in (None, "-"):
        return sys.stdin.read()
    try:
        with open(ns.file) as f:
            return f.read()
    except OSError as e:
        raise CliUserError(f"cannot read table file {ns.file}: {e.strerror}") from e


def create(ns: argparse.Namespace) -> None:
    extra = {} if ns.structure == "auto" else {"structure": ns.structure}
    desc = _client(ns).call("create", name=ns.name, table=_read_table(ns), **extra)
    if desc.get("mapper"):
        if desc.get("structure") == "mirror":
            print(f"{ns.name}: {desc['mapper']} (mirror of the local device and the "
                  f"journal leg {desc['nbd']})")
        elif desc.get("structure") == "raid1":
            remote = desc.get("remote_leg") or {}
            print(f"{ns.name}: {desc['mapper']} (raid1 of the local device and the remote "
                  f"{remote.get('url')} as {remote.get('device')})")
        elif desc.get("structure") == "log-writes":
            print(f"{ns.name}: {desc['mapper']} (kernel journal of the local device: "
                  "log-writes, drained by the daemon)")
        else:
            print(f"{ns.name}: {desc['mapper']} (over {desc['nbd']})")
    elif desc.get("type") == "replicator-dev":
        print(f"{ns.name}: NBD export {desc['export']!r}")


def load(ns: argparse.Namespace) -> None:
    _client(ns).call("load", name=ns.name, table=_read_table(ns))


def simple(op: str) -> Action:
    def action(ns: argparse.Namespace) -> None:
        _client(ns).call(op, name=ns.name)
    action.__name__ = op
    return action


def remove(ns: argparse.Namespace) -> None:
    wait = max(0.0, ns.wait)
    force_drain = 60 if ns.force else 0   # the local copies a forced removal waits for
    _client(ns, timeout=120 + wait + force_drain).call("remove", name=ns.name, wait=wait,
                                                       force=ns.force)


def message(ns: argparse.Namespace) -> None:
    out = _client(ns).call("message", name=ns.name, sector=ns.sector, args=ns.message)
    if out:
        print(out)


def _targets(desc: dict[str, Any], texts: list[str]) -> list[str]:
    lines = []
    for line, text in zip(desc["table"], texts, strict=False):
        start, length, target = line.split()[:3]
        lines.append(f"{start} {length} {target} {text}".rstrip())
    return lines


def status(ns: argparse.Namespace) -> None:
    result = _client(ns).call("status", name=ns.name,
                              kind="table" if ns.table_status else "info")
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    for desc in result:
        for line in _targets(desc, desc["status"]):
            print(f"{desc['name']}: {line}" if ns.name is None else line)
        if not ns.table_status:
            for line in human_lines(desc):
                print(line)


def table(ns: argparse.Namespace) -> None:
    for desc in _client(ns).call("table", name=ns.name):
        for line in desc["table"]:
            print(f"{desc['name']}: {line}" if ns.name is None else line)


def ls(ns: argparse.Namespace) -> None:
    result = _client(ns).call("ls")
    if not result:
        print("No devices found")
    for desc in result:
        extra = ""
        if desc["type"] == "replicator-dev":
            where = desc.get("mapper") or f"nbd export {desc['export']}"
            extra = f"\t{where}\treplicator={desc['replicator']}"
            if desc.get("suspended"):
                extra += "\tSUSPENDED"
        print(f"{desc['name']}\t{desc['type']}{extra}")


def wait(ns: argparse.Namespace) -> None:
    timeout = None if ns.timeout is None else ns.timeout + 30
    print(_client(ns, timeout=timeout).call("wait", name=ns.name, event_nr=ns.event_nr,
                                            timeout=ns.timeout))


#: Seconds ``events`` waits for an event before checking its reader is still there.
EVENTS_IDLE_CHECK = 1.0


def events(ns: argparse.Namespace) -> int:
    """One JSON object a line, flushed each: a pipe (``| head -3``) ends it quietly,
    also while no event comes."""
    stream = _client(ns, timeout=30).stream("events", idle=EVENTS_IDLE_CHECK,
                                            name=ns.name, now=ns.now)
    try:
        for event in stream:
            if event is None:
                if stdout_reader_gone():
                    break
                continue
            sys.stdout.write(json.dumps(event, separators=(", ", ": ")) + "\n")
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away: nothing more to say, and nothing to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def daemon(ns: argparse.Namespace) -> int:
    from dmrepl.daemon.run import run_daemon
    from dmrepl.metrics import parse_listen
    from dmrepl.nbd.server import NbdLimits
    from dmrepl.tuning import parse_tuning
    try:
        tuning = parse_tuning(ns.tuning)
        if ns.metrics is not None:
            parse_listen(ns.metrics)
    except UserError as e:
        raise CliUserError(str(e)) from None
    if not ns.no_kernel_devices and os.geteuid() != 0:
        raise MustBeRoot("`dmrepl daemon` makes /dev/nbdN and /dev/mapper devices (without "
                         "root: --no-kernel-devices, and a --state-dir and --socket of yours)")
    for flag in ("nbd_max_connections", "nbd_handshake_timeout", "nbd_idle_timeout"):
        value = getattr(ns, flag)
        if value is not None and value <= 0:
            raise CliUserError(f"--{flag.replace('_', '-')} must be > 0")
    limits = NbdLimits(max_connections=ns.nbd_max_connections,
                       handshake_timeout=ns.nbd_handshake_timeout,
                       idle_timeout=ns.nbd_idle_timeout)
    return run_daemon(ns.socket, ns.state_dir, ns.ready_file,
                      kernel_devices=not ns.no_kernel_devices, engine=ns.engine, tuning=tuning,
                      nbd_limits=limits, metrics=ns.metrics, log_level=ns.log_level)
