"""Several live devices switched to new linear tables together
(dmrepl.daemon._kernel.switch_linear): all or nothing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from dmrepl.daemon import _kernel


class FakeDm:
    """Tables by device (live, inactive) and whether each is suspended."""

    def __init__(self, names: list[str], *, fail: tuple[str, str] | None = None) -> None:
        self.live: dict[str, Any] = {n: "old" for n in names}
        self.inactive: dict[str, Any] = {}
        self.suspended: set[str] = set()
        self.fail = fail   # (operation, device) that fails
        self.ops: list[tuple[str, str]] = []

    def _maybe_fail(self, op: str, name: str) -> None:
        self.ops.append((op, name))
        if self.fail == (op, name):
            raise OSError(16, f"{op} {name} refused")

    def info(self, name: str) -> Any:
        # (the group's device "g" exists: a table names it by its number)
        return SimpleNamespace(exists=name == "g", major=253, minor=7)

    def load(self, name: str, targets: Any) -> None:
        self._maybe_fail("load", name)
        self.inactive[name] = [t.params for t in targets]

    def clear(self, name: str) -> None:
        self.inactive.pop(name, None)

    def suspend(self, name: str, skip_lockfs: bool = False) -> None:
        self._maybe_fail("suspend", name)
        self.suspended.add(name)

    def resume(self, name: str) -> None:
        self.ops.append(("resume", name))
        if name in self.inactive:
            self.live[name] = self.inactive.pop(name)
        self.suspended.discard(name)


def switch(dm: FakeDm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernel, "_dm", lambda: dm)
    _kernel.switch_linear([(n, [(8, "/dev/mapper/g", i * 8)]) for i, n in enumerate(dm.live)])


def test_every_device_is_suspended_before_any_resumes_on_its_new_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dm = FakeDm(["a", "b", "c"])
    switch(dm, monkeypatch)
    assert dm.live == {"a": ["253:7 0"], "b": ["253:7 8"], "c": ["253:7 16"]}
    assert not dm.suspended and not dm.inactive
    # no device runs its new table while another still runs its old one
    kinds = [op for op, _name in dm.ops]
    assert kinds == ["load"] * 3 + ["suspend"] * 3 + ["resume"] * 3


@pytest.mark.parametrize("fail", [("load", "b"), ("suspend", "c")])
def test_a_refused_load_or_suspend_leaves_every_device_on_its_old_table(
        monkeypatch: pytest.MonkeyPatch, fail: tuple[str, str]) -> None:
    dm = FakeDm(["a", "b", "c"], fail=fail)
    with pytest.raises(_kernel.KernelDeviceError, match="refused"):
        switch(dm, monkeypatch)
    assert dm.live == {"a": "old", "b": "old", "c": "old"}
    assert not dm.suspended and not dm.inactive
