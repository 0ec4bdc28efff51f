"""The state tables of dmrepl/replicator/_state.py and the engine's use of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dmrepl.replicator import Replicator
from dmrepl.replicator._state import (
    ACK_TRANSITIONS,
    DEVICE_TRANSITIONS,
    LINK_TRANSITIONS,
    MACHINES,
    RESYNC_TRANSITIONS,
    AckEvent,
    AckState,
    DeviceEvent,
    DeviceState,
    IllegalTransition,
    LinkEvent,
    LinkState,
    ResyncEvent,
    ResyncState,
    StateMachine,
    dot,
    machine,
)
from dmrepl.replicator.errors import ReplicatorClosed
from dmrepl_testing.replicator import FakeStore, StoreSet

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(MACHINES))
def test_tables_are_closed_and_every_state_is_reachable(name: str) -> None:
    table, initial = MACHINES[name]
    states = set(table)
    state_type, event_types = type(initial), set()
    for state, row in table.items():
        assert type(state) is state_type
        for event, new in row.items():
            assert new in states, f"{name}: {state} -> {new} leads out of the table"
            event_types.add(type(event))
    assert len(event_types) == 1, f"{name}: one event type per machine"
    assert set(state_type) == states, f"{name}: every state has a row"
    seen, todo = {initial}, [initial]
    while todo:
        for new in table[todo.pop()].values():
            if new not in seen:
                seen.add(new)
                todo.append(new)
    assert seen == states, f"{name}: unreachable {states - seen}"
    (event_type,) = event_types
    used = {e for row in table.values() for e in row}
    assert used == set(event_type), f"{name}: events never used {set(event_type) - used}"


def test_link_machine() -> None:
    m = machine("site link: link")
    assert m.state is LinkState.UP
    with pytest.raises(IllegalTransition, match=r"retry_ok.*'up'"):
        m.fire(LinkEvent.RETRY_OK)
    assert m.state is LinkState.UP  # unchanged by the refused event
    assert m.fire(LinkEvent.IO_ERROR) is LinkState.DOWN
    assert m.fire(LinkEvent.IO_ERROR) is LinkState.DOWN
    assert m.fire(LinkEvent.RETRY_OK) is LinkState.UP
    assert LINK_TRANSITIONS[LinkState.UP] == {LinkEvent.IO_ERROR: LinkState.DOWN}


def test_ack_and_resync_machines() -> None:
    a = machine("site link: ack mode")
    with pytest.raises(IllegalTransition):
        a.fire(AckEvent.UNDER_THRESHOLD)
    assert a.fire(AckEvent.OVER_THRESHOLD) is AckState.FORCED_SYNC
    with pytest.raises(IllegalTransition):
        a.fire(AckEvent.OVER_THRESHOLD)
    assert a.fire(AckEvent.DROPPED) is AckState.ASYNC
    assert ACK_TRANSITIONS[AckState.ASYNC][AckEvent.DROPPED] is AckState.ASYNC
    r = machine("site link: resync")
    with pytest.raises(IllegalTransition):
        r.fire(ResyncEvent.ALL_IN_SYNC)
    assert r.fire(ResyncEvent.REGION_STARTED) is ResyncState.RESYNCING
    assert r.fire(ResyncEvent.ALL_IN_SYNC) is ResyncState.IDLE
    assert set(RESYNC_TRANSITIONS) == set(ResyncState)


def test_device_machine_removed_is_final() -> None:
    d = machine("device")
    assert d.fire(DeviceEvent.SUSPEND) is DeviceState.SUSPENDED
    assert d.fire(DeviceEvent.SUSPEND) is DeviceState.SUSPENDED
    assert d.fire(DeviceEvent.RESUME) is DeviceState.RUNNING
    assert d.fire(DeviceEvent.REMOVE) is DeviceState.REMOVED
    for ev in DeviceEvent:
        assert not d.can(ev)
        with pytest.raises(IllegalTransition):
            d.fire(ev)
    assert DEVICE_TRANSITIONS[DeviceState.REMOVED] == {}


def test_initial_state_must_be_in_the_table() -> None:
    with pytest.raises(ValueError):
        StateMachine("x", {LinkState.UP: {}}, LinkState.DOWN)


def test_dot_output_has_every_transition() -> None:
    for name, (table, initial) in MACHINES.items():
        text = dot(name)
        assert text.startswith("digraph ") and text.rstrip().endswith("}")
        assert f'start -> "{initial.value}"' in text
        for state, row in table.items():
            for event, new in row.items():
                assert f'"{state.value}" -> "{new.value}" [label="{event.value}"]' in text


def test_state_diagrams_tool_prints_all_machines() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "state-diagrams")],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("digraph ") == len(MACHINES)
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "state-diagrams"), "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown" in bad.stderr


def _rep() -> tuple[Replicator, StoreSet]:
    stores = StoreSet()
    stores.add(FakeStore((4096 + 64) * 512, name="log"))
    stores.add(FakeStore(1 << 16, name="l0"))
    stores.add(FakeStore(1 << 16, name="r0"))
    rep = Replicator.from_table(
        "0 1 replicator ringbuffer 4 log 0 create 4096 blockdev 2 0 async "
        "blockdev 4 1 async ios 1", opener=stores.open, retry_interval=0.01)
    return rep, stores


def test_engine_flags_follow_the_machines() -> None:
    rep, _stores = _rep()
    dev = rep.add_device("0 128 replicator-dev rep 0 0 1 l0 nolog 0 1 1 r0 core 2 8 nosync")
    s1 = rep.slinks[1]
    assert s1.up and not s1.forced and not s1.resyncing
    with rep.cond:
        rep.copiers.leg_failed_locked(s1, dev.legs[1], "W", OSError(5, "test"))
    assert s1.link.state is LinkState.DOWN and not s1.up
    assert rep.status_dict()["slinks"][1]["state"] == "down"
    with rep.cond, pytest.raises(IllegalTransition):
        s1.ack.fire(AckEvent.UNDER_THRESHOLD)  # it is not in forced sync
    assert not s1.forced
    dev.suspend()
    assert dev.sm.state is DeviceState.SUSPENDED and not dev.running
    dev.resume()
    assert dev.running
    rep.remove_device(0)
    assert dev.closed and dev.sm.state is DeviceState.REMOVED
    with pytest.raises(ReplicatorClosed):
        dev.resume()  # a removed device stays removed
    rep.close()


def test_engine_link_comes_back_up_through_the_table() -> None:
    rep, stores = _rep()
    rep.add_device("0 128 replicator-dev rep 0 0 1 l0 nolog 0 1 1 r0 core 2 8 nosync")
    remote = stores.stores["r0"]
    remote.fail_writes = remote.fail_reads = True
    rep.start()
    rep.devices[0].write(0, b"x" * 512)
    ev, tries = 0, 0
    while rep.slinks[1].up:
        tries += 1
        assert tries < 200, "the failing remote never took its site link down"
        ev = rep.wait_event(ev, 0.1)
    assert rep.slinks[1].link.state is LinkState.DOWN
    remote.fail_writes = remote.fail_reads = False
    assert rep.wait_drained(20), rep.status_dict()
    assert rep.slinks[1].link.state is LinkState.UP
    assert rep.status_dict()["slinks"][1]["failures"] >= 1
    rep.close()
