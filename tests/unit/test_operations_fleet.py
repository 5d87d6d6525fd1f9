"""A fleet's everyday operations on libvirt's test driver and a real SQLite file: a busy VM, an
interrupted stop, reset_state, renames, the grace on every path, a host reboot, ownership,
autostart, <on_crash> and the wake-up on time.

The test driver cannot migrate or crash a guest: those rules are tested cell by cell in
test_rules_fleet.py, and on real libvirtds by tests/real."""

import json
import threading
import time

import libvirt
import pytest

from vmpower.core.model import Cause, PowerState, VmState
from vmpower.core.settings import parse_settings
from vmpower.core.wakeup import WakeUp
from vmpower.hostinfo import boot_id, process_owner
from vmpower.operations import HostOperations, OperationError
from vmpower.store import Change, open_store
from vmpower.wakeup import WakeUps, read, wakeup_path

from .conftest import TEST_URI, journal_event
from .test_operations import BOOT, HOST, Clock, observed_stop, operations


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "records.sqlite")


@pytest.fixture
def store(path):
    with open_store(path) as s:
        yield s


def actions(report):
    return {a["name"]: a["action"] for a in report["actions"]}


def test_a_busy_vm_does_not_block_the_sync(store, path, testdriver):
    busy, other = testdriver.define("busy"), testdriver.define("other", start=False)
    ops = operations(store, instances={busy.name(): {"vm_state": "stopped"},
                                       other.name(): {"vm_state": "stopped"}})
    ops.sync()  # adopts both; busy (pinned stopped, running) is powered off
    busy.create()
    other.create()
    with open_store(path) as second, second.lock(busy.UUIDString()):  # another job holds it
        report = ops.sync()
    assert [b["name"] for b in report["busy"]] == [busy.name()]
    assert actions(report) == {other.name(): "power_off"}  # the rest is synced
    assert busy.isActive() and not other.isActive()
    assert actions(ops.sync()) == {busy.name(): "power_off"}  # and next time it is done


def test_an_interrupted_stop_is_cleared_by_the_next_sync(store, testdriver):
    dom = testdriver.define("web")
    ops = operations(store, alive=lambda owner: False)  # its process is gone
    ops.sync()
    record = store.get(dom.UUIDString())
    owner = json.dumps({"host": HOST, "boot_id": BOOT, "pid": 1, "start_time": "0", "since": 0})
    wedged = record.updated(1.0, task_state="powering-off", task_owner=owner)
    assert store.commit([Change(record, wedged, Cause.API, "powering-off", "x")], 1.0) == []
    dom.destroy()  # killed in the middle of the shutdown
    ops.sync()
    after = store.get(dom.UUIDString())
    assert (after.task_state, after.task_owner, after.power_state) == ("", "", PowerState.SHUTDOWN)
    cleared = ops.history(dom.name())[-1]
    assert "which is gone: cleared" in cleared["reason"]
    assert cleared["new"]["task_state"] == ""


def test_a_live_owner_keeps_the_vm_out_of_syncs(store, testdriver):
    dom = testdriver.define("web")
    ops = operations(store, alive=lambda owner: True)
    ops.sync()
    record = store.get(dom.UUIDString())
    busy = record.updated(1.0, task_state="powering-off", task_owner=process_owner(HOST, boot=BOOT))
    store.commit([Change(record, busy, Cause.API, "powering-off", "x")], 1.0)
    dom.destroy()
    report = ops.sync()
    assert "task_state=powering-off" in {s["name"]: s["reason"] for s in report["skipped"]}[dom.name()]
    assert store.get(dom.UUIDString()).task_state == "powering-off"


def test_systemexit_in_the_middle_of_a_stop_clears_the_task_state(store, testdriver, monkeypatch):
    dom = testdriver.define("web")
    ops = operations(store)

    def killed(*args):
        raise SystemExit(1)  # what saltutil.term_job's SIGTERM raises in a job process

    monkeypatch.setattr(HostOperations, "_shut_down", staticmethod(killed))
    with pytest.raises(SystemExit):
        ops.stop(dom.name())
    record = store.get(dom.UUIDString())
    assert (record.task_state, record.task_owner) == ("", "")
    assert "powering-off failed: SystemExit(1)" in ops.history(dom.name())[-1]["reason"]


