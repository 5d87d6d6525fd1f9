"""The daemon harness itself: real master and minions load vmpower both ways, and the bus
reaches the tests. Uses libvirt's test driver (``test:///default``, one running domain
called ``test``), so it needs no libvirtd."""

import time
import uuid
from pathlib import Path

import pytest

from .helpers import (
    REPO_ROOT,
    TEST_URI,
    UNMASK,
    add_beacon,
    delete_beacon,
    fire_beacon_event,
    is_not_available,
    minion_return,
    probe_python,
    salt_call,
    salt_cmd,
    send_event,
    set_pillar,
    wait_for_event,
)

TEST_MINION = "vmpower-minion-t"


@pytest.fixture(scope="module")
def test_minion(minion_factory):
    """A minion whose vmpower uses libvirt's test driver (through its minion config)."""
    with minion_factory.started(TEST_MINION, uri=TEST_URI) as minion:
        yield minion


def test_entry_point_loads_vmpower(test_minion):
    """pip-installed path: the minion finds vmpower through the salt.loader entry point,
    with no sync at all."""
    seen = probe_python(test_minion.python_executable)
    assert any("vmpower.loader:get_loader_dirs" in ep for ep in seen["entry_points"]), seen
    assert salt_call(test_minion, "vmpower.list_instances") == ["test"]
    assert salt_call(test_minion, "vmpower.get_num_instances") == 1
    synced = list(Path(test_minion.config["extension_modules"]).rglob("vmpower*"))
    assert synced == [], f"nothing should have been synced: {synced}"


def test_sync_from_master(salt_master, test_minion):
    """``salt '*' vmpower.sync`` from the master returns this host's summary."""
    returns = salt_cmd(salt_master, "*", "vmpower.sync", check=False, expect=[TEST_MINION])
    summary = minion_return(returns, TEST_MINION)
    assert isinstance(summary, dict), summary
    assert summary["checked"] == 1, summary
    assert summary["host"] == TEST_MINION


def test_pillar_reaches_the_minion(salt_master, pillar_tree, test_minion):
    """The pillar helper writes per-minion pillar and the daemon sees it after refresh."""
    marker = str(uuid.uuid4())
    try:
        set_pillar(salt_master, pillar_tree, TEST_MINION,
                   {"vmpower": {"instances": {"test": {"task_state": marker}}}})
        got = salt_cmd(salt_master, TEST_MINION, "pillar.get",
                       "vmpower:instances:test:task_state", **UNMASK)
        assert got[TEST_MINION] == marker
    finally:
        set_pillar(salt_master, pillar_tree, TEST_MINION, {})
    got = salt_cmd(salt_master, TEST_MINION, "pillar.get", "vmpower", **UNMASK)
    assert got[TEST_MINION] == ""


def test_event_send_reaches_the_listener(salt_master, salt_minion, event_listener):
    """A custom event fired on the minion arrives on the master's bus, seen by the listener."""
    tag = f"vmpower/harness/{uuid.uuid4()}"
    before = time.time()
    send_event(salt_minion, tag, {"hello": "bus"})
    data = wait_for_event(event_listener, tag, before, timeout=30, daemon_id=salt_master.id)
    assert data["id"] == salt_minion.id
    assert data["data"]["hello"] == "bus"


def test_forged_beacon_event_is_flat(salt_master, salt_minion, event_listener):
    """A minion can fire a beacon-shaped event under another minion's tag; the master bus
    carries its data flat, exactly like a real beacon event (what the reactor will see)."""
    marker = str(uuid.uuid4())
    tag = f"salt/beacon/someone-else/vmpower/harness/{marker}"
    before = time.time()
    fire_beacon_event(salt_minion, tag, {"id": "someone-else", "uuid": marker})
    event = wait_for_event(event_listener, tag, before, daemon_id=salt_master.id, full=True)
    assert event.data == {"id": "someone-else", "uuid": marker}


def test_missing_event_fails_clearly(event_listener):
    """wait_for_event names what it waited for and lists what did arrive."""
    with pytest.raises(pytest.fail.Exception, match=r"no event 'never/\*'.*arrived since"):
        wait_for_event(event_listener, "never/*", time.time(), timeout=1)


