"""What ``dmrepl create`` says /dev/mapper/NAME is, per structure the daemon chose."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from dmrepl.cli import _actions


@pytest.mark.parametrize(("desc", "said"), [
    ({"structure": "mirror", "nbd": "/dev/nbd3"},
     "vol: /dev/mapper/vol (mirror of the local device and the journal leg /dev/nbd3)"),
    ({"structure": "log-writes", "nbd": None},
     "vol: /dev/mapper/vol (kernel journal of the local device: log-writes, drained by "
     "the daemon)"),
    ({"structure": "linear", "nbd": "/dev/nbd1"}, "vol: /dev/mapper/vol (over /dev/nbd1)"),
    ({"structure": "raid1", "nbd": None,
      "remote_leg": {"url": "nbd://10.0.0.2:10809/disk", "device": "/dev/nbd2"}},
     "vol: /dev/mapper/vol (raid1 of the local device and the remote "
     "nbd://10.0.0.2:10809/disk as /dev/nbd2)"),
])
def test_create_names_the_structure(desc: dict[str, Any], said: str,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    class Daemon:
        def call(self, op: str, **args: Any) -> dict[str, Any]:
            return {"type": "replicator-dev", "mapper": "/dev/mapper/vol", **desc}

    monkeypatch.setattr(_actions, "_client", lambda ns: Daemon())
    _actions.create(argparse.Namespace(name="vol", table="0 8 replicator-dev ...",
                                       file=None, socket="unused", structure="auto"))
    assert capsys.readouterr().out.strip() == said