def test_stop_records_its_owner_while_it_runs(store, testdriver, monkeypatch):
    dom = testdriver.define("web")
    ops = operations(store)
    seen = {}

    def look(hv, uuid, timeout, force):
        seen["record"] = store.get(uuid)
        return "looked"

    monkeypatch.setattr(HostOperations, "_shut_down", staticmethod(look))
    ops.stop(dom.name())
    owner = json.loads(seen["record"].task_owner)
    assert seen["record"].task_state == "powering-off"
    assert (owner["host"], owner["boot_id"]) == (HOST, BOOT) and owner["pid"] > 0


def test_reset_state_is_the_way_out(store, testdriver):
    dom = testdriver.define("web")
    ops = operations(store)
    ops.sync()
    record = store.get(dom.UUIDString())
    stuck = record.updated(1.0, vm_state=VmState.ERROR, task_state="powering-on",
                           task_owner=process_owner(HOST, boot=BOOT), restart_count=5)
    store.commit([Change(record, stuck, Cause.API, "x", "x")], 1.0)
    result = ops.reset_state(dom.name())
    assert result["changed"] and result["vm_state"] == "active" and result["task_state"] == ""
    assert store.get(dom.UUIDString()).restart_count == 0
    assert ops.history(dom.name())[-1]["action"] == "reset"
    assert ops.reset_state(dom.name(), VmState.STOPPED)["vm_state"] == "stopped"
    assert not ops.reset_state(dom.name())["changed"]
    locked = operations(store, instances={dom.name(): {"task_state": "maintenance"}})
    with pytest.raises(OperationError, match="vmpower never clears it"):
        locked.reset_state(dom.name())


def test_a_renamed_domain_keeps_its_pillar_and_its_record_takes_the_name(store, testdriver):
    dom = testdriver.define("old", start=False)
    operations(store).sync()
    new_name = dom.name().replace("old", "new")
    dom.rename(new_name)
    dom.create()  # vm_state=stopped but running: a sync would power it off...
    locked = operations(store, instances={new_name: {"task_state": "maintenance"}})
    report = locked.sync()  # ...but pillar locks it under its new name
    assert new_name in [s["name"] for s in report["skipped"]] and dom.isActive()
    dom.destroy()
    operations(store).sync()
    assert store.get(dom.UUIDString()).name == new_name
    assert any("renamed" in e["reason"] for e in store.history(dom.UUIDString()))


def test_the_grace_holds_a_sync_and_a_hard_reboot_is_harmless(store, testdriver):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, instances={dom.name(): {"vm_state": "active"}})
    ops.sync()
    dom.destroy()  # a hard reboot's gap...
    held = ops.sync()
    assert held["actions"] == [] and held["retry_at"] > time.time() + 14
    clock.step(3)
    dom.create()  # ...and it is back
    assert ops.sync()["actions"] == []
    record = store.get(dom.UUIDString())
    assert (record.vm_state, record.power_state, record.restart_count) == (VmState.ACTIVE,
                                                                            PowerState.RUNNING, 0)
    assert record.off_since == 0.0


def test_a_pinned_vm_that_stays_off_is_restarted_once_the_grace_is_over(store, testdriver):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, restart_backoff=20, instances={dom.name(): {"vm_state": "active"}})
    ops.sync()
    dom.destroy()
    ops.sync()
    clock.step(15)
    report = ops.sync()
    assert actions(report) == {dom.name(): "start"} and dom.isActive()
    assert store.get(dom.UUIDString()).restart_count == 1
    # The second restart backs off (20 s from the first, on the monotonic clock; the grace is
    # over 5 s before): retried on time, not at the next periodic sync.
    dom.destroy()
    assert ops.sync()["retry_at"] > 0
    clock.step(15)
    report = ops.sync()
    assert report["actions"] == [] and 0 < report["retry_at"] - time.time() <= 5.001  # rounded
    clock.step(5)
    assert actions(ops.sync()) == {dom.name(): "start"} and dom.isActive()


def test_a_host_reboot_neither_records_them_stopped_nor_fights_their_return(store, path,
                                                                          testdriver):
    doms = [testdriver.define(f"vm{i}") for i in range(3)]
    operations(store, boot_id="boot-1").sync()
    for dom in doms:
        dom.shutdown()  # libvirt-guests at shutdown
    after_boot = operations(store, boot_id="boot-2")
    report = after_boot.sync()
    assert report["actions"] == []
    for dom in doms:
        record = store.get(dom.UUIDString())
        assert (record.vm_state, record.power_state, record.off_reason) == (
            VmState.ACTIVE, PowerState.SHUTDOWN, "host_shutdown")
    later = Clock(10_000)  # long after: still the host's doing, still left alone
    assert operations(store, later, boot_id="boot-2").sync()["actions"] == []
    for dom in doms:
        dom.create()  # libvirt-guests or autostart brings them back
    assert operations(store, later, boot_id="boot-2").sync()["actions"] == []
    assert all(d.isActive() for d in doms)
    assert store.get(doms[0].UUIDString()).off_reason == ""