def test_beacon_events_reach_the_listener(salt_master, salt_minion, event_listener):
    """A beacon added at runtime (Salt's own ``status`` beacon, standing in for vmpower's)
    fires ``salt/beacon/<id>/...`` onto the master bus within a few loop intervals."""
    before = time.time()
    add_beacon(salt_master, salt_minion.id, [{"time": ["all"]}], name="status")
    try:
        event = wait_for_event(event_listener, f"salt/beacon/{salt_minion.id}/status/*", before,
                               timeout=30, daemon_id=salt_master.id, full=True)
        assert event.data["id"] == salt_minion.id
    finally:
        delete_beacon(salt_master, salt_minion.id, name="status")


def test_file_roots_install_needs_sync_all(salt_master, minion_factory):
    """classic path: a minion whose Python has no vmpower distribution (no package, no
    entry point) has no vmpower module until ``saltutil.sync_all`` brings ``_modules``,
    ``_beacons``, ``_states`` and ``_utils/vmpower`` (the library) from the master."""
    minion_id = "vmpower-plain"
    with minion_factory.started(minion_id, uri=TEST_URI, entry_point=False) as minion:
        seen = probe_python(minion.python_executable)
        assert seen["vmpower"] is None and not any("vmpower" in e for e in seen["entry_points"])

        ret = salt_call(minion, "vmpower.list_instances", check=False)
        assert is_not_available(ret, "vmpower.list_instances"), ret
        ret = salt_cmd(salt_master, minion_id, "vmpower.list_instances", check=False)
        assert is_not_available(ret[minion_id], "vmpower.list_instances"), ret

        synced = minion_return(salt_cmd(salt_master, minion_id, "saltutil.sync_all"), minion_id)
        assert "modules.vmpower" in synced["modules"], synced
        assert any(name.startswith("utils.vmpower") for name in synced["utils"]), synced
        assert "states.vmpower" in synced["states"] or not synced["states"], synced

        assert salt_call(minion, "vmpower.list_instances") == ["test"]
        ret = salt_cmd(salt_master, minion_id, "vmpower.list_instances")
        assert ret[minion_id] == ["test"]
        summary = salt_cmd(salt_master, minion_id, "vmpower.sync")[minion_id]
        assert summary["checked"] == 1, summary


@pytest.mark.skipif(not (REPO_ROOT / "_reactor" / "resync.sls").exists(),
                    reason="_reactor/resync.sls is not written yet")
def test_reactor_runs_sync_on_resync(salt_master, test_minion, event_listener):
    """The master's reactor maps ``salt/beacon/<id>/vmpower/resync`` to ``vmpower.sync`` on
    the minion named in the tag (the shipped ``_reactor/resync.sls``)."""
    before = time.time()
    fire_beacon_event(test_minion, f"salt/beacon/{TEST_MINION}/vmpower/resync",
                      {"id": TEST_MINION, "reason": "restarted", "lost": 0})
    ret = wait_for_event(
        event_listener, f"salt/job/*/ret/{TEST_MINION}", before, timeout=60,
        daemon_id=salt_master.id, match=lambda data: data.get("fun") == "vmpower.sync")
    assert ret["success"] is True, ret
    assert ret["return"]["checked"] == 1, ret


def test_two_minions_and_beacons_from_config(salt_master, test_minion, minion_factory,
                                             event_listener):
    """A second minion started with ``beacons:`` in its config (Salt's ``status`` beacon
    standing in for vmpower's) fires from the start; ``salt '*' vmpower.sync`` returns both
    hosts' summaries."""
    second = "vmpower-minion-t2"
    before = time.time()
    with minion_factory.started(second, uri=TEST_URI,
                                beacons={"status": [{"time": ["all"]}]}) as minion:
        wait_for_event(event_listener, f"salt/beacon/{second}/status/*", before,
                       daemon_id=salt_master.id)
        returns = salt_cmd(salt_master, "vmpower-minion-t*", "vmpower.sync",
                           expect=[TEST_MINION, second])
        assert {mid: ret["checked"] for mid, ret in returns.items()} == {
            TEST_MINION: 1, second: 1}
        assert returns[second]["host"] == minion.id
