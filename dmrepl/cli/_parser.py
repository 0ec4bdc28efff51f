"""The dmrepl command line, as data (stratis-cli style nested tables)."""

from __future__ import annotations

import argparse
from typing import Any

from dmrepl.cli import _actions as act
from dmrepl.cli._exit import epilog
from dmrepl.daemon._engine import ENGINE_CHOICES
from dmrepl.daemon._kernel import STRUCTURES
from dmrepl.daemon.client import default_socket
from dmrepl.logfmt import LOG_LEVELS
from dmrepl.nbd.server import NbdLimits
from dmrepl.numbers import argument, parse_decimal
from dmrepl.osenv import env_or, version
from dmrepl.tuning import TUNABLES, describe

NBD_DEFAULTS = NbdLimits()

Spec = dict[str, Any]

NAME = ("name", {"help": "device name"})
OPT_NAME = ("name", {"nargs": "?", "help": "device name (all devices if omitted)"})

def _messages_epilog() -> str:
    # the engine's own grammar; the tool works without the engine installed
    # (only the daemon needs it), and then has no list to show
    try:
        from dmrepl.replicator.messages import DEVICE_MESSAGES, REPLICATOR_MESSAGES
    except ImportError as e:
        return f"(no list of messages: the replicator engine cannot be imported: {e})"

    def listing(title: str, messages: tuple[tuple[str, str], ...]) -> list[str]:
        return [title, *(f"  {usage}\n      {what}" for usage, what in messages)]
    return "\n".join([*listing("messages of a replicator (sector 0):", REPLICATOR_MESSAGES),
                      *listing("messages of a replicated device (replicator-dev, "
                               "sector 0):", DEVICE_MESSAGES)])