def test_a_host_shutdown_event_follows_on_host_shutdown(store, testdriver, journal):
    dom = testdriver.define("web")
    clock = Clock()
    ops = operations(store, clock, journal=journal)
    ops.sync()
    dom.shutdown()
    seq = observed_stop(journal, clock, dom, "host_shutdown")  # as this host's beacon saw it
    result = ops.reconcile(dom.UUIDString(), seq=seq)
    assert result["action"] == "none" and "on_host_shutdown=ignore" in result["reason"]
    assert store.get(dom.UUIDString()).vm_state is VmState.ACTIVE
    stop = operations(store, clock, journal=journal, instances={dom.name(): {"on_host_shutdown": "stop"}})
    assert stop.reconcile(dom.UUIDString(), seq=seq)["vm_state"] == "stopped"


def test_a_pinned_vm_is_not_restarted_while_the_host_shuts_down(store, testdriver):
    dom = testdriver.define("web")
    ops = operations(store, stopping=True, instances={dom.name(): {"vm_state": "active"}})
    ops.sync()
    dom.shutdown()  # libvirt-guests, while systemd says the host is stopping
    from vmpower.core.model import Transition
    result = ops.reconcile(dom.UUIDString(), Transition.STOPPED)  # a guest_shutdown-looking event
    assert result["action"] == "none" and "on_host_shutdown=ignore" in result["reason"]
    assert not dom.isActive()
    assert store.get(dom.UUIDString()).off_reason == "host_shutdown"




def test_a_sync_asks_whether_the_host_stops_ahead_and_decides_on_the_answer(store, testdriver):
    dom = testdriver.define("web")
    asked = []

    def stopping():
        asked.append(threading.current_thread())
        return True

    ops = HostOperations(parse_settings({"uri": TEST_URI}), HOST, store, clock=Clock(),
                         boot_id=lambda: BOOT, stopping=stopping)
    ops.sync()
    dom.shutdown()  # libvirt-guests, while systemd says the host is stopping
    ops.sync()
    assert store.get(dom.UUIDString()).off_reason == "host_shutdown"
    assert asked and threading.current_thread() not in asked  # read on a thread of its own


def test_a_sync_fails_when_asking_whether_the_host_stops_fails(store, testdriver):
    dom = testdriver.define("web")

    def stopping():
        raise RuntimeError("no answer")

    ops = HostOperations(parse_settings({"uri": TEST_URI}), HOST, store, clock=Clock(),
                         boot_id=lambda: BOOT, stopping=stopping)
    ops.sync()
    dom.shutdown()
    with pytest.raises(RuntimeError, match="no answer"):
        ops.sync()
    assert store.get(dom.UUIDString()).power_state is PowerState.RUNNING  # nothing written


def test_ownership_follows_the_running_domain(path, testdriver):
    dom = testdriver.define("web")
    with open_store(path) as store_a, open_store(path) as store_b:
        operations(store_a).sync()
        record = store_a.get(dom.UUIDString())
        assert record.host == HOST
        let_go = record.updated(2.0, host="", power_state=PowerState.SHUTDOWN)  # as a source does
        store_a.commit([Change(record, let_go, Cause.EVENT, "update", "migrated away")], 2.0)
        ops_b = HostOperations(parse_settings({"uri": TEST_URI}), "minion-b", store_b,
                               clock=Clock(), boot_id=lambda: "boot-b")
        report = ops_b.sync()
        taken = store_b.get(dom.UUIDString())
        assert (taken.host, taken.vm_state, taken.boot_id) == ("minion-b", VmState.ACTIVE, "boot-b")
        assert report["actions"] == [] and dom.isActive()
        assert "migrated from no host" in store_b.history(dom.UUIDString())[-1]["reason"]
        # Its former owner now leaves it alone: it runs here on B's record.
        assert dom.UUIDString() not in store_a.for_host(HOST)


def test_start_refuses_a_vm_whose_owner_runs_it(path, testdriver):
    dom = testdriver.define("web", start=False)
    with open_store(path) as store:
        operations(store).sync()
        record = store.get(dom.UUIDString())
        moved = record.updated(2.0, host="minion-b", power_state=PowerState.RUNNING)
        store.commit([Change(record, moved, Cause.SYNC, "update", "on B")], 2.0)
        with pytest.raises(OperationError, match="runs on minion-b"):
            operations(store).start(dom.name())
        assert not dom.isActive()


def test_a_sync_warns_when_autostart_contradicts_the_pin(store, testdriver):
    stopped, active = testdriver.define("stopped", start=False), testdriver.define("active")
    stopped.setAutostart(1)
    ops = operations(store, instances={stopped.name(): {"vm_state": "stopped"},
                                       active.name(): {"vm_state": "active"}})
    warnings = {w["name"]: w["reason"] for w in ops.sync()["warnings"]}
    assert "autostart is on" in warnings[stopped.name()]
    assert "autostart is off" in warnings[active.name()]


class TestWakeUp:
    """A decision due again later is handed to the beacon, on the monotonic clock with the boot
    id, through the wake-up file; nothing goes through Salt's scheduler."""

    @staticmethod
    def ops(store, tmp_path, clock, **settings):
        ops = operations(store, clock, **settings)
        ops.wakeups = WakeUps(str(tmp_path / "wakeup.json"))
        return ops

    def gone_off(self, store, testdriver, tmp_path):
        """A VM synced while it ran, then shut off behind vmpower's back at clock 1000."""
        dom = testdriver.define("web")
        clock = Clock(1000.0)
        ops = self.ops(store, tmp_path, clock)
        ops.sync()
        dom.destroy()
        return dom, clock, ops

    def test_a_sync_that_waits_out_the_grace_hands_over_its_due_time(self, store, testdriver,
                                                                      tmp_path):
        dom = testdriver.define("web")
        clock = Clock(1000.0)
        ops = self.ops(store, tmp_path, clock)
        ops.sync()
        assert read(ops.wakeups.path) is None  # nothing to wait for
        dom.destroy()
        held = ops.sync()  # first seen off now: 15 s of grace
        assert held["actions"] == [] and "retry_at" in held
        assert read(ops.wakeups.path) == WakeUp(1015.0, BOOT, 1000.0)

    def test_the_sync_it_asked_for_answers_it_and_asks_for_nothing_more(self, store, testdriver,
                                                                         tmp_path):
        dom, clock, ops = self.gone_off(store, testdriver, tmp_path)
        ops.sync()
        clock.step(15)
        report = ops.sync()
        assert store.get(dom.UUIDString()).vm_state is VmState.STOPPED, report
        assert read(ops.wakeups.path) is None

    def test_a_sync_before_the_due_time_leaves_it(self, store, testdriver, tmp_path):
        _, clock, ops = self.gone_off(store, testdriver, tmp_path)
        ops.sync()
        clock.step(5)
        ops.sync()  # still within the grace: asks for 1015 again, the one kept
        assert read(ops.wakeups.path) == WakeUp(1015.0, BOOT, 1000.0)

    def test_a_reconcile_hands_over_its_due_time_and_a_dry_run_nothing(self, store, testdriver,
                                                                       tmp_path):
        dom, _, ops = self.gone_off(store, testdriver, tmp_path)
        ops.sync(test=True)
        ops.reconcile(dom.UUIDString(), test=True)
        assert read(ops.wakeups.path) is None
        result = ops.reconcile(dom.UUIDString())
        assert "retry_at" in result
        assert read(ops.wakeups.path) == WakeUp(1015.0, BOOT, 1000.0)

    def test_a_file_that_cannot_be_written_fails_nothing(self, store, testdriver, tmp_path, caplog):
        dom = testdriver.define("web")
        (tmp_path / "file").write_text("")
        ops = operations(store, Clock())
        ops.wakeups = WakeUps(str(tmp_path / "file" / "wakeup.json"))  # under a plain file
        ops.sync()
        dom.destroy()
        assert "retry_at" in ops.sync()
        assert "cannot hand the sync due" in caplog.text

    def test_the_module_hands_over_what_a_sync_reports(self, load_minion, testdriver):
        dom = testdriver.define("web")
        loaded = load_minion(TEST_URI, None, stop_timeout=0)
        mods = loaded.functions
        mods["vmpower.sync"]()
        dom.destroy()
        before = time.monotonic()
        report = mods["vmpower.sync"]()
        wake = read(wakeup_path(loaded.opts["cachedir"]))
        assert wake is not None and wake.boot_id == boot_id(), report
        assert before + 15 <= wake.due <= time.monotonic() + 15
        assert "manage_schedule" not in str(report)