ROOT_SUBCOMMANDS: list[tuple[str, Spec]] = [
    ("create", {
        "help": "create a replicator or a replicated device from a table",
        "args": [NAME, ("file", {"nargs": "?", "help": "table file ('-': stdin)"}),
                 ("--structure", {"choices": STRUCTURES, "default": "auto",
                                  "help": "what /dev/mapper/NAME is (a replicated device): "
                                          "auto (default: the fastest its site links "
                                          "allow), log-writes (the kernel journal), "
                                          "mirror, raid1 (the remote leg); one that its "
                                          "table or site links cannot have is refused"})],
        "mut_ex_args": [("--table", {"metavar": "TEXT", "help": "the table itself"})],
        "func": act.create,
    }),
    ("load", {
        "help": "load a table into the inactive slot (applied on resume)",
        "args": [NAME, ("file", {"nargs": "?", "help": "table file ('-': stdin)"})],
        "mut_ex_args": [("--table", {"metavar": "TEXT", "help": "the table itself"})],
        "func": act.load,
    }),
    ("suspend", {"help": "suspend I/O (flushing what is in flight)", "args": [NAME],
                 "func": act.simple("suspend")}),
    ("resume", {"help": "resume I/O, switching to a loaded table", "args": [NAME],
                "func": act.simple("resume")}),
    ("remove", {
        "help": "remove a device or an unused replicator",
        "description": "remove a device or an unused replicator.  A busy one (open, with "
                       "writes not yet copied to all its site links, or a replicator "
                       "with devices) is refused with exit code 6 and left as it was, "
                       "unless --wait or --force is given.  When a site is down for "
                       "good, --force is the way out (by hand: `dmrepl message DEV 0 "
                       "device del SLINK` for the down site's device, `dmrepl message "
                       "REP 0 slink del SLINK` once no device uses it, then remove)",
        "args": [NAME, ("--wait", {"type": argument("--wait", parse_decimal), "default": 0,
                                   "metavar": "SECONDS",
                                   "help": "while busy, retry for up to SECONDS (like "
                                           "dmsetup remove --retry)"}),
                 ("--force", {"action": "store_true",
                              "help": "remove a device even though some of its writes "
                                      "are not yet at a remote site (e.g. the site is "
                                      "down; after --wait, if given): gives up the remote "
                                      "copies of those writes; the regions they touch "
                                      "are marked out of sync, and the remote device is "
                                      "left inconsistent and needs a full resync if it "
                                      "is added again.  The local device keeps every "
                                      "write; a device still open stays busy"})],
        "func": act.remove,
    }),
    ("message", {
        "help": "send a message to a target",
        "epilog": _messages_epilog(),
        "args": [NAME, ("sector", {"type": argument("sector"),
                                   "help": "sector selecting the target"}),
                 ("message", {"nargs": "+", "help": "message words"})],
        "func": act.message,
    }),
    ("status", {
        "help": "show target status",
        "args": [OPT_NAME, ("--json", {"action": "store_true", "help": "JSON output"}),
                 ("--table-status", {"action": "store_true",
                                     "help": "table-kind status (dmsetup status --table)"})],
        "func": act.status,
    }),
    ("table", {"help": "show the tables", "args": [OPT_NAME], "func": act.table}),
    ("ls", {"help": "list devices", "args": [], "func": act.ls}),
    ("wait", {
        "help": "wait for an event newer than EVENT_NR (default: the current one)",
        "args": [NAME, ("event_nr", {"nargs": "?", "type": argument("event_nr")}),
                 ("--timeout", {"type": argument("--timeout", parse_decimal), "default": None,
                                "help": "give up after this many seconds"})],
        "func": act.wait,
    }),
    ("events", {
        "help": "stream state changes as JSON lines (like drbdsetup events2)",
        "description": "One JSON object a line per change: link down/up, forced sync "
                       "on/off, resync start/end, errors (lost writes, I/O errors), "
                       "devices and objects added or removed; each with a sequence "
                       "number (seq) and an ISO 8601 UTC time.  A reader too slow "
                       "gets {\"kind\": \"lost\", \"count\": N} in place of what it "
                       "missed.",
        "args": [OPT_NAME, ("--now", {"action": "store_true",
                                      "help": "first the current state of every object "
                                              "and site link (kind \"exists\"), ended by "
                                              "an object \"-\""})],
        "func": act.events,
    }),
    ("daemon", {
        "help": "run the daemon (foreground)",
        "args": [
            ("--state-dir", {"default": env_or("DMREPL_STATE_DIR", "/var/lib/dmrepl"),
                             "help": "where tables are persisted and the NBD socket lives"}),
            ("--ready-file", {"help": "written with our pid once we serve"}),
            ("--log-level", {"choices": LOG_LEVELS, "default": "info",
                             "help": "least severe messages logged (default %(default)s): "
                                     "link down, forced sync on: warning; link up, "
                                     "resync start/end, devices added/removed: info; "
                                     "lost writes, I/O errors: error"}),
            ("--no-kernel-devices", {"action": "store_true",
                                     "help": "export over NBD only: no /dev/nbdN, "
                                             "no /dev/mapper (no kernel needed)"}),
            ("--tuning", {"action": "append", "default": [], "metavar": "KEY=VALUE",
                          "help": "engine tuning (repeatable), e.g. retry_interval=1 or "
                                  "durable_acks=0; keys: " + ", ".join(TUNABLES)}),
            ("--engine", {"choices": ENGINE_CHOICES, "default": "auto",
                          "help": "replicator engine: auto (= replicator) the real one, "
                                  "or fail; sim: a test-only synchronous stand-in that "
                                  "does not replicate"}),
            ("--nbd-max-connections", {
                "type": argument("--nbd-max-connections"),
                "default": NBD_DEFAULTS.max_connections, "metavar": "N",
                "help": "NBD connections served at once; more are closed "
                        "(default %(default)s)"}),
            ("--nbd-handshake-timeout", {
                "type": argument("--nbd-handshake-timeout", parse_decimal),
                "default": NBD_DEFAULTS.handshake_timeout, "metavar": "SECONDS",
                "help": "an NBD client must choose an export within this (default "
                        "%(default)s)"}),
            ("--nbd-idle-timeout", {
                "type": argument("--nbd-idle-timeout", parse_decimal),
                "default": NBD_DEFAULTS.idle_timeout, "metavar": "SECONDS",
                "help": "close an NBD connection that sends no whole request for this "
                        "long (default: never; a kernel /dev/nbdN may be idle for days)"}),
            ("--metrics", {"metavar": "ADDR:PORT",
                           "help": "serve Prometheus metrics on http://ADDR:PORT/metrics "
                                   "(default: off)"}),
        ],
        "epilog": "tuning keys (--tuning KEY=VALUE; default, bounds, meaning):\n"
                  + describe(),
        "func": act.daemon,
    }),
]


def _add_args(parser: argparse.ArgumentParser, spec: Spec) -> None:
    for name, kwargs in spec.get("args", []):
        parser.add_argument(name, **kwargs)
    if spec.get("mut_ex_args"):
        group = parser.add_mutually_exclusive_group()
        for name, kwargs in spec["mut_ex_args"]:
            group.add_argument(name, **kwargs)


def gen_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmrepl", description="dmsetup-style control of dmrepl replicated devices",
        epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--socket", default=default_socket(),
                        help="daemon control socket (default: $DMREPL_SOCKET if set and "
                             "not empty, else %(default)s)")
    parser.add_argument("--propagate", action="store_true",
                        help="let errors propagate (tracebacks, for debugging)")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in ROOT_SUBCOMMANDS:
        sub = subs.add_parser(name, help=spec["help"],
                              description=spec.get("description", spec["help"]),
                              epilog=spec.get("epilog"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_args(sub, spec)
        sub.set_defaults(func=spec["func"])
    return parser