@pytest.fixture
def elsewhere_uri(tmp_path):
    """A second host's libvirt: the test driver's private world of a host with no domains."""
    node = tmp_path / "empty-node.xml"
    node.write_text("<node/>")
    return f"test://{node}"


def test_reset_state_runs_on_the_owner_only_unless_forced(store, testdriver, elsewhere_uri):
    dom = testdriver.define("web")
    owner = operations(store)
    owner.sync()
    record = store.get(dom.UUIDString())
    store.commit([Change(record, record.updated(1.0, vm_state=VmState.ERROR), Cause.API, "test",
                         "a restart limit reached")], 1.0)
    other = HostOperations(parse_settings({"uri": elsewhere_uri}), "minion-2", store,
                           boot_id=lambda: BOOT, stopping=lambda: False)
    with pytest.raises(OperationError, match="lives on minion-1, not minion-2: reset it where it "
                                             "lives .minion-1., or give force=True"):
        other.reset_state(dom.UUIDString())
    with pytest.raises(OperationError, match="give the vm_state it is to have"):
        other.reset_state(dom.UUIDString(), force=True)
    assert store.get(dom.UUIDString()).vm_state is VmState.ERROR  # nothing written
    forced = other.reset_state(dom.UUIDString(), VmState.ACTIVE, force=True)
    assert forced["vm_state"] == "active" and "forced on minion-2, over the owner minion-1" in forced["reason"]
    assert "forced on minion-2" in owner.history(dom.name())[-1]["reason"]
    assert not owner.sync()["actions"] and dom.isActive()  # the owner does not power it off


def _recorded_running_now_shut_off_unknown(store, testdriver):
    """A VM pinned active, recorded running here, that libvirt now shows "shut off (unknown)":
    what a libvirtd restart leaves of a domain live-migrated away whose source was kept."""
    dom = testdriver.define("moved", start=False)  # the test driver's "shut off (unknown)"
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN]
    ops = operations(store)
    ops.sync()
    record = store.get(dom.UUIDString())
    store.commit([Change(record, record.updated(1.0, vm_state=VmState.ACTIVE,
                                                power_state=PowerState.RUNNING), Cause.API,
                         "test", "it ran here")], 1.0)
    return dom


@pytest.mark.parametrize("seen", [None, ("stopped", "shutdown"), ("stopped", "migrated")])
def test_a_vm_that_went_off_unseen_for_a_reason_libvirt_lost_is_never_started(
        store, testdriver, journal, seen):
    from vmpower.core.model import Transition

    dom = _recorded_running_now_shut_off_unknown(store, testdriver)
    uuid = dom.UUIDString()
    clock = Clock()
    if seen:
        journal_event(journal, uuid, Transition(seen[0]), seen[1], clock() - 1, BOOT)
    ops = operations(store, clock, journal=journal, instances={dom.name(): {"vm_state": "active"}})
    first = ops.sync()
    clock.step(3600)  # long past the grace and any back-off
    later = ops.sync()
    record = store.get(uuid)
    if seen == ("stopped", "shutdown"):  # this host saw it go off: the pin restarts it
        assert [a["action"] for a in later["actions"]] == ["start"] and dom.isActive()
        return
    assert not dom.isActive() and not first["actions"] and not later["actions"]
    if seen is None:  # no one can tell why: recorded, reported, never acted on
        assert (record.power_state, record.off_reason, record.host) == (PowerState.SHUTDOWN,
                                                                         "not_seen", HOST)
        assert any("may have been migrated away" in w["reason"]
                   for w in later["warnings"] if w["uuid"] == uuid), later["warnings"]
    else:  # this host's beacon saw it migrated away: it lives elsewhere, and the source lets go
        assert record.host == "" and record.vm_state is VmState.ACTIVE
        assert "as this host's beacon saw" in ops.history(uuid)[-1]["reason"]
        # Let go, it is not taken back and let go again at every sync: nothing is written.
        written = len(ops.history(uuid))
        assert not ops.sync()["actions"] and len(ops.history(uuid)) == written
